"""ResSFL's attacker-aware training (spec 6.3, fix 9.7): the vmapped step against a
per-client loop twin, alpha 0 against the plain step, ragged batches, the config
fields and the attackers' place in the state."""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax import checkpoint
from mocosfl_jax import config as config_lib
from mocosfl_jax import config_checks
from mocosfl_jax.models import split
from mocosfl_jax.privacy import decoders, metrics, ressfl
from mocosfl_jax.sfl import optim, rounds, step as step_lib

import test_step
import tiny
import twins

N, B, SIZE = test_step.N_POOL, test_step.BATCH, test_step.SIZE
# Not the identity: the de-normalisation back to [0, 1] images counts.
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
ALPHA, TARGET, ATTACKER_LR = 2.0, 0.05, 1e-3


def fixed_views(key, images):
  """Both views normalised with MEAN and STD, independent of the key."""
  x = images.astype(jnp.float64) / 255.0
  normalise = lambda v: (v - jnp.asarray(MEAN)) / jnp.asarray(STD)
  return normalise(x), normalise(x[..., ::-1, :] * 0.9)


def models(bottleneck='C4S2'):
  # C4S2 at cut 1 and 8x8 images: 4x4x4 smashed data, so the attacker upsamples.
  client = split.ClientNet(1, width=0.125, bottleneck=bottleneck, depth=tiny.DEPTH)
  server = split.ServerNet(1, width=0.125, moco_version='smallV2', bottleneck=bottleneck,
                           depth=tiny.DEPTH)
  return client, server


CUSTOM = decoders.CustomDecoder(SIZE)


def settings(decoder, alpha=ALPHA, target=TARGET):
  return ressfl.ResSFL(decoder, alpha, target, MEAN, STD, ATTACKER_LR)


def make_engine(client, server, ressfl_settings):
  return twins.quick_jit(step_lib.make_train_step(
      client, server, test_step.TX, test_step.TX, fixed_views, temperature=test_step.T,
      ema_decay=test_step.TAU, client_impl='vmap',
      server_lr=optim.cosine_per_epoch(test_step.LR, test_step.ROUNDS),
      client_lr=lambda steps, rnd: optim.reference_client_cosine(test_step.LR,
                                                                 test_step.ROUNDS)(steps),
      ressfl=ressfl_settings))


def with_attackers(state, client, decoder):
  """A float64 pool state with a float64 attacker per client."""
  @twins.quick_jit
  def add(state):
    online0 = jax.tree.map(lambda x: x[0], state.clients.online)
    smashed = jax.eval_shape(client.apply, {'params': online0},
                             jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float64))
    attackers = jax.tree.map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        ressfl.init_attackers(jax.random.key(7), settings(decoder), smashed, N))
    return state.replace(clients=state.clients.replace(attacker=attackers))
  with jax.enable_x64(True):
    return add(state)


# Shared by the tests: each costs a compilation.
@functools.cache
def initial_state():
  """test_step's pool state of these models, with distinct random attackers."""
  client, server = models()
  return with_attackers(test_step.pool_state(client, server), client, CUSTOM)


@functools.cache
def engine(alpha=ALPHA):
  return make_engine(*models(), settings(CUSTOM, alpha))


def images_for(step):
  return np.random.default_rng(step).integers(0, 256, (N, B, SIZE, SIZE, 3), np.uint8)


def assert_close(a, b, what, rtol=1e-12, atol=1e-14):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=what)


def rows(tree, j):
  return jax.tree.map(lambda x: x[j], tree)


# ---------------------------------------------------------------------------
# The per-client loop twin: plain jax.grad per client, Adam by hand, metrics.ssim.


@twins.quick_jit(static_argnames='decoder')
def twin_attacker(decoder, params, m, v, count, smashed, images, alpha, target):
  """One client's attacker step (Adam by hand) and its regulariser's gradient (target > 0)."""
  def ssim_of(p, a):
    return jnp.mean(metrics.ssim(decoder.apply({'params': p}, a), images))

  grads = jax.grad(lambda p: -ssim_of(p, smashed))(params)
  count = count + 1
  b1, b2, eps = 0.9, 0.999, 1e-8
  m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
  v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
  params = jax.tree.map(
      lambda p, m, v: p - ATTACKER_LR * (m / (1 - b1**count))
      / (jnp.sqrt(v / (1 - b2**count)) + eps), params, m, v)
  s = ssim_of(params, smashed)
  reg_grad = jax.grad(lambda a: alpha * jnp.maximum(ssim_of(params, a) - target, 0.0))(smashed)
  return params, m, v, count, s, reg_grad


def twin_attackers(attackers):
  """The pool's attackers as the twin holds them: per client (params, Adam m, v, count)."""
  params = attackers.variables['params']
  zeros = jax.tree.map(np.zeros_like, params)
  return [(rows(params, j), rows(zeros, j), rows(zeros, j), 0) for j in range(N)]


def twin_ressfl_step(client, server, twin, images, sizes):
  """twins.twin_step on each client's valid rows, then every client's attacker and
  regulariser gradient, one client at a time."""
  view1, view2 = fixed_views(None, images)
  views = ([view1[j, :k] for j, k in enumerate(sizes)], [view2[j, :k] for j, k in enumerate(sizes)])
  before_online, before_bufs, steps = twin['online'], twin['bufs'], twin['client_steps']
  out = twins.twin_step(
      client, server, views, online=before_online, ema=twin['ema'], bufs=before_bufs,
      client_steps=steps, server=twin['server'], server_ema=twin['server_ema'],
      server_buf=twin['server_buf'], queue=twin['queue'], ptr=twin['ptr'], round_index=2,
      num_rounds=test_step.ROUNDS, lr=test_step.LR, momentum=test_step.MOMENTUM,
      weight_decay=test_step.WD, temperature=test_step.T, tau=test_step.TAU)
  online, bufs, attackers, ssims = [], [], [], []
  for j, k in enumerate(sizes):
    smashed = twins.apply(client, before_online[j], views[0][j])
    params, m, v, count, s, reg_grad = twin_attacker(
        CUSTOM, *twin['attackers'][j], smashed, jnp.asarray(images[j, :k] / 255.0), ALPHA, TARGET)
    attackers.append((params, m, v, count))
    ssims.append(float(s))
    # The client's VJP is linear in the smashed gradient: server's slice + regulariser's.
    grads = jax.tree.map(lambda a, b: a + b, out['client_grads'][j],
                         twins.client_grads(client, before_online[j], views[0][j], reg_grad))
    lr = test_step.LR * 0.5 * (1 + math.cos(math.pi * steps[j] / test_step.ROUNDS))
    p, buf = twins.sgd_tree(before_online[j], grads, before_bufs[j], lr, test_step.MOMENTUM,
                            test_step.WD)
    online.append(p)
    bufs.append(buf)
  return {**out, 'online': online, 'bufs': bufs, 'attackers': attackers, 'ssims': ssims}


def assert_attackers_equal_twin(attackers, twin_rows, what):
  adam = attackers.opt[0]
  for j, (params, m, v, count) in enumerate(twin_rows):
    test_step.assert_close(rows(attackers.variables['params'], j), params, f'{what}: client {j}')
    test_step.assert_close(rows(adam.mu, j), m, f'{what}: client {j} Adam m')
    test_step.assert_close(rows(adam.nu, j), v, f'{what}: client {j} Adam v')
    assert int(adam.count[j]) == count


def test_vmapped_ressfl_step_equals_per_client_loop():
  """Two steps of ragged batches (client 1 has one valid row of two): the twin sees the valid rows only."""
  client, server = models()
  sizes = [2, 1, 2]
  with jax.enable_x64(True):
    state = initial_state()
    host = jax.device_get(state)
    twin = dict(
        online=[rows(host.clients.online, j) for j in range(N)],
        ema=[rows(host.clients.ema, j) for j in range(N)],
        bufs=[jax.tree.map(np.zeros_like, rows(host.clients.online, j)) for j in range(N)],
        client_steps=host.clients.steps.tolist(), server=host.server['params'],
        server_ema=host.server_ema['params'],
        server_buf=jax.tree.map(np.zeros_like, host.server['params']),
        queue=host.queue.keys, ptr=0, attackers=twin_attackers(host.clients.attacker))
    # The attackers start as distinct random draws.
    kernels = host.clients.attacker.variables['params']['Conv_0']['Conv_0']['kernel']
    assert not np.allclose(kernels[0], kernels[1])
    for step in range(2):
      images = images_for(step)
      state, step_metrics = engine()(state, images, jax.random.key(step), jnp.array(sizes))
      twin.update(twin_ressfl_step(client, server, twin, images, sizes))
      host = jax.device_get(state)
      np.testing.assert_allclose(float(step_metrics['loss']), twin['loss'], rtol=1e-10)
      np.testing.assert_allclose(float(step_metrics['attacker_ssim']), np.mean(twin['ssims']),
                                 rtol=1e-10)
      # Above the target: the regulariser is on.
      assert min(twin['ssims']) > TARGET and float(step_metrics['ressfl_regularizer']) > 0
      assert_attackers_equal_twin(host.clients.attacker, twin['attackers'], f'step {step}')
      for j in range(N):
        test_step.assert_close(rows(host.clients.online, j), twin['online'][j],
                               f'client {j} online params after step {step}')
      test_step.assert_close(host.server['params'], twin['server'], 'server params')


def test_padding_rows_change_neither_the_attackers_nor_the_regulariser():
  images = images_for(0)
  other = images.copy()
  other[1, 1] = 255 - other[1, 1]   # client 1's padding row
  with jax.enable_x64(True):
    sizes = jnp.array([2, 1, 2])   # int64, as in the twin test: the same compiled step
    (a, a_metrics), (b, b_metrics) = [
        jax.device_get(engine()(initial_state(), x, jax.random.key(0), sizes))
        for x in (images, other)]
  assert_close(a.clients.attacker, b.clients.attacker, 'attackers')
  assert_close(a.clients.online, b.clients.online, 'clients')
  for name in ('attacker_ssim', 'ressfl_regularizer'):
    np.testing.assert_allclose(a_metrics[name], b_metrics[name], rtol=1e-12)


def test_batch_norm_statistics_leave_out_masked_rows():
  """res_normN4C64's BatchNorm (batches of 20 or more) under ragged batches."""
  decoder = decoders.ResNormDecoder(SIZE, channels=4, xavier=True)
  smashed = jax.random.normal(jax.random.key(0), (3, 4, 4, 4))
  other = smashed.at[1].set(100.0)
  mask = jnp.array([True, False, True])

  @twins.quick_jit
  def train(variables, x):
    return decoder.apply(variables, x, train=True, mask=mask, mutable=['batch_stats'])

  variables = twins.quick_jit(decoder.init)(jax.random.key(1), smashed)
  (out, stats), (out_other, stats_other) = train(variables, smashed), train(variables, other)
  assert_close(out[mask], out_other[mask], 'valid rows', rtol=1e-5, atol=1e-6)
  assert_close(stats, stats_other, 'batch statistics', rtol=1e-5, atol=1e-6)
  moved = stats['batch_stats']['ResidualUnit_0']['BatchNorm_0']['mean']
  assert not np.allclose(moved, variables['batch_stats']['ResidualUnit_0']['BatchNorm_0']['mean'])


def test_regularizer_follows_the_references_rule():
  s = jnp.array([0.3, 0.7])
  np.testing.assert_allclose(ressfl.regularizer(s, 2.0, 0.6), [0.0, 0.2], atol=1e-7)
  np.testing.assert_allclose(ressfl.regularizer(s, 2.0, 0.0), [0.6, 1.4], atol=1e-7)
  np.testing.assert_allclose(ressfl.regularizer(s, 2.0, -0.5), [0.6, 1.4], atol=1e-7)


def without_attackers(state):
  return state.replace(clients=state.clients.replace(attacker=None))


def test_alpha_zero_trains_the_attackers_and_is_the_plain_step_otherwise():
  client, server = models()
  with jax.enable_x64(True):
    plain_step = make_engine(client, server, None)
    with_zero = initial_state()
    plain = without_attackers(with_zero)
    twin = twin_attackers(jax.device_get(with_zero.clients.attacker))
    online = jax.device_get(with_zero.clients.online)
    for step in range(2):
      images = images_for(step)
      view1 = fixed_views(None, images)[0]
      for j in range(N):
        smashed = twins.apply(client, rows(online, j), view1[j])
        twin[j] = twin_attacker(CUSTOM, *twin[j], smashed, jnp.asarray(images[j] / 255.0), 0.0,
                                TARGET)[:4]
      plain, plain_metrics = plain_step(plain, images, jax.random.key(step))
      with_zero, zero_metrics = engine(0.0)(with_zero, images, jax.random.key(step))
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(plain),
                   jax.device_get(without_attackers(with_zero)))
      for name, value in plain_metrics.items():
        np.testing.assert_array_equal(value, zero_metrics[name])
      assert_attackers_equal_twin(jax.device_get(with_zero.clients.attacker), twin,
                                  f'alpha 0, step {step}')
      online = jax.device_get(with_zero.clients.online)
    assert float(zero_metrics['ressfl_regularizer']) == 0.0


@pytest.mark.parametrize('field, value, why', [
    ('attacker', 'resnet', "use one of ['custom', 'res_normN4C64']"),
    ('ressfl_alpha', -1.0, 'must be >= 0'),
    ('target_ssim', 1.0, 'must be < 1'),
    ('attacker_lr', 0.0, 'must be > 0'),
])
def test_bad_ressfl_fields_are_one_line_errors(field, value, why):
  config = config_lib.default_config()
  config.privacy.ressfl_alpha = 2.0
  config.privacy[field] = value
  with pytest.raises(config_checks.ConfigError, match=re.escape(why)) as info:
    config_checks.validate(config)
  assert '\n' not in str(info.value) and f'privacy.{field}' in str(info.value)


def test_ressfl_with_frozen_clients_is_refused():
  config = config_lib.default_config()
  config.privacy.ressfl_alpha, config.optim.client_lr = 2.0, 0.0
  with pytest.raises(config_checks.ConfigError, match='frozen clients'):
    config_checks.validate(config)


def test_the_attacker_follows_the_references_choice():
  """res_normN4C64: BatchNorm from a batch of 20, GroupNorm and WS below; Xavier and zero biases."""
  smashed = jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32)
  init = lambda d: jax.eval_shape(d.init, jax.random.key(0), smashed)
  assert 'batch_stats' in init(decoders.simulated_attacker(decoders.NAME, 16, 20, 8))
  assert 'batch_stats' not in init(decoders.simulated_attacker(decoders.NAME, 16, 19, 8))
  custom = decoders.simulated_attacker('custom', 16, 1)
  params = twins.quick_jit(custom.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 4)))['params']
  assert set(params) == {'Conv_0', 'ConvTranspose_0'}   # u = 1: conv C->C, transposed C->3
  assert params['ConvTranspose_0']['kernel'].shape == (3, 3, 4, 3)
  assert not np.any(params['ConvTranspose_0']['bias'])
  bound = math.sqrt(6 / (9 * 4 + 9 * 3))   # Xavier-uniform
  kernel = np.asarray(params['ConvTranspose_0']['kernel'])
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.8 * bound


def test_attackers_are_gathered_scattered_and_checkpointed_with_the_pool(tmp_path):
  state = initial_state()
  # Without attackers the state's tree is the one checkpoints held before ResSFL.
  # (orbax refuses a tree with an extra key, even one holding None).
  paths = jax.tree_util.tree_flatten_with_path(without_attackers(state),
                                               is_leaf=lambda x: x is None)[0]
  assert not any('attacker' in jax.tree_util.keystr(path) for path, _ in paths)

  with jax.enable_x64(True):   # the state is float64
    pool = jnp.array([2, 0])
    pooled = rounds.gather(state, pool)
    kernel = lambda s: s.clients.attacker.variables['params']['Conv_0']['Conv_0']['kernel']
    np.testing.assert_array_equal(kernel(pooled), kernel(state)[pool])
    pooled = pooled.replace(clients=pooled.clients.replace(
        attacker=jax.tree.map(lambda x: x + 1, pooled.clients.attacker)))
    back = rounds.scatter(state, pool, pooled)
    np.testing.assert_array_equal(kernel(back)[pool], kernel(state)[pool] + 1)
    np.testing.assert_array_equal(kernel(back)[1], kernel(state)[1])

  config = config_lib.default_config()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          back)
  checkpoints = checkpoint.Checkpoints(tmp_path, keep=1)
  with jax.enable_x64(True):
    try:
      checkpoints.save(back, int(back.round), config, {})
      checkpoints.wait()
      restored, _ = checkpoints.restore(abstract, config)
    finally:
      checkpoints.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(back))
  assert restored.clients.attacker is not None
