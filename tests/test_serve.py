"""The server's round with edge clients, against the pure simulation, through an in-process hub.

The fake hub plays each edge client with the JAX client model (what an edge
client computes, written out here: views, EMA, forward, backward, SGD), so
these tests need no gRPC and no LiteRT; tests/test_edge_runtime.py runs the
real processes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mocosfl_jax import serve, train
from mocosfl_jax.config_checks import ConfigError
from mocosfl_jax.data import augment, sources
from mocosfl_jax.export import client as client_lib
from mocosfl_jax.sfl import optim, rounds

import tiny
import twins

# Pools of 3 of the 6 clients: round 0 draws {0, 1, 2}, round 1 {1, 2, 5}, so
# client 0 plays in round 0 only and client 5, which left round 0 with the
# broadcast average, in round 1 only.
EDGE = (0, 5)
ROUNDS = 2
# The tiny model at the default rate (0.06) is chaotic: in the pure simulation,
# noise of 1e-6 (relative) on the initial server parameters moves round 1's
# losses by 4e-2, so the float32 rounding of two differently fused programs
# (1e-7 relative, up to 1e-5 on near-zero leaves) grows into percent-level
# differences. In float64 the run with edge clients equals the simulation to
# 1e-15 over four rounds. At rate 1e-3, 1e-7 noise moves the losses by 1.4e-6
# and the server parameters by 5e-6; the two runs then differ by 1e-6 in the
# losses and 5e-6 in the parameters, while a client that restarts its
# momentum at an average, or misses the round's last average, moves round 1's
# losses by more than 1e-5. A loss is a logsumexp of logits up to
# 1 / temperature = 10 less the positive one, so its rounding is absolute: a
# few ulps of 10 (1e-6 each).
LOSS_ATOL = 1e-5
# A tenth of the norm: rounding moves a momentum by 1e-3 to 1.3e-2 of it (below).
MOMENTUM_RTOL = 0.1
RTOL, ATOL = 1e-5, 2e-5


def config(**changes):
  return tiny.config(**{'num_clients': 6, 'client_sample_ratio': 0.5, 'steps_per_round': 3,
                        'sync_every': 2, 'moco.augmentation': 'none', 'round_impl': 'loop',
                        'optim.lr': 1e-3, **changes})


class FakeHub:
  """EdgeHub's interface, with each client's side computed in process."""

  def __init__(self, exp, drops=()):
    c = exp.config
    net, tx = exp.client_net, exp.client_tx
    lr = optim.learning_rates(c)[1]
    decay = c.moco.ema_decay
    mean, std = sources.normalization(c.data.name, exp.train.images)
    apply = lambda params, view: net.apply({'params': params}, view)

    # Compiled (unoptimised): run op by op, each operation would compile on its own.
    @twins.quick_jit
    def forward(online, ema, images):
      view = augment.normalize(images, mean, std)
      ema = optax.incremental_update(online, ema, 1.0 - decay)
      return apply(online, view), apply(ema, view), ema

    @twins.quick_jit
    def update(online, opt, images, grad, steps, round_index):
      _, vjp = jax.vjp(lambda p: apply(p, augment.normalize(images, mean, std)), online)
      (g,) = vjp(grad)
      opt = optim.with_learning_rate(opt, lr(steps, round_index))
      updates, opt = tx.update(g, opt, online)
      return optax.apply_updates(online, updates), opt

    self.forward, self.update, self.tx = forward, update, tx
    self.shares = {str(i): exp.train.images[np.asarray(exp.partition.client_indices[i])]
                   for i in EDGE}
    self.drops = set(drops)  # (round, step, client_id) that do not answer
    self.dropped, self.clients, self.welcome, self.log = [], {}, None, []

  def set_welcome(self, fn, round=None):
    del round
    # Every client connects at the start, as the exported model (its EMA too).
    self.welcome = fn
    for cid in self.shares:
      self._client(cid)

  def wait_connected(self, client_ids, timeout_s):
    del timeout_s
    return set(client_ids)

  def drain_drops(self):
    dropped, self.dropped = self.dropped, []
    return dropped

  def _client(self, cid):
    if cid not in self.clients:
      online = client_lib.unflatten(
          {n[len(serve.ONLINE):]: jnp.asarray(v) for n, v in self.welcome(cid).items()})
      self.clients[cid] = dict(online=online, ema=online, opt=self.tx.init(online), steps=0)
    return self.clients[cid]

  def smashed(self, round, step, requests, shape, frozen=False):
    replies = {}
    for cid, ids in requests.items():
      self.log.append(('smashed', round, step, cid, frozen))
      if (round, step, cid) in self.drops:
        self.dropped.append({'client_id': cid, 'round': round, 'step': step, 'reason': 'test'})
        continue
      c = self._client(cid)
      c['images'] = self.shares[cid][ids]
      online, ema, new_ema = self.forward(c['online'], c['ema'], c['images'])
      if frozen:  # the EMA of a constant model is that model
        ema = online
      else:
        c['ema'] = new_ema
      replies[cid] = (np.asarray(online), np.asarray(ema))
      assert online.shape == tuple(shape)
    return replies

  def gradients(self, round, step, grads):
    for cid, grad in grads.items():
      self.log.append(('gradients', round, step, cid))
      c = self.clients[cid]
      c['online'], c['opt'] = self.update(c['online'], c['opt'], c['images'], grad, c['steps'],
                                          round)
      c['steps'] += 1

  def weights(self, round, client_ids):
    self.log.append(('weights', round, None, tuple(client_ids)))
    return {cid: {serve.ONLINE + n: np.asarray(v) for n, v in
                  client_lib.flatten(self.clients[cid]['online']).items()}
            for cid in client_ids if cid in self.clients}

  def average(self, round, client_ids, weights):
    self.log.append(('average', round, None, tuple(client_ids)))
    for cid in client_ids:
      self._client(cid)['online'] = client_lib.unflatten(
          {n[len(serve.ONLINE):]: jnp.asarray(v) for n, v in weights.items()})


@functools.cache
def experiments(**changes):
  """(the pure simulation, the run with edge clients, its runtime), built once."""
  plain = train.build(config(**changes))
  runtime = serve.EdgeRuntime(None, EDGE)
  edge = train.build(config(**changes), runtime)
  runtime.attach(edge)
  return plain, edge, runtime


def run_rounds(exp, runtime=None, rounds=ROUNDS):
  state = exp.init_state(jax.random.key(0))
  if runtime is not None:
    runtime.start(state)
  data = exp.client_data()
  losses = []
  for _ in range(rounds):
    state, metrics = exp.run_round(state, data, jax.random.key(1))
    losses.append(np.asarray(metrics['loss']))
  return state, np.concatenate(losses)


def pool(round_index):
  _, k_pool, _ = rounds.round_keys(jax.random.key(1), round_index)
  return {int(i) for i in rounds.sample_pool(k_pool, 6, 3)}


@pytest.fixture(scope='module')
def runs():
  """(the simulation's state and losses, the edge run's, its hub): two rounds of each, once."""
  plain, edge, runtime = experiments()
  runtime.hub = hub = FakeHub(edge)
  return run_rounds(plain), run_rounds(edge, runtime), hub, runtime.round_record()


def assert_trees(a, b, what):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL, err_msg=what)


def assert_close_in_norm(a, b, what):
  """Leaf by leaf, |a - b| <= MOMENTUM_RTOL |b| (norms).

  A momentum sums raw gradients, not scaled by the small rate, and a gradient,
  unlike a loss, is not continuous in the parameters (ReLU kinks): float32
  rounding moves client 5's round-1 momentum by 1e-3 of its norm compiled
  optimised, 1.3e-2 unoptimised (the suite's programs, conftest.py), where in
  float64 the two runs' momenta agree to 1e-14. A momentum restarted or not
  kept is off by its whole norm.
  """
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.linalg.norm(x - y) <= MOMENTUM_RTOL * np.linalg.norm(y) + ATOL, what


def test_the_pools_hold_edge_clients_in_and_out():
  assert [pool(r) & set(EDGE) for r in range(ROUNDS)] == [{0}, {5}]


def test_edge_clients_give_the_simulations_numbers(runs):
  (expected, expected_losses), (state, losses), hub, record = runs
  asked = {(entry[1], entry[3]) for entry in hub.log if entry[0] == 'smashed'}
  assert asked == {(0, '0'), (1, '5')}
  np.testing.assert_allclose(losses, expected_losses, rtol=0, atol=LOSS_ATOL)
  assert_trees(state.server['params'], expected.server['params'], 'server')
  assert_trees(state.queue.keys, expected.queue.keys, 'queue')
  assert_trees(state.clients.online, expected.clients.online, 'clients')
  # Every edge client, in the pool or not, ends each round with its average,
  # and keeps its own EMA and momentum as the simulation keeps its rows.
  for cid in hub.clients:
    row = lambda tree: jax.tree.map(lambda x: x[int(cid)], tree)
    assert_trees(hub.clients[cid]['online'], row(expected.clients.online), f'edge {cid}')
    assert_trees(hub.clients[cid]['ema'], row(expected.clients.ema), f'edge {cid} EMA')
    assert_close_in_norm(hub.clients[cid]['opt'], row(expected.clients.opt), f'edge {cid} momentum')
    assert hub.clients[cid]['steps'] == int(expected.clients.steps[int(cid)])
  assert record == {'edge_drops': 0, 'edge_dropped': []}


def test_a_dropped_client_is_absent_and_recorded():
  _, edge, runtime = experiments()
  cid = str(next(i for i in sorted(pool(0)) if i in EDGE))
  runtime.hub = hub = FakeHub(edge, drops={(0, 0, cid)})
  state, losses = run_rounds(edge, runtime, rounds=1)
  assert np.all(np.isfinite(losses))
  record = runtime.round_record()
  assert record['edge_drops'] == 1
  assert record['edge_dropped'][0]['client_id'] == cid
  # Its gradients of the other steps went back, none for the dropped one.
  assert hub.clients[cid]['steps'] == config().steps_per_round - 1


def test_frozen_edge_clients_send_only_smashed_data():
  """TAResSFL (client rate 0): no gradient goes down, no weights up, no average down."""
  _, edge, runtime = experiments(**{'optim.client_lr': 0.0})
  runtime.hub = hub = FakeHub(edge)
  start = edge.init_state(jax.random.key(0))
  state, losses = run_rounds(edge, runtime, rounds=1)
  assert {entry[0] for entry in hub.log} == {'smashed'}
  assert all(entry[4] for entry in hub.log)  # every request says frozen
  assert np.all(np.isfinite(losses))
  moved = [np.any(np.asarray(a) != np.asarray(b)) for a, b in
           zip(jax.tree.leaves(state.server['params']), jax.tree.leaves(start.server['params']))]
  assert any(moved)


@pytest.mark.parametrize('text', ['1,x', '6', '1,1', ''])
def test_bad_edge_client_lists_are_one_line_errors(text):
  with pytest.raises(ConfigError, match='--edge_clients'):
    serve.parse_ids(text, 6)
