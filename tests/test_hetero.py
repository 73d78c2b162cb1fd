"""Heterogeneous clients: ragged per-client batches in the step, the rounds and the run."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax import config as config_lib
from mocosfl_jax import config_checks
from mocosfl_jax import train
from mocosfl_jax.models import resnet, split
from mocosfl_jax.sfl import moco, optim, rounds, state as state_lib, step as step_lib
from mocosfl_jax.sfl.state import Clients, SimState

import tiny
import twins

SIZE, WIDTH = 8, 0.0625
SIZES = np.array([4, 1, 2])         # pool client j uses its first SIZES[j] rows
ROWS = int(SIZES.max())             # rows every client gets (B_max)
VALID = int(SIZES.sum())            # 7 valid rows of 12
LR, MOMENTUM, WD, T, TAU, ROUNDS = 0.05, 0.9, 5e-4, 0.1, 0.99, 7


def fixed_views(key, images):
  """A key-independent stand-in for augmentation so both sides see the same pixels."""
  del key
  x = images.astype(jnp.float64) / 255.0 - 0.5
  return x, x[..., ::-1, :] * 0.9


@functools.cache
def engine():
  """The ragged step, with 3 server rows more than the 7 valid ones: the padding
  of a sampled pool that holds fewer rich clients than the server batch allows."""
  client = split.ClientNet(1, width=WIDTH, depth=tiny.DEPTH)
  server = split.ServerNet(1, width=WIDTH, moco_version='smallV2', depth=tiny.DEPTH)
  tx = optim.sgd(MOMENTUM, WD)
  train_step = step_lib.make_train_step(
      client, server, tx, tx, fixed_views, temperature=T, ema_decay=TAU, client_impl='vmap',
      server_lr=optim.cosine_per_epoch(LR, ROUNDS),
      client_lr=lambda steps, rnd: optim.reference_client_cosine(LR, ROUNDS)(steps),
      server_batch=VALID + 3)
  return client, server, tx, twins.quick_jit(train_step)


@functools.cache
def initial_state():
  """A float64 pool state with distinct clients and schedule positions, so a mixed-up row shows.

  The shared queue's 20 rows take 14 keys a step: the second step wraps around.
  """
  client, server, tx, _ = engine()

  def init(key):
    return twins.distinct_pool(state_lib.init_state(
        key, client, server, tx, tx, num_clients=len(SIZES), image_size=SIZE, queue_size=20,
        feature_sharing=True))
  # One compiled program instead of hundreds of eagerly compiled operations.
  return twins.quick_jit(init)(jax.random.key(0))


def pool_images(seed):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, (len(SIZES), ROWS, SIZE, SIZE, 3), np.uint8))


def unstack(tree, n):
  return [jax.tree.map(lambda x: x[j], tree) for j in range(n)]


def assert_close(a, b, what):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-9, atol=1e-11, err_msg=what)


def test_ragged_step_equals_per_client_loop():
  n = len(SIZES)
  with jax.enable_x64(True):
    client, server, _, train_step = engine()
    state = initial_state()
    c = state.clients
    twin = dict(online=unstack(c.online, n), ema=unstack(c.ema, n),
                bufs=[jax.tree.map(jnp.zeros_like, p) for p in unstack(c.online, n)],
                client_steps=[0, 3, 9], server=state.server['params'],
                server_ema=state.server_ema['params'],
                server_buf=jax.tree.map(jnp.zeros_like, state.server['params']),
                queue=np.asarray(state.queue.keys), ptr=0)
    for step in range(2):
      images = pool_images(step)
      state, metrics = train_step(state, images, jax.random.key(step), jnp.asarray(SIZES))
      views = [fixed_views(None, images[j, :SIZES[j]]) for j in range(n)]
      twin.update(twins.twin_step(
          client, server, ([v[0] for v in views], [v[1] for v in views]),
          online=twin['online'], ema=twin['ema'], bufs=twin['bufs'],
          client_steps=twin['client_steps'], server=twin['server'],
          server_ema=twin['server_ema'], server_buf=twin['server_buf'], queue=twin['queue'],
          ptr=twin['ptr'], round_index=2, num_rounds=ROUNDS, lr=LR, momentum=MOMENTUM,
          weight_decay=WD, temperature=T, tau=TAU))

      np.testing.assert_allclose(float(metrics['loss']), twin['loss'], rtol=1e-10)
      np.testing.assert_allclose(float(metrics['contrastive_accuracy']), twin['accuracy'])
      for j in range(n):
        assert_close(jax.tree.map(lambda x: x[j], state.clients.online), twin['online'][j],
                     f'client {j} online params after step {step}')
      assert_close(state.server['params'], twin['server'], 'server params')
      assert_close(state.server_ema['params'], twin['server_ema'], 'server EMA params')
      np.testing.assert_allclose(np.asarray(state.queue.keys), twin['queue'],
                                 rtol=1e-10, atol=1e-13)
      assert int(state.queue.ptr) == twin['ptr']
    assert twin['ptr'] == (2 * 2 * VALID) % 20  # the valid keys only, wrapped once


def test_padding_rows_change_nothing():
  """New pixels in the padding rows leave every output bit alone."""
  with jax.enable_x64(True):
    _, _, _, train_step = engine()
    results = []
    for padding_seed in (10, 11):
      images = np.array(pool_images(0))
      noise = np.asarray(pool_images(padding_seed))
      for j, size in enumerate(SIZES):
        images[j, size:] = noise[j, size:]
      results.append(train_step(initial_state(), jnp.asarray(images), jax.random.key(0),
                                jnp.asarray(SIZES)))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batchnorm_head_statistics_skip_masked_rows():
  """The mask that the step gives the server keeps padding out of largeV2's BatchNorm."""
  cut = resnet.num_modules(tiny.DEPTH) - 1   # the smallest server: one module and the head
  server = split.ServerNet(cut, width=WIDTH, moco_version='largeV2', image_size=SIZE,
                           depth=tiny.DEPTH)
  client = split.ClientNet(cut, width=WIDTH, image_size=SIZE, depth=tiny.DEPTH)
  images = jnp.zeros((6, SIZE, SIZE, 3))
  smashed = jax.eval_shape(lambda: client.apply(client.init(jax.random.key(0), images), images))
  x = jax.random.normal(jax.random.key(0), smashed.shape)
  mask = jnp.array([True, True, False, True, False, False])
  variables = twins.quick_jit(server.init)(jax.random.key(1), x)
  apply = twins.quick_jit(step_lib.server_apply, static_argnums=0)
  out, new_vars = apply(server, variables, x, mask)
  want, want_vars = apply(server, variables, x[mask])
  np.testing.assert_allclose(out[mask], want, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(new_vars['batch_stats']),
                  jax.tree.leaves(want_vars['batch_stats'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_per_client_queues_take_their_valid_keys_in_order():
  # 2 clients with 3 rows each; client 0 uses 3 rows, client 1 only 1.
  queue = moco.Queue(jnp.zeros((2, 5, 1)), jnp.array([3, 0], jnp.int32))
  k1 = jnp.array([[10.], [11], [12], [20], [-1], [-1]])
  k2 = jnp.array([[13.], [14], [15], [21], [-1], [-1]])
  valid = jnp.array([True, True, True, True, False, False])
  queue = moco.enqueue(queue, k1, k2, 2, valid)
  # Client 0: 10..15 from row 3 on, wrapping; client 1: 20, 21 at rows 0, 1.
  np.testing.assert_array_equal(queue.keys[..., 0], [[12, 13, 14, 15, 11], [20, 21, 0, 0, 0]])
  np.testing.assert_array_equal(queue.ptr, [4, 2])


def test_masked_info_nce_is_the_mean_over_valid_rows():
  # Compiled: run eagerly, every operation of every shape would be compiled on its own.
  info_nce = twins.quick_jit(moco.info_nce, static_argnums=3)
  q = moco.l2_normalize(jax.random.normal(jax.random.key(4), (6, 3)))
  # Near-positive keys in the valid rows, opposite ones in the padding rows:
  # counting a padding row would lower the accuracy.
  k = moco.l2_normalize(q + 0.3 * jax.random.normal(jax.random.key(5), (6, 3)))
  k = k.at[4:].set(-q[4:])
  queues = moco.l2_normalize(jax.random.normal(jax.random.key(6), (2, 5, 3)))
  valid = jnp.array([True, True, True, True, False, False])
  loss, accuracy = info_nce(q, k, queues, 0.2, valid)
  # Client 0's 3 rows against its queue, client 1's single valid row against its own.
  loss0, acc0 = info_nce(q[:3], k[:3], queues[0], 0.2)
  loss1, acc1 = info_nce(q[3:4], k[3:4], queues[1], 0.2)
  np.testing.assert_allclose(float(loss), (3 * float(loss0) + float(loss1)) / 4, rtol=1e-5)
  np.testing.assert_allclose(float(accuracy), (3 * float(acc0) + float(acc1)) / 4)
  assert float(accuracy) > 0
  shared_loss, _ = info_nce(q, k, queues[0], 0.2, valid)
  valid_rows_loss, _ = info_nce(q[:4], k[:4], queues[0], 0.2)
  np.testing.assert_allclose(float(shared_loss), float(valid_rows_loss), rtol=1e-5)


N, POOL, STEPS, BATCH = 6, 4, 3, 2
MULTIPLIER = np.array([3, 3, 1, 1, 1, 1])


def recording_step(state, images, key, batch_sizes=None):
  """Records the sample ids (pixel values) and the batch sizes it was given."""
  del key
  sizes = jnp.full(images.shape[0], -1) if batch_sizes is None else batch_sizes
  return state.replace(step=state.step + 1), {'ids': images[:, :, 0, 0, 0], 'sizes': sizes}


def round_metrics(multiplier, one_program=True):
  clients = Clients(online={'w': jnp.zeros((N, 1))}, ema={'w': jnp.zeros((N, 1))},
                    opt={}, steps=jnp.zeros((N,), jnp.int32))
  state = SimState(server={}, server_ema={}, server_opt={}, clients=clients,
                   queue=moco.Queue(jnp.zeros((8, 2)), jnp.zeros((), jnp.int32)),
                   round=jnp.zeros((), jnp.int32), step=jnp.zeros((), jnp.int32))
  # Client i holds samples 40i, 40i + 1, ...: exactly one pass of its own batch.
  counts = STEPS * BATCH * np.asarray(multiplier)
  images = jnp.broadcast_to(jnp.arange(N * 40, dtype=jnp.int32)[:, None, None, None],
                            (N * 40, 1, 1, 3))
  table = 40 * np.arange(N)[:, None] + np.arange(counts.max())
  table = np.where(np.arange(counts.max()) < counts[:, None], table, -1)
  data = rounds.ClientData(images, jnp.asarray(table, jnp.int32), jnp.asarray(counts, jnp.int32))
  run_round = rounds.make_round(recording_step, num_clients=N, pool_size=POOL, steps=STEPS,
                                batch_size=BATCH, sync_every=STEPS, one_program=one_program,
                                batch_multiplier=multiplier)
  _, metrics = run_round(state, data, jax.random.key(0))
  pool = np.asarray(rounds.sample_pool(rounds.round_keys(jax.random.key(0), 0)[1], N, POOL))
  return pool, jax.tree.map(np.asarray, metrics)


def test_ragged_round_gives_each_client_its_own_batch():
  pool, metrics = round_metrics(MULTIPLIER)
  sizes = BATCH * MULTIPLIER[pool]
  assert metrics['ids'].shape == (STEPS, POOL, BATCH * 3)
  np.testing.assert_array_equal(metrics['sizes'], np.broadcast_to(sizes, (STEPS, POOL)))
  assert set(MULTIPLIER[pool]) == {1, 3}, 'the pool should mix rich and poor clients'
  for j, client in enumerate(pool):
    # The valid rows walk the client's own data at its own batch: one pass
    # covers each of its samples exactly once.
    mine = metrics['ids'][:, j, :sizes[j]].ravel()
    np.testing.assert_array_equal(np.sort(mine), 40 * client + np.arange(STEPS * sizes[j]))
  stepwise = round_metrics(MULTIPLIER, one_program=False)[1]
  for name in metrics:
    np.testing.assert_array_equal(stepwise[name], metrics[name])


def test_equal_multipliers_make_the_plain_step():
  _, metrics = round_metrics(np.full(N, 2))
  assert metrics['ids'].shape == (STEPS, POOL, 2 * BATCH)
  assert (metrics['sizes'] == -1).all()


def test_steps_per_round_averages_each_clients_passes():
  config = config_lib.default_config()
  config.batch_size = 4
  counts = np.array([7, 9])
  # Without hetero: an average client's samples // batch_size, as always.
  assert train.steps_per_round(config, counts, np.ones(2, int)) == 8 // 4
  # Two rich clients (x4) with 400 samples, eight poor ones with 50:
  # mean(100, 100, 50 x 8) = 60 samples a base batch, 15 steps of 4.
  counts = np.array([400, 400] + [50] * 8)
  assert train.steps_per_round(config, counts, np.array([4, 4] + [1] * 8)) == 15
  config.steps_per_round = 3
  assert train.steps_per_round(config, counts, np.array([4, 4] + [1] * 8)) == 3


def hetero_config(**fields):
  config = config_lib.default_config()
  config.num_clients = 10
  config.batch_size = 2
  config.data.hetero = '0.2_0.8|4|0.8_0.2'   # clients 0 and 1 use batches of 8
  for name, value in fields.items():
    section, _, field = name.rpartition('__')
    setattr(config[section] if section else config, field, value)
  return config


def test_shared_queue_rule_counts_the_rich_batches():
  # 2 x (2 x 8 + 8 x 2) = 64 keys a step.
  config_checks.validate(hetero_config(moco__queue_size=64))
  with pytest.raises(config_checks.ConfigError, match='moco.queue_size.*64 keys'):
    config_checks.validate(hetero_config(moco__queue_size=63))
  # A pool of 3 holds at most both rich clients: 2 x (8 + 8 + 2) = 36.
  config_checks.validate(hetero_config(client_sample_ratio=0.3, moco__queue_size=36))
  with pytest.raises(config_checks.ConfigError, match='36 keys'):
    config_checks.validate(hetero_config(client_sample_ratio=0.3, moco__queue_size=35))


def test_per_client_queue_rule_uses_the_largest_batch():
  config_checks.validate(hetero_config(moco__feature_sharing=False, moco__queue_size=160))
  with pytest.raises(config_checks.ConfigError, match='at least 160'):
    config_checks.validate(hetero_config(moco__feature_sharing=False, moco__queue_size=159))


def test_each_client_needs_its_own_batch_of_data():
  config = hetero_config(moco__queue_size=64)
  config_checks.validate(config, samples_per_client=[8, 8] + [2] * 8)
  with pytest.raises(config_checks.ConfigError, match='client 1 holds 7 samples.*batch of 8'):
    config_checks.validate(config, samples_per_client=[8, 7] + [2] * 8)
  with pytest.raises(config_checks.ConfigError, match='client 9 holds 1 samples.*batch of 2:'):
    config_checks.validate(config, samples_per_client=[8, 8] + [2] * 7 + [1])


# The shared queue at its least, 64 keys, the tiny run's (tiny.py); a queue
# per client at its least, 16 keys a client.
@pytest.mark.parametrize('feature_sharing, queue_size', [(True, 64), (False, 160)])
def test_hetero_run_completes(tmp_path, monkeypatch, feature_sharing, queue_size):
  built = {}
  for module, name in ((step_lib, 'make_train_step'), (rounds, 'make_round')):
    def record(*args, _make=getattr(module, name), _name=name, **kwargs):
      built[_name] = kwargs
      return _make(*args, **kwargs)
    monkeypatch.setattr(module, name, record)
  # The tiny run's model, data and kNN settings: only the ragged rounds' programs
  # compile, the rest load from the session's cache. IID data, as hetero_config's.
  # Two steps a round: compiling dominates; test_steps_per_round_... covers the rule.
  config = tiny.config(**{
      'noniid_ratio': 1.0, 'num_rounds': 2, 'data.hetero': hetero_config().data.hetero,
      'moco.queue_size': queue_size, 'moco.feature_sharing': feature_sharing})
  summary = train.run(config, str(tmp_path))
  assert summary['steps'] == 4
  # The engine got the partition's multipliers, and a server batch for all
  # 10 clients' rows: 2 x 8 + 8 x 2.
  np.testing.assert_array_equal(built['make_round']['batch_multiplier'], [4, 4] + [1] * 8)
  # The clients' passes are 71 and 17 batches, odd, so the walk (which goes on
  # across rounds) puts some two-step round across two shuffles.
  assert built['make_round']['passes'] == 2
  assert built['make_train_step']['server_batch'] == 32
  assert np.isfinite(summary['final_knn_accuracy'])
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['loss'] for r in records if 'loss' in r]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
  partition = json.loads((tmp_path / 'partition.json').read_text())
  assert partition['share_by_batch_multiplier'].keys() == {'1', '4'}
