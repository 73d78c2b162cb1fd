"""moco.ema_dtype: the clients' EMA models stored in bfloat16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax import checkpoint, config_checks
from mocosfl_jax.models import split
from mocosfl_jax.sfl import fedavg, optim, state as state_lib, step as step_lib

import tiny
import twins

N, BATCH, SIZE, QUEUE = 2, 2, 8, 16
TX = optim.sgd(0.9, 5e-4)
CLIENT = split.ClientNet(1, width=0.0625, depth=tiny.DEPTH)
SERVER = split.ServerNet(1, width=0.0625, moco_version='smallV2', depth=tiny.DEPTH)


def init(key, num_clients=N, ema_dtype='float32'):
  return state_lib.init_state(key, CLIENT, SERVER, TX, TX, num_clients=num_clients,
                              image_size=SIZE, queue_size=QUEUE, feature_sharing=True,
                              ema_dtype=ema_dtype)


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def share(ema_dtype) -> int:
  """Bytes that one more client adds to the state."""
  shapes = [jax.eval_shape(lambda k: init(k, n, ema_dtype), jax.random.key(0)) for n in (1, 2)]
  return nbytes(shapes[1]) - nbytes(shapes[0])


def test_bfloat16_storage_halves_the_ema_share():
  state = jax.eval_shape(lambda k: init(k, ema_dtype='bfloat16'), jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(state.clients.ema)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(state.clients.online)} == {jnp.dtype(jnp.float32)}
  ema_float32 = nbytes(state.clients.online) // N
  assert share('float32') - share('bfloat16') == ema_float32 // 2


def bf16_neighbours(x):
  """The two bfloat16 values around each float32 of ``x``, as float32 bit patterns."""
  low = np.asarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
  return low, low + np.uint32(0x10000)


def test_stochastic_rounding_keeps_small_ema_steps():
  # An EMA step at decay 0.99 moving a weight of 1 by a tenth of a bfloat16
  # ulp: round to nearest drops every one of them, stochastic rounding keeps
  # them on average.
  ema = jnp.ones(20000, jnp.float32)
  target = jnp.full_like(ema, 1 + 0.1 * 2.0 ** -7 / 0.01)
  stored = jnp.ones(20000, jnp.bfloat16)
  for i in range(50):
    ema = 0.99 * ema + 0.01 * target
    stored = state_lib.stochastic_round_bf16(
        0.99 * stored.astype(jnp.float32) + 0.01 * target, jax.random.key(i))
  drift = float(jnp.mean(stored.astype(jnp.float32)) - 1)
  np.testing.assert_allclose(drift, float(ema[0]) - 1, rtol=0.05)


@twins.quick_jit
def start_state(key):
  """A state with its EMA models in bfloat16 and its online models away from them."""
  state = init(key, ema_dtype='bfloat16')
  online = twins.perturbed(state.clients.online, 1.0)
  return state.replace(clients=state.clients.replace(online=online))


def test_bfloat16_step_stores_the_float32_ema_update_rounded():
  """Each stored EMA weight after a step is one of the two bfloat16 neighbours
  of tau ema + (1 - tau) online, computed in float32 from the step's input."""
  state = start_state(jax.random.key(0))
  train_step = twins.quick_jit(step_lib.make_train_step(
      CLIENT, SERVER, TX, TX, lambda key, x: (x / 255.0, x[..., ::-1, :] / 255.0),
      temperature=0.1, ema_decay=0.99, client_impl='vmap',
      server_lr=lambda r: 0.05, client_lr=lambda s, r: jnp.full(s.shape, 0.05)))
  images = jax.random.randint(jax.random.key(1), (N, BATCH, SIZE, SIZE, 3), 0, 256, jnp.uint8)
  new, metrics = train_step(state, images, jax.random.key(2))

  assert np.isfinite(metrics['loss'])
  moved = 0
  for got, ema, online in zip(*map(jax.tree.leaves, (new.clients.ema, state.clients.ema,
                                                      state.clients.online))):
    assert got.dtype == jnp.bfloat16
    want = 0.99 * np.asarray(ema, np.float32) + 0.01 * np.asarray(online)
    bits = np.asarray(got, np.float32).view(np.uint32)
    low, high = bf16_neighbours(want)
    assert np.all((bits == low) | (bits == high))
    moved += int(np.sum(got != ema))
  assert moved > 0


def test_fedavg_sums_bfloat16_in_float32():
  stacked = {'w': jnp.array([[1.0], [2.0], [4.0]], jnp.bfloat16)}
  mean = fedavg.average(stacked, jnp.full((3,), 1 / 3))['w']
  assert mean.dtype == jnp.bfloat16
  assert float(mean[0]) == float(jnp.bfloat16(7 / 3))


def test_config_rejects_other_dtypes_and_resuming_across_them():
  with pytest.raises(config_checks.ConfigError) as info:
    config_checks.validate(tiny.config(**{'moco.ema_dtype': 'float16'}))
  assert 'moco.ema_dtype' in str(info.value) and '\n' not in str(info.value)
  config_checks.validate(tiny.config(**{'moco.ema_dtype': 'bfloat16'}))
  # A checkpoint of the other storage would restore cast: resuming refuses it by name.
  differences = checkpoint.config_differences(
      tiny.config().to_dict(), tiny.config(**{'moco.ema_dtype': 'bfloat16'}).to_dict())
  assert differences == ["moco.ema_dtype 'float32' -> 'bfloat16'"]
