"""The step with remote rows (edge clients' smashed data) against the plain step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mocosfl_jax import train
from mocosfl_jax.models import split
from mocosfl_jax.sfl import fedavg, optim, rounds, state as state_lib, step as step_lib

import tiny
import twins

N, B, SIZE, QUEUE, LR, ROUNDS = 3, 2, 8, 16, 0.05, 7
TX = optim.sgd(0.9, 5e-4)
CLIENT = split.ClientNet(1, width=0.0625, depth=tiny.DEPTH)  # tiny.py's model
SERVER = split.ServerNet(1, width=0.0625, moco_version='smallV2', depth=tiny.DEPTH)
CLIENT_LR = lambda steps, rnd: optim.reference_client_cosine(LR, ROUNDS)(steps)
REMOTE = np.array([False, True, False])


def fixed_views(key, images):
  del key
  x = images.astype(jnp.float64) / 255.0 - 0.5
  return x, x[..., ::-1, :] * 0.9


@functools.cache
def engine(ragged: bool):
  step = step_lib.make_train_step(
      CLIENT, SERVER, TX, TX, fixed_views, temperature=0.1, ema_decay=0.99, client_impl='vmap',
      server_lr=optim.cosine_per_epoch(LR, ROUNDS), client_lr=CLIENT_LR,
      server_batch=N * B if ragged else None)
  return twins.quick_jit(step)


@functools.cache
def setup():
  """A float64 pool state with distinct clients, the images and their smashed data."""
  def init(key):
    return twins.distinct_pool(state_lib.init_state(
        key, CLIENT, SERVER, TX, TX, num_clients=N, image_size=SIZE, queue_size=QUEUE,
        feature_sharing=True))

  def smashed(state, images):
    """What each client computes: online on view 1, EMA (moved first) on view 2."""
    view1, view2 = fixed_views(None, images)
    forward = jax.vmap(lambda p, x: CLIENT.apply({'params': p}, x))
    ema = jax.tree.map(lambda e, o: 0.99 * e + 0.01 * o, state.clients.ema, state.clients.online)
    return forward(state.clients.online, view1), forward(ema, view2)

  with jax.enable_x64(True):
    state = twins.quick_jit(init)(jax.random.key(0))
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (N, B, SIZE, SIZE, 3),
                                                           np.uint8))
    return state, images, twins.quick_jit(smashed)(state, images)


@functools.partial(twins.quick_jit, static_argnums=3)
def client_update(state, images, grads, j):
  """Client j's SGD step from its smashed-data gradient, as an edge client takes it."""
  c = state.clients
  params, opt = jax.tree.map(lambda x: x[j], (c.online, c.opt))
  view1, _ = fixed_views(None, images[j])
  _, vjp = jax.vjp(lambda p: CLIENT.apply({'params': p}, view1), params)
  (client_grads,) = vjp(grads[j])
  opt = optim.with_learning_rate(opt, CLIENT_LR(c.steps[j], state.round))
  updates, _ = TX.update(client_grads, opt, params)
  return optax.apply_updates(params, updates)


def assert_trees(a, b, what, **tolerance):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=what, **tolerance)


def rows(tree, mask):
  return jax.tree.map(lambda x: np.asarray(x)[np.asarray(mask)], tree)


def test_no_remote_rows_is_the_plain_step_exactly():
  with jax.enable_x64(True):
    state, images, (online, ema) = setup()
    plain, plain_metrics = engine(False)(state, images, jax.random.key(0))
    remote = step_lib.RemoteRows(jnp.zeros(N, bool), online + 7.0, ema - 7.0)
    mixed, metrics, _ = engine(False)(state, images, jax.random.key(0), None, remote)
    assert_trees(mixed, plain, 'state', rtol=0, atol=0)
    assert_trees(metrics, plain_metrics, 'metrics', rtol=0, atol=0)


def test_remote_rows_give_the_plain_step_and_their_gradient():
  """Remote smashed data equal to the clients' own: the server side is the plain
  step's, and the returned gradient, applied by the client, is the plain update."""
  with jax.enable_x64(True):
    state, images, (online, ema) = setup()
    plain, plain_metrics = engine(False)(state, images, jax.random.key(0))
    # Rows that are not remote hold rubbish: only the marked ones may be read.
    mask = jnp.asarray(REMOTE)
    remote = step_lib.RemoteRows(mask, jnp.where(mask[:, None, None, None, None], online, 3.0),
                                 jnp.where(mask[:, None, None, None, None], ema, -3.0))
    mixed, metrics, grads = engine(False)(state, images, jax.random.key(0), None, remote)

    assert_trees(metrics, plain_metrics, 'metrics', rtol=1e-10)
    assert_trees((mixed.server, mixed.server_ema, mixed.server_opt, mixed.queue),
                 (plain.server, plain.server_ema, plain.server_opt, plain.queue), 'server',
                 rtol=1e-10, atol=1e-12)
    c = state.clients
    # The remote rows keep their state: their owners update themselves.
    assert_trees(rows((mixed.clients.online, mixed.clients.ema, mixed.clients.opt), REMOTE),
                 rows((c.online, c.ema, c.opt), REMOTE), 'remote rows', rtol=0, atol=0)
    assert_trees(rows(mixed.clients, ~REMOTE), rows(plain.clients, ~REMOTE), 'simulated rows',
                 rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(mixed.clients.steps, plain.clients.steps)

    # The client's own update from the returned gradient.
    j = int(np.flatnonzero(REMOTE)[0])
    assert_trees(client_update(state, images, grads, j),
                 jax.tree.map(lambda x: x[j], plain.clients.online), 'remote client update',
                 rtol=1e-9, atol=1e-12)


def test_a_dropped_remote_row_is_padding():
  """A remote client that did not answer (batch 0) changes nothing, whatever its rows hold."""
  with jax.enable_x64(True):
    state, images, (online, ema) = setup()
    sizes = jnp.asarray(np.where(REMOTE, 0, B), jnp.int32)
    plain, plain_metrics = engine(True)(state, images, jax.random.key(0), sizes)
    mask = jnp.asarray(REMOTE)
    remote = step_lib.RemoteRows(mask, online * 0 + 1e3, ema * 0 - 1e3)
    mixed, metrics, grads = engine(True)(state, images, jax.random.key(0), sizes, remote)
    assert int(metrics.pop('valid_rows')) == B * np.sum(~REMOTE)
    assert_trees(metrics, plain_metrics, 'metrics', rtol=1e-12)
    assert_trees((mixed.server, mixed.queue), (plain.server, plain.queue), 'server',
                 rtol=1e-12, atol=1e-14)
    assert not np.any(np.asarray(grads)[REMOTE])


def test_a_step_whose_rows_all_dropped_changes_nothing():
  """A pool of edge clients that all dropped out: no loss, no update, no NaN anywhere."""
  with jax.enable_x64(True):
    state, images, (online, ema) = setup()
    remote = step_lib.RemoteRows(jnp.ones(N, bool), online * 0 + 1e3, ema * 0 - 1e3)
    new, metrics, grads = engine(True)(state, images, jax.random.key(0), jnp.zeros(N, jnp.int32),
                                       remote)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((new, metrics, grads)))
    assert int(metrics['valid_rows']) == 0
    assert not np.any(np.asarray(grads))
    c = state.clients
    assert_trees((new.server, new.server_ema, new.server_opt, new.queue, new.clients.online,
                  new.clients.ema, new.clients.opt),
                 (state.server, state.server_ema, state.server_opt, state.queue, c.online, c.ema,
                  c.opt), 'state', rtol=0, atol=0)
    # The data walk goes on, as for a row that dropped out of a step with others.
    np.testing.assert_array_equal(new.clients.steps, c.steps + 1)


def test_a_sync_that_no_client_reported_to_keeps_the_last_average():
  rows = {'w': jnp.array([[1.0, 2.0], [3.0, 4.0]])}
  average = lambda weights: rounds.average_reported(fedavg.average_and_broadcast, rows,
                                                    jnp.asarray(weights))
  np.testing.assert_array_equal(average([0.0, 0.0])['w'], rows['w'])
  np.testing.assert_array_equal(average([0.0, 0.5])['w'], [[3.0, 4.0], [3.0, 4.0]])


def test_a_rounds_record_leaves_out_steps_without_rows():
  metrics = {'loss': np.array([0.0, 2.0, 4.0]), 'contrastive_accuracy': np.array([0.0, 0.5, 1.0]),
             'lr_server': np.array([0.5, 0.5, 0.5]), 'valid_rows': np.array([0, 3, 6])}
  assert train.round_record(metrics) == {'loss': 3.0, 'contrastive_accuracy': 0.75,
                                         'lr_server': 0.5, 'valid_rows': 3.0}
  empty = {**metrics, 'valid_rows': np.zeros(3, int)}
  assert train.round_record(empty) == {'loss': None, 'contrastive_accuracy': None,
                                       'lr_server': 0.5, 'valid_rows': 0.0}
