"""A round: sample the pool, gather its rows, scan the steps with FedAvg, scatter back.

A round is the reference's epoch: the pool is drawn once, every pool client
takes its next batches from an endless walk through shuffles of its own data
(continued across rounds), and the online client models are averaged over the
pool every ``sync_every`` steps and after the last step, then broadcast to all
clients (spec 4.2, 4.7, 9.21). The whole round is one compiled program; the
host passes only the state, the data arrays and a key.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mocosfl_jax import compilation
from mocosfl_jax.sfl import fedavg
from mocosfl_jax.sfl.state import SimState
from mocosfl_jax.sfl.step import RemoteRows


@flax.struct.dataclass
class ClientData:
  """Device-resident training data and the partition.

  On a mesh the images lie client by client (sharding.Layout.client_images)
  and the table holds their rows; either way ``images[table[c, k]]`` is
  client c's k-th image.
  """
  images: jax.Array  # uint8 (num_samples, H, W, 3), or (num_clients * slots, ...) on a mesh
  table: jax.Array   # int32 (num_clients, max_samples): rows of images, -1 padded
  counts: jax.Array  # int32 (num_clients,)


def sample_pool(key: jax.Array, num_clients: int, pool_size: int) -> jax.Array:
  """All clients in order without sampling, else a random subset without replacement."""
  if pool_size == num_clients:
    return jnp.arange(num_clients)
  return jax.random.choice(key, num_clients, (pool_size,), replace=False)


def round_keys(key: jax.Array, round_index) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A round's (data order, pool, steps) keys from the run's key.

  The data-order key is the same every round, so that a client's walk through
  its data goes on where its last round left it.
  """
  k_order, key = jax.random.split(key)
  k_pool, k_steps = jax.random.split(jax.random.fold_in(key, round_index))
  return k_order, k_pool, k_steps


def sample_batches(key: jax.Array, clients: jax.Array, table: jax.Array, counts: jax.Array,
                   taken: jax.Array, steps: int, batch_size: int,
                   batch_sizes: jax.Array | None = None, passes: int | None = None) -> jax.Array:
  """(steps, n, B) sample ids: the next ``steps`` batches of each client's endless walk.

  As the reference's per-client loaders do (spec 2.3 item 5), a client walks
  through its own data in whole batches (``count // size`` a pass; the
  shuffle's remainder is skipped), starts a fresh shuffle when a pass runs out,
  and goes on where it stopped the next time it is sampled. Client
  ``clients[j]`` has taken ``taken[j]`` batches so far; its pass ``p`` is
  shuffled with ``fold_in(fold_in(key, clients[j]), p)``, so ``key`` must stay
  the same for the whole run. ``passes`` bounds the shuffles one call may
  touch (default ``steps``, always enough; :func:`passes_needed` gives the
  least that is enough when every round has ``steps`` steps). ``batch_sizes``
  (n,) gives each client its own batch (ragged batches, at most
  ``batch_size``): client j's step takes ``batch_sizes[j]`` samples into its
  first rows, and its remaining rows repeat samples that the step then
  ignores.
  """
  if batch_sizes is None:
    batch_sizes = jnp.full(table.shape[0], batch_size)
  passes = steps if passes is None else passes

  def one_client(client, row, count, size, first):
    per_pass = jnp.maximum(count // size, 1)
    first_pass = first // per_pass
    client_key = jax.random.fold_in(key, client)
    noise = jax.vmap(lambda p: jax.random.uniform(jax.random.fold_in(client_key, p), row.shape))(
        first_pass + jnp.arange(passes))
    orders = jnp.argsort(jnp.where(jnp.arange(row.shape[0]) < count, noise, 2.0), axis=1)
    batch = first + jnp.arange(steps)[:, None]
    which = jnp.minimum(batch // per_pass - first_pass, passes - 1)
    within = (batch % per_pass) * size + jnp.arange(batch_size)
    return row[orders[which, within % jnp.maximum(count, 1)]]
  ids = jax.vmap(one_client)(clients, table, counts, batch_sizes, taken)
  return ids.transpose(1, 0, 2)


def passes_needed(counts: Sequence[int], batch_sizes: Sequence[int], steps: int) -> int:
  """The most shuffles any client's round of ``steps`` batches can touch.

  Rounds start at multiples of ``steps`` in a client's walk, so within a pass
  of ``per_pass`` batches they start at multiples of gcd(steps, per_pass); the
  latest start leaves per_pass - gcd batches before the pass ends.
  """
  per_pass = np.maximum(np.asarray(counts) // np.asarray(batch_sizes), 1)
  latest = per_pass - np.gcd(per_pass, steps)
  return int(np.max((latest + steps - 1) // per_pass + 1))


def most_rows(batch_sizes: Sequence[int], pool_size: int) -> int:
  """The most valid rows one step can have: the sum of the pool_size largest client batches."""
  return int(np.sort(np.asarray(batch_sizes))[::-1][:pool_size].sum())


def gather(state: SimState, pool: jax.Array) -> SimState:
  """The state with its per-client fields narrowed to the pool's rows."""
  take = lambda tree: jax.tree.map(lambda x: x[pool], tree)
  queue = take(state.queue) if state.queue.per_client else state.queue
  return state.replace(clients=take(state.clients), queue=queue)


def scatter(state: SimState, pool: jax.Array, pooled: SimState) -> SimState:
  """Writes the pool's rows back into the full state."""
  put = lambda full, rows: jax.tree.map(lambda x, r: x.at[pool].set(r), full, rows)
  queue = put(state.queue, pooled.queue) if state.queue.per_client else pooled.queue
  return pooled.replace(clients=put(state.clients, pooled.clients), queue=queue)


def make_round(train_step: Callable, *, num_clients: int, pool_size: int, steps: int,
               batch_size: int, sync_every: int, average_ema: bool = False,
               weighting: str = 'uniform', one_program: bool = True,
               batch_multiplier: Sequence[int] | None = None,
               passes: int | None = None, frozen_clients: bool = False,
               layout=None, exchange=None) -> Callable:
  """Builds ``run_round(state, data, key) -> (state, per-step metrics)``, compiled.

  ``batch_multiplier`` (num_clients,) gives client i the batch
  ``batch_size * batch_multiplier[i]`` (heterogeneous clients). When the
  batches differ, every pool client gets the largest batch's rows and the step
  is told each one's own batch (``train_step(state, images, key, batch_sizes)``,
  see sfl/step.py); equal batches make the plain ``train_step(state, images, key)``.

  ``passes`` bounds the shuffles of its data a client's round may touch
  (:func:`sample_batches`); a client that needs more reuses the last one.
  ``None`` means one per step, always enough but a shuffle of every client's
  data per step: pass :func:`passes_needed` of the partition, as train.build
  does. A client's position in its data is its step count, ``clients.steps``,
  so ``train_step`` must add one to it for every pool client.

  ``one_program=True`` scans the steps inside a single compiled program, so an
  accelerator never waits on the host within a round. ``False`` dispatches one
  compiled step after another from the host (asynchronously): XLA:CPU runs a
  step inside a loop body about 10x slower than the same step on its own
  (README, "Performance"), so this is the faster choice on CPU. Both give the
  same numbers.

  ``frozen_clients`` (a client rate of 0, the step built with it too): every
  client holds the same model, which never changes, so no FedAvg runs and
  nothing is broadcast (the reference still averages, spec 9.18).

  ``layout`` (a :class:`mocosfl_jax.sharding.Layout`, None on one device)
  keeps the state split over the mesh's client axis and the pool's rows (its
  state and its images) split over the same axis while the round runs; pass
  the state placed by ``layout.place`` and the data by ``train.Experiment.client_data``.

  ``exchange`` (edge clients, mocosfl_jax/serve.py) plays some clients from
  other processes; the round then runs step by step on the host, whatever
  ``one_program`` says, and the step must take ``remote`` (sfl/step.py).
  ``exchange.round(round_index, pool, state)`` gives the round's exchange,
  whose ``index`` (R,) holds the pool rows of remote clients, padded with the
  pool size (R fixed for the run, so one program serves every round). Each
  step it is asked for their smashed data, ``smashed(step, sample_ids (R, B))
  -> (online, ema (R, B, ...), answered (R,) bool)``; a remote client that did
  not answer gets batch size 0. Its ``gradients(step, grads (R, B, ...),
  answered)`` sends their gradient slices back; at a sync, ``weights() ->
  (online rows (R, ...), reported (R,) bool)`` collects their models, FedAvg
  averages the clients that reported (:func:`average_reported`), and
  ``average(mean)`` sends the result down. A step with no valid row left
  changes nothing but the step counts (sfl/step.py). Only the R rows cross
  between the host and the device.
  """
  keep = layout.constrain if layout is not None else lambda tree: tree
  keep_rows = layout.constrain_rows if layout is not None else lambda x: x
  # The pool is every client in order: its rows are the state's own, and
  # gathering and scattering them would copy (on a mesh, all-gather) them all.
  everyone = pool_size == num_clients

  def synchronise(clients, weights):
    online = fedavg.average_and_broadcast(clients.online, weights)
    ema = fedavg.average_and_broadcast(clients.ema, weights) if average_ema else clients.ema
    return clients.replace(online=online, ema=ema)

  client_batches = batch_size * np.ones(num_clients, np.int32)
  if batch_multiplier is not None:
    client_batches = client_batches * np.asarray(batch_multiplier, np.int32)
  rows = int(client_batches.max())
  ragged = int(client_batches.min()) != rows

  def begin(state: SimState, data: ClientData, key: jax.Array):
    k_order, k_pool, k_steps = round_keys(key, state.round)
    pool = sample_pool(k_pool, num_clients, pool_size)
    counts = data.counts[pool]
    batch_sizes = jnp.asarray(client_batches)[pool] if ragged else None
    # Every pool client takes one batch a step, so its step count is its position.
    batches = sample_batches(k_order, pool, data.table[pool], counts, state.clients.steps[pool],
                             steps, rows, batch_sizes, passes)
    if weighting == 'data_size':
      weights = counts / jnp.sum(counts)
    else:
      weights = jnp.full((pool_size,), 1.0 / pool_size)
    pooled = keep(state if everyone else gather(state, pool))
    return pooled, pool, batches, batch_sizes, weights, jax.random.split(k_steps, steps)

  def step(pooled, images, batch_sizes, weights, index, step_key):
    ragged_args = () if batch_sizes is None else (batch_sizes,)
    pooled, metrics = train_step(pooled, keep_rows(images), step_key, *ragged_args)
    pooled = keep(pooled)
    if frozen_clients:
      return pooled, metrics
    sync = ((index + 1) % sync_every == 0) | (index == steps - 1)
    clients = lax.cond(sync, synchronise, lambda c, w: c, pooled.clients, weights)
    return pooled.replace(clients=clients), metrics

  def finish(state: SimState, pool: jax.Array, pooled: SimState) -> SimState:
    state = keep(pooled if everyone else scatter(state, pool, pooled))
    if frozen_clients:
      return state.replace(round=state.round + 1)
    # The round ends with a FedAvg, and its result goes to every client,
    # sampled or not; pool row 0 holds the average.
    broadcast = lambda full, rows: jax.tree.map(
        lambda x, r: jnp.broadcast_to(r[0], x.shape), full, rows)
    clients = state.clients.replace(online=broadcast(state.clients.online, pooled.clients.online))
    if average_ema:
      clients = clients.replace(ema=broadcast(state.clients.ema, pooled.clients.ema))
    return keep(state.replace(clients=clients, round=state.round + 1))

  if one_program:
    def run_round(state: SimState, data: ClientData, key: jax.Array):
      pooled, pool, batches, batch_sizes, weights, keys = begin(state, data, key)
      pooled, metrics = lax.scan(
          lambda p, xs: step(p, data.images[xs[1]], batch_sizes, weights, xs[0], xs[2]),
          pooled, (jnp.arange(steps), batches, keys))
      return finish(state, pool, pooled), metrics
    return compilation.jit(run_round, donate_argnums=0)

  begin_jit = jax.jit(begin)
  step_jit = compilation.jit(lambda p, images, ids, sizes, w, i, k: step(p, images[ids], sizes, w, i, k),
                     donate_argnums=0)
  finish_jit = jax.jit(finish, donate_argnums=0)

  if exchange is not None:
    return _round_with_exchange(
        exchange, train_step, begin_jit, finish_jit, synchronise, keep, keep_rows,
        pool_size=pool_size, steps=steps, sync_every=sync_every, rows=client_batches,
        frozen_clients=frozen_clients)

  def run_round_stepwise(state: SimState, data: ClientData, key: jax.Array):
    pooled, pool, batches, batch_sizes, weights, keys = begin_jit(state, data, key)
    metrics = []
    for i in range(steps):
      pooled, m = step_jit(pooled, data.images, batches[i], batch_sizes, weights, np.int32(i),
                           keys[i])
      metrics.append(m)
    return finish_jit(state, pool, pooled), jax.tree.map(lambda *m: jnp.stack(m), *metrics)
  return run_round_stepwise


def average_reported(synchronise: Callable, clients, weights: jax.Array):
  """FedAvg (``synchronise``) of the pool rows with positive ``weights``, normalised.

  With none (a pool of edge clients none of which reported) there is nothing
  to average: every row keeps what it holds, the last average it was sent.
  """
  total = jnp.sum(weights)
  averaged = synchronise(clients, weights / jnp.where(total > 0, total, 1.0))
  return jax.tree.map(lambda new, old: jnp.where(total > 0, new, old), averaged, clients)


def _round_with_exchange(exchange, train_step: Callable, begin_jit: Callable, finish_jit: Callable,
                         synchronise: Callable, keep: Callable, keep_rows: Callable, *,
                         pool_size: int, steps: int, sync_every: int, rows: np.ndarray,
                         frozen_clients: bool) -> Callable:
  """``make_round``'s round with remote clients (its ``exchange``), step by step on the host."""
  def full_rows(index, values, fill):
    """(R, ...) rows at pool rows ``index`` of a (pool_size, ...) array of ``fill``."""
    return jnp.full((pool_size,) + values.shape[1:], fill, values.dtype).at[index].set(
        values, mode='drop')

  def remote_step(pooled, images, ids, sizes, index, online, ema, answered, key):
    mask = full_rows(index, jnp.ones_like(answered), False)
    remote = RemoteRows(mask, full_rows(index, online, 0), full_rows(index, ema, 0))
    # A remote client that did not answer is absent: its rows are padding.
    sizes = jnp.where(full_rows(index, ~answered, False), 0, sizes)
    pooled, metrics, grads = train_step(pooled, keep_rows(images[ids]), key, sizes, remote)
    grads = None if grads is None else grads[jnp.minimum(index, pool_size - 1)]
    return keep(pooled), metrics, grads

  def remote_sync(pooled, index, online, reported, weights):
    """The remote clients' models in their rows, then FedAvg over the clients that reported."""
    put = lambda full, part: full.at[index].set(
        jnp.where(reported.reshape(reported.shape + (1,) * (part.ndim - 1)), part,
                  full[jnp.minimum(index, pool_size - 1)]), mode='drop')
    clients = pooled.clients.replace(
        online=jax.tree.map(put, pooled.clients.online, online))
    present = full_rows(index, reported, True)
    return keep(pooled.replace(clients=average_reported(synchronise, clients,
                                                        jnp.where(present, weights, 0.0))))

  step_jit = compilation.jit(remote_step, donate_argnums=0)
  sync_jit = jax.jit(remote_sync, donate_argnums=0)
  first_row = jax.jit(lambda tree: jax.tree.map(lambda x: x[0], tree))

  def run_round(state: SimState, data: ClientData, key: jax.Array):
    pooled, pool, batches, _, weights, keys = begin_jit(state, data, key)
    pool_rows = np.asarray(pool)
    session = exchange.round(int(state.round), pool_rows, state)
    index = np.asarray(session.index, np.int32)
    sizes = jnp.asarray(rows[pool_rows])
    batches = np.asarray(batches)
    metrics = []
    for i in range(steps):
      online, ema, answered = session.smashed(i, batches[i][np.minimum(index, pool_size - 1)])
      pooled, m, grads = step_jit(pooled, data.images, batches[i], sizes, index, online, ema,
                                  np.asarray(answered), keys[i])
      metrics.append(m)
      if frozen_clients:
        continue
      session.gradients(i, np.asarray(grads), answered)
      if (i + 1) % sync_every == 0 or i == steps - 1:
        remote_online, reported = session.weights()
        pooled = sync_jit(pooled, index, remote_online, np.asarray(reported), weights)
        session.average(first_row(pooled.clients.online))
    return finish_jit(state, pool, pooled), jax.tree.map(lambda *m: jnp.stack(m), *metrics)
  return run_round
