"""Rounds: pool sampling, per-client data order, FedAvg over exactly the pool, broadcast."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.sfl import moco, rounds
from mocosfl_jax.sfl.state import Clients, SimState

import twins

N, POOL, STEPS, BATCH, SAMPLES = 6, 3, 3, 2, 60

# Compiled, as a round runs it, and unoptimised: op by op, every operation of
# every shape compiled on its own, which cost these tests more than their checks.
sample_batches = twins.quick_jit(rounds.sample_batches, static_argnums=(5, 6),
                                 static_argnames=('passes',))


def make_state():
  w = jnp.arange(N, dtype=jnp.float32)[:, None] * jnp.ones((N, 4))
  clients = Clients(online={'w': w}, ema={'w': -w}, opt={'m': jnp.zeros((N, 4))},
                    steps=jnp.zeros((N,), jnp.int32))
  return SimState(server={}, server_ema={}, server_opt={}, clients=clients,
                  queue=moco.Queue(jnp.zeros((8, 2)), jnp.zeros((), jnp.int32)),
                  round=jnp.zeros((), jnp.int32), step=jnp.zeros((), jnp.int32))


def make_data():
  # Sample i's pixels all equal i, so a step can tell which samples it got.
  images = jnp.broadcast_to(jnp.arange(SAMPLES, dtype=jnp.uint8)[:, None, None, None],
                            (SAMPLES, 2, 2, 3))
  table = np.arange(SAMPLES, dtype=np.int32).reshape(N, SAMPLES // N)
  return rounds.ClientData(images, jnp.asarray(table), jnp.full((N,), SAMPLES // N, jnp.int32))


def fake_step(state, images, key):
  """Adds (pool row + 1) to each pool client's weights and 1 to its EMA; reports sample ids."""
  del key
  c = state.clients
  bump = jnp.arange(1, c.online['w'].shape[0] + 1, dtype=jnp.float32)[:, None]
  clients = c.replace(online={'w': c.online['w'] + bump}, ema={'w': c.ema['w'] + 1},
                      steps=c.steps + 1)
  return state.replace(clients=clients, step=state.step + 1), {'ids': images[:, :, 0, 0, 0]}


def run(average_ema=False, weighting='uniform', sync_every=2):
  run_round = (rounds.make_round(
      fake_step, num_clients=N, pool_size=POOL, steps=STEPS, batch_size=BATCH,
      sync_every=sync_every, average_ema=average_ema, weighting=weighting))
  key = jax.random.key(0)
  state = make_state()
  new_state, metrics = run_round(state, make_data(), key)
  pool = np.asarray(rounds.sample_pool(rounds.round_keys(key, 0)[1], N, POOL))
  return state, new_state, metrics, pool


def test_fedavg_averages_exactly_the_pool_and_broadcasts_to_all():
  _, new, _, pool = run()
  # Each step adds j + 1 to pool row j; FedAvg after steps 2 and 3 averages the
  # pool rows, so everyone ends at mean(pool's start) + 3 * mean(1..POOL).
  expected = np.mean(pool) + STEPS * np.mean(np.arange(1, POOL + 1))
  np.testing.assert_allclose(np.asarray(new.clients.online['w']), expected, rtol=1e-6)
  assert int(new.round) == 1 and int(new.step) == STEPS


def test_ema_is_per_client_and_untouched_outside_the_pool():
  old, new, _, pool = run()
  ema = np.asarray(new.clients.ema['w'][:, 0])
  start = -np.arange(N)
  others = np.setdiff1d(np.arange(N), pool)
  np.testing.assert_allclose(ema[pool], start[pool] + STEPS)
  np.testing.assert_allclose(ema[others], start[others])
  np.testing.assert_array_equal(np.asarray(new.clients.steps)[pool], STEPS)
  np.testing.assert_array_equal(np.asarray(new.clients.steps)[others], 0)


def test_average_ema_option_averages_the_pool_ema_too():
  _, new, _, pool = run(average_ema=True)
  np.testing.assert_allclose(np.asarray(new.clients.ema['w']), np.mean(-pool) + STEPS, rtol=1e-6)


def test_sync_period_in_steps():
  """With sync_every=2 of 3 steps, the pool is averaged after step 2 (and at the end) only."""
  def step_reporting_weights(state, images, key):
    state, metrics = fake_step(state, images, key)
    return state, {'w': state.clients.online['w'][:, 0]}
  run_round = rounds.make_round(step_reporting_weights, num_clients=N, pool_size=POOL,
                                steps=STEPS, batch_size=BATCH, sync_every=2)
  _, metrics = run_round(make_state(), make_data(), jax.random.key(0))
  after_step = np.asarray(metrics['w'])  # weights after each step, before its FedAvg
  assert np.ptp(after_step[0]) > 0 and np.ptp(after_step[1]) > 0
  # Step 3 started from the step-2 average, so its rows differ only by the bumps.
  np.testing.assert_allclose(after_step[2] - after_step[2][0], np.arange(POOL), rtol=1e-6)
  # Without the mid-round FedAvg, step 3's rows would still carry their distinct starts.
  _, metrics = (rounds.make_round(
      step_reporting_weights, num_clients=N, pool_size=POOL, steps=STEPS, batch_size=BATCH,
      sync_every=STEPS))(make_state(), make_data(), jax.random.key(0))
  assert not np.allclose(np.asarray(metrics['w'])[2] - np.asarray(metrics['w'])[2][0],
                         np.arange(POOL))


def test_each_client_trains_on_its_own_data_in_a_fresh_order():
  _, _, metrics, pool = run()
  ids = np.asarray(metrics['ids'])  # (STEPS, POOL, BATCH)
  table = np.arange(SAMPLES).reshape(N, -1)
  for j, client in enumerate(pool):
    mine = ids[:, j, :].ravel()
    assert set(mine) <= set(table[client]), f'client {client} got foreign samples'
    assert len(set(mine)) == len(mine), 'a client saw a sample twice within one pass'


def test_data_size_weighting():
  state = make_state()
  data = make_data()
  data = data.replace(counts=jnp.array([10, 1, 10, 1, 10, 1], jnp.int32))
  run_round = (rounds.make_round(
      fake_step, num_clients=N, pool_size=N, steps=1, batch_size=1, sync_every=1,
      weighting='data_size'))
  new, _ = run_round(state, data, jax.random.key(0))
  weights = np.array([10, 1, 10, 1, 10, 1]) / 33
  expected = np.sum(weights * (np.arange(N) + np.arange(1, N + 1)))
  np.testing.assert_allclose(np.asarray(new.clients.online['w']), expected, rtol=1e-6)


@pytest.mark.parametrize('pool_size', [1, 4, N])
def test_pool_is_drawn_without_replacement(pool_size):
  pool = np.asarray(rounds.sample_pool(jax.random.key(3), N, pool_size))
  assert len(pool) == pool_size == len(set(pool.tolist()))
  assert pool.min() >= 0 and pool.max() < N
  if pool_size == N:
    np.testing.assert_array_equal(pool, np.arange(N))


def test_short_client_takes_whole_batches_of_fresh_shuffles():
  # Client 0 holds 5 samples: batches of 2 give 2 per pass (one sample left
  # out each time) and 3 passes in 6 steps; client 1 holds 8: 4 steps a pass.
  table = jnp.array([[5, 6, 7, 8, 9, -1, -1, -1], [10, 11, 12, 13, 14, 15, 16, 17]], jnp.int32)
  counts = jnp.array([5, 8])
  assert rounds.passes_needed([5, 8], [2, 2], 6) == 3
  orders = set()
  for seed in range(4):
    sample = lambda passes: np.asarray(sample_batches(
        jax.random.key(seed), jnp.arange(2), table, counts, jnp.zeros(2, jnp.int32), 6, 2,
        passes=passes))
    ids = sample(3)
    assert ids.shape == (6, 2, 2)
    for first in (0, 2, 4):
      one_pass = ids[first:first + 2, 0].ravel()
      assert len(set(one_pass.tolist())) == 4 and set(one_pass.tolist()) < {5, 6, 7, 8, 9}
      orders.add(tuple(one_pass))
    assert sorted(ids[:4, 1].ravel().tolist()) == list(range(10, 18))
    # The default bound (one pass per step) draws the same batches.
    np.testing.assert_array_equal(ids, sample(None))
  assert len(orders) > 4  # passes are shuffled afresh


@pytest.mark.parametrize('count,steps', [(8, 3), (8, 6), (7, 3), (5, 2), (6, 3), (9, 4)])
def test_a_client_goes_on_where_its_last_round_stopped(count, steps):
  # Three rounds of `steps` batches of 2 are the first 3 * steps batches of
  # one walk: the position carries over, within a pass and across passes.
  table = jnp.where(jnp.arange(9) < count, jnp.arange(9), -1)[None]
  counts = jnp.array([count])
  passes = rounds.passes_needed([count], [2], steps)
  walk = lambda first, length, bound: np.asarray(sample_batches(
      jax.random.key(5), jnp.array([3]), table, counts, jnp.array([first]), length, 2,
      passes=bound))
  whole = walk(0, 3 * steps, None)
  rounds_ = np.concatenate([walk(r * steps, steps, passes) for r in range(3)])
  np.testing.assert_array_equal(rounds_, whole)
  per_pass = count // 2
  for p in range(3 * steps // per_pass):  # each complete pass: distinct samples
    one_pass = whole[p * per_pass:(p + 1) * per_pass].ravel()
    assert len(set(one_pass.tolist())) == 2 * per_pass


def test_passes_needed_is_the_most_any_round_touches():
  for per_pass in range(1, 13):
    for steps in range(1, 21):
      starts = np.arange(0, per_pass * steps, steps)  # every position a round starts at
      touched = (starts + steps - 1) // per_pass - starts // per_pass + 1
      assert rounds.passes_needed([2 * per_pass + 1], [2], steps) == touched.max(), (per_pass,
                                                                                     steps)


def test_data_order_follows_the_client_not_its_pool_position():
  table = jnp.arange(24, dtype=jnp.int32).reshape(3, 8)
  counts = jnp.array([8, 6, 7])
  taken = jnp.array([0, 5, 9])
  ids = sample_batches(jax.random.key(1), jnp.array([4, 0, 2]), table, counts, taken, 3, 2)
  swapped = sample_batches(jax.random.key(1), jnp.array([2, 0, 4]), table[::-1],
                           counts[::-1], taken[::-1], 3, 2)
  np.testing.assert_array_equal(ids, swapped[:, ::-1])
  other = sample_batches(jax.random.key(1), jnp.array([5, 0, 2]), table, counts, taken, 3, 2)
  assert not np.array_equal(ids[:, 0], other[:, 0])


def test_rounds_carry_each_clients_position():
  # Every client holds 10 samples, 5 batches of 2, and a round takes 3 steps:
  # the pool (everyone) sees 6 of 10 samples in round 1, the other 4 and the
  # start of a fresh shuffle in round 2.
  run_round = rounds.make_round(fake_step, num_clients=N, pool_size=N, steps=3, batch_size=2,
                                sync_every=3, passes=rounds.passes_needed([10] * N, [2] * N, 3))
  state, first = run_round(make_state(), make_data(), jax.random.key(0))
  _, second = run_round(state, make_data(), jax.random.key(0))
  walk = np.concatenate([np.asarray(first['ids']), np.asarray(second['ids'])])  # (6, N, 2)
  for client in range(N):
    one_pass = walk[:5, client].ravel().tolist()
    assert sorted(one_pass) == list(range(10 * client, 10 * client + 10))


def test_a_client_left_out_of_a_round_keeps_its_place():
  # Pools of 3 of 6 clients, rounds of 3 steps, 5 batches a pass: the batches
  # a client gets over the rounds it is drawn into are one unbroken walk.
  key, rounds_run = jax.random.key(2), 4
  run_round = rounds.make_round(fake_step, num_clients=N, pool_size=POOL, steps=3, batch_size=2,
                                sync_every=3, passes=rounds.passes_needed([10] * N, [2] * N, 3))
  state, data, seen = make_state(), make_data(), {c: [] for c in range(N)}
  for r in range(rounds_run):
    state, metrics = run_round(state, data, key)
    pool = np.asarray(rounds.sample_pool(rounds.round_keys(key, r)[1], N, POOL))
    for j, client in enumerate(pool):
      seen[client].append(np.asarray(metrics['ids'])[:, j])
  assert len({len(v) for v in seen.values()}) > 1  # some clients sat out more rounds
  for client, batches in seen.items():
    if not batches:
      continue
    walk = sample_batches(rounds.round_keys(key, 0)[0], jnp.array([client]),
                          data.table[client:client + 1], data.counts[client:client + 1],
                          jnp.zeros(1, jnp.int32), 3 * len(batches), 2)
    np.testing.assert_array_equal(np.concatenate(batches), np.asarray(walk)[:, 0])


def test_stepwise_round_equals_one_program_round():
  results = []
  for one_program in (True, False):
    run_round = rounds.make_round(fake_step, num_clients=N, pool_size=POOL, steps=STEPS,
                                  batch_size=BATCH, sync_every=2, one_program=one_program)
    state, metrics = run_round(make_state(), make_data(), jax.random.key(7))
    results.append((state, metrics))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
