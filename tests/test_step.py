"""The vmapped MocoSFL step against its per-client Python loop twin (tests/twins.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mocosfl_jax.models import split
from mocosfl_jax.sfl import moco, optim, state as state_lib, step as step_lib

import twins

N_POOL, BATCH, SIZE, QUEUE = 3, 2, 8, 16   # 2nB = 12 keys per step: step 2 wraps the queue
LR, MOMENTUM, WD, T, TAU, ROUNDS = 0.05, 0.9, 5e-4, 0.1, 0.99, 7


def fixed_views(key, images):
  """A key-independent stand-in for augmentation so both sides see the same pixels."""
  x = images.astype(jnp.float64) / 255.0 - 0.5
  return x, x[..., ::-1, :] * 0.9


def build(cut_layer, impl):
  client = split.ClientNet(cut_layer, width=0.125, as_matmul=impl == 'matmul')
  server = split.ServerNet(cut_layer, width=0.125, moco_version='smallV2')
  return client, server


def make_engine(client, server, impl, symmetric=True):
  tx = optim.sgd(MOMENTUM, WD)
  train_step = step_lib.make_train_step(
      client, server, tx, tx, fixed_views, temperature=T, ema_decay=TAU,
      client_impl='map' if impl == 'map' else 'vmap',
      server_lr=optim.cosine_per_epoch(LR, ROUNDS),
      client_lr=lambda steps, rnd: optim.reference_client_cosine(LR, ROUNDS)(steps),
      symmetric=symmetric)
  return tx, jax.jit(train_step)


def unstack(tree, n):
  return [jax.tree.map(lambda x: x[j], tree) for j in range(n)]


def assert_close(a, b, what):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-9, atol=1e-11, err_msg=what)


@pytest.mark.parametrize('cut_layer,impl,symmetric', [
    (1, 'vmap', True), (1, 'map', True), (2, 'matmul', True), (2, 'map', True),
    (1, 'vmap', False)])
def test_vmapped_step_equals_per_client_loop(cut_layer, impl, symmetric):
  with jax.enable_x64(True):
    client, server = build(cut_layer, impl)
    tx, train_step = make_engine(client, server, impl, symmetric)
    state = state_lib.init_state(jax.random.key(0), client, server, tx, tx,
                                 num_clients=N_POOL, image_size=SIZE, queue_size=QUEUE,
                                 feature_sharing=True)
    state = jax.tree.map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    # Distinct clients, EMAs and schedule positions, so a mixed-up row shows.
    noise = lambda k, t: jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(k, x.shape, x.dtype), t)
    clients = state.clients.replace(
        online=noise(jax.random.key(1), state.clients.online),
        ema=noise(jax.random.key(2), state.clients.ema),
        steps=jnp.array([0, 3, 9], jnp.int32))
    state = state.replace(clients=clients, round=jnp.array(2, jnp.int32),
                          server_ema=noise(jax.random.key(3), state.server_ema))

    twin = dict(online=unstack(clients.online, N_POOL), ema=unstack(clients.ema, N_POOL),
                bufs=[jax.tree.map(jnp.zeros_like, p) for p in unstack(clients.online, N_POOL)],
                client_steps=[0, 3, 9], server=state.server['params'],
                server_ema=state.server_ema['params'],
                server_buf=jax.tree.map(jnp.zeros_like, state.server['params']),
                queue=np.asarray(state.queue.keys), ptr=0)
    rng = np.random.default_rng(0)
    for step in range(2):
      images = jnp.asarray(rng.integers(0, 256, (N_POOL, BATCH, SIZE, SIZE, 3), np.uint8))
      state, metrics = train_step(state, images, jax.random.key(step))
      twin_out = twins.twin_step(
          client, server, fixed_views(None, images), online=twin['online'], ema=twin['ema'],
          bufs=twin['bufs'], client_steps=twin['client_steps'], server=twin['server'],
          server_ema=twin['server_ema'], server_buf=twin['server_buf'], queue=twin['queue'],
          ptr=twin['ptr'], round_index=2, num_rounds=ROUNDS, lr=LR, momentum=MOMENTUM,
          weight_decay=WD, temperature=T, tau=TAU, symmetric=symmetric)
      twin.update(twin_out)

      np.testing.assert_allclose(float(metrics['loss']), twin['loss'], rtol=1e-10)
      np.testing.assert_allclose(float(metrics['contrastive_accuracy']), twin['accuracy'])
      for j in range(N_POOL):
        assert_close(jax.tree.map(lambda x: x[j], state.clients.online), twin['online'][j],
                     f'client {j} online params after step {step}')
        assert_close(jax.tree.map(lambda x: x[j], state.clients.ema), twin['ema'][j],
                     f'client {j} EMA params after step {step}')
      assert_close(state.server['params'], twin['server'], 'server params')
      assert_close(state.server_ema['params'], twin['server_ema'], 'server EMA params')
      np.testing.assert_allclose(np.asarray(state.queue.keys), twin['queue'], rtol=1e-10)
      assert int(state.queue.ptr) == twin['ptr']
    keys_per_step = (2 if symmetric else 1) * N_POOL * BATCH
    assert twin['ptr'] == (2 * keys_per_step) % QUEUE  # symmetric: wrapped around once
    np.testing.assert_array_equal(state.clients.steps, twin['client_steps'])


def test_each_client_gets_its_own_gradient_slice():
  """Gradients routed through the batched VJP equal each client's own VJP of its rows."""
  with jax.enable_x64(True):
    client, server = build(1, 'vmap')
    params = client.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))['params']
    stacked = jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), (N_POOL,) + x.shape), params)
    x = jax.random.normal(jax.random.key(2), (N_POOL, BATCH, SIZE, SIZE, 3))
    forward = step_lib.batched_client_apply(client, 'vmap')
    out, vjp = jax.vjp(lambda p: forward(p, x), stacked)
    cotangent = jax.random.normal(jax.random.key(3), out.shape)
    (grads,) = vjp(cotangent)
    for j in range(N_POOL):
      mine = jax.tree.map(lambda t: t[j], stacked)
      _, vjp_j = jax.vjp(lambda p: client.apply({'params': p}, x[j]), mine)
      assert_close(jax.tree.map(lambda t: t[j], grads), vjp_j(cotangent[j])[0], f'client {j}')
