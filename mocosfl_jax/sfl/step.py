"""One MocoSFL training step for the sampled pool, as a pure function.

The order follows the reference exactly (spec 4.3 and 11): online client
forward; client EMA update; EMA client forward on view 2; server EMA update;
both loss terms against the pre-step queue; enqueue; server and client updates.
No Python loop over clients: the pool's client models are one stacked pytree.

Ragged batches (heterogeneous clients, spec 2.5 and 9.20) keep the program
rectangular: every pool client gets the largest client batch B_max of rows,
and row r of client j is valid iff r < its own batch. The server only sees the
valid rows, gathered to the front of a batch of ``server_batch`` rows; the
loss, the accuracy and the queue use the valid rows only, so padding changes
nothing but the compute. That compute is wasted on the client side (augmenting
and forwarding n * B_max rows where fewer are valid: 60% of the client rows
for "0.2_0.8|4|0.8_0.2", 75% for "0.2_0.8|16|0.8_0.2"), and on the server side
when a sampled pool holds fewer rich clients than ``server_batch`` allows (it
must allow the worst case: a pool of 100 of 500 clients under
"0.2_0.8|16|0.8_0.2" holds 400 valid rows per B on average, but the server
forwards 1600).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax

from mocosfl_jax.compilation import materialize
from mocosfl_jax.privacy import ressfl as ressfl_lib
from mocosfl_jax.sfl import moco, optim, state as state_lib
from mocosfl_jax.sfl.state import SimState


@flax.struct.dataclass
class RemoteRows:
  """The pool rows whose smashed data comes from clients outside the program.

  ``mask`` (n,) bool marks them; ``online`` and ``ema`` (n, B, ...) hold their
  smashed data of view 1 (online model) and view 2 (EMA model), and anything
  (zeros) in the other rows. A remote client that did not answer is a remote
  row with batch size 0 (``batch_sizes``), so its rows are padding.
  """
  mask: jax.Array
  online: jax.Array
  ema: jax.Array


def batched_client_apply(client_net, impl: str) -> Callable:
  """f(stacked_params, x[n, B, ...]) -> smashed[n, B, ...] for every pool client at once.

  'vmap' vectorises over per-client weights (convs become grouped convs, or
  batched matmuls when the client model was built with ``as_matmul``); 'map'
  runs a native conv per client inside one compiled loop. Which is fastest
  depends on the backend and cut layer (experiments/benchmark.py).
  """
  def apply(params, x):
    return client_net.apply({'params': params}, x)
  if impl == 'map':
    return lambda params, x: lax.map(lambda px: apply(*px), (params, x))
  if impl == 'vmap':
    return jax.vmap(apply)
  raise ValueError(f"client implementation {impl!r}: use 'vmap' or 'map'")


def server_apply(server_net, variables, x, mask=None):
  """Server forward in training mode; returns (output, variables with new batch stats).

  ``mask`` (rows,) keeps padding rows out of a BatchNorm head's statistics.
  """
  kwargs = {} if mask is None else {'mask': mask}
  if 'batch_stats' in variables:
    out, updates = server_net.apply(variables, x, mutable=['batch_stats'], **kwargs)
    return out, {**variables, **updates}
  return server_net.apply(variables, x, **kwargs), variables


def make_train_step(client_net, server_net, server_tx, client_tx, augment, *,
                    temperature: float, ema_decay: float, client_impl: str,
                    server_lr: Callable, client_lr: Callable,
                    server_batch: int | None = None, symmetric: bool = True,
                    frozen_clients: bool = False, ressfl: ressfl_lib.ResSFL | None = None):
  """Builds ``train_step(state, images, key, batch_sizes=None, remote=None) -> (state, metrics)``.

  ``state`` is a SimState whose per-client fields hold the pool's rows only;
  ``images`` is uint8 (n, B, H, W, 3), row j belonging to pool client j.
  ``server_lr(round)`` and ``client_lr(client_steps, round)`` give the rates.

  ``batch_sizes`` (n,) int makes the batches ragged: pool client j uses only
  its first ``batch_sizes[j]`` rows of ``images`` (module docstring). Then the
  server forwards ``server_batch`` rows, which must be at least the most valid
  rows a step can have (all n * B when None). Without ``batch_sizes`` the step
  has no masks at all.

  ``symmetric=False`` is the loss the reference uses with the V1 head (spec
  1.6 names the switch, not its details; this is plain MoCo's): term 1 only,
  whose accuracy is logged, and only the key view's nB keys enqueued.

  ``frozen_clients`` (TAResSFL's stage 2, a client rate of 0, spec 6.4): the
  clients only run forward passes; they compute no backward (the reference
  does, and sends the gradients), take no optimiser step, and their EMA model
  is their online model (which the state must start with, spec 9.18). Their
  step counts still advance: they place each client in its data.

  ``ressfl`` (spec 6.3): each pool client's simulated attacker in
  ``clients.attacker`` takes one step on the client's query smashed data, and
  the gradient of its regulariser joins the client's slice of the server's
  gradient (privacy/ressfl.py). With ``ressfl.alpha`` 0 the attackers train
  and everything else is the plain step's.

  ``remote`` (:class:`RemoteRows`, edge clients, mocosfl_jax/serve.py): the
  marked rows' smashed data replaces what the program computes for them, and
  the step returns ``(state, metrics, smashed_grads)``: dL/d(view-1 smashed
  data), (n, B, ...), whose marked rows go back to their clients (None with
  ``frozen_clients``). The marked rows' online, EMA and optimiser state (and
  attacker) stay as they were: their owners update themselves. Their step
  counts advance, as their data walk does. With ``batch_sizes`` too, the
  metrics hold the step's ``valid_rows``, and a step without any (edge
  clients that all dropped out) changes nothing but the step counts.
  """
  clients_forward = batched_client_apply(client_net, client_impl)

  def train_step(state: SimState, images: jax.Array, key: jax.Array,
                 batch_sizes: jax.Array | None = None, remote: RemoteRows | None = None):
    n, b = images.shape[:2]
    if batch_sizes is None:
      valid = None
      forward = lambda variables, x: server_apply(server_net, variables, x)
    else:
      valid = (jnp.arange(b) < batch_sizes[:, None]).reshape(n * b)
      forward = _compacting_forward(server_net, valid, server_batch or n * b)
    view1, view2 = augment(key, images.reshape((n * b,) + images.shape[2:]))
    # Stored once: XLA:CPU would otherwise fuse the whole augmentation into each
    # of the first convolution's patch taps and recompute it there.
    view1, view2 = materialize(view1), materialize(view2)
    view1 = view1.reshape((n, b) + view1.shape[1:])
    view2 = view2.reshape((n, b) + view2.shape[1:])
    c = state.clients

    # Clients: online forward on the query view (kept for the backward), then
    # the EMA update from the pre-step weights, then the EMA forward on the key view.
    if frozen_clients:
      # The EMA of a constant model is that model: taken as is, so that it
      # stays bit-identical (tau x + (1 - tau) x need not round to x).
      smashed_q, clients_vjp = clients_forward(c.online, view1), None
      client_ema = c.online
    else:
      smashed_q, clients_vjp = jax.vjp(lambda p: clients_forward(p, view1), c.online)
      # In float32 whatever moco.ema_dtype stores: the forward and the loss
      # see the dtypes they always did.
      client_ema = optax.incremental_update(
          c.online, jax.tree.map(lambda e, o: e.astype(o.dtype), c.ema, c.online),
          1.0 - ema_decay)
    smashed_k = lax.stop_gradient(clients_forward(client_ema, view2))
    client_ema = state_lib.store_ema(client_ema, c.ema, jax.random.fold_in(key, 1))
    if remote is not None:
      smashed_q = _rows_where(remote.mask, remote.online.astype(smashed_q.dtype), smashed_q)
      smashed_k = _rows_where(remote.mask, remote.ema.astype(smashed_k.dtype), smashed_k)

    # Vector concatenation: one server batch of n*B rows in pool order (with
    # ragged batches, the server forward gathers the valid ones from it).
    a_q = smashed_q.reshape((n * b,) + smashed_q.shape[2:])
    a_k = smashed_k.reshape((n * b,) + smashed_k.shape[2:])

    server_ema = {**state.server_ema, 'params': optax.incremental_update(
        state.server['params'], state.server_ema['params'], 1.0 - ema_decay)}
    k2, server_ema = forward(server_ema, a_k)
    k2 = moco.l2_normalize(k2)
    if symmetric:
      k1, server_ema = forward(server_ema, lax.stop_gradient(a_q))
      k1 = moco.l2_normalize(k1)
    else:
      k1 = None

    def loss_fn(params, a_q):
      # Term 2 feeds the client-EMA smashed data to the online server, so the
      # clients get gradient from term 1 only (spec 9.9). Symmetric: a sum of two means.
      variables = {**state.server, 'params': params}
      q1, variables = forward(variables, a_q)
      loss12, accuracy12 = moco.info_nce(moco.l2_normalize(q1), k2, state.queue.keys,
                                         temperature, valid)
      if not symmetric:
        return loss12, (accuracy12, variables)
      q2, variables = forward(variables, a_k)
      loss21, accuracy = moco.info_nce(moco.l2_normalize(q2), k1, state.queue.keys, temperature,
                                       valid)
      return loss12 + loss21, (accuracy, variables)

    (loss, (accuracy, server_vars)), (server_grads, smashed_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.server['params'], a_q)
    queue = moco.enqueue(state.queue, k1, k2, n, valid)

    lr_server = server_lr(state.round)
    server_opt = optim.with_learning_rate(state.server_opt, lr_server)
    updates, server_opt = server_tx.update(server_grads, server_opt, server_vars['params'])
    server_vars = {**server_vars, 'params': optax.apply_updates(server_vars['params'], updates)}

    cotangent = smashed_grads.reshape(smashed_q.shape)
    attackers, privacy_metrics = c.attacker, {}
    if ressfl is not None:
      attackers, privacy_grads, privacy_metrics = ressfl_lib.attack_step(
          ressfl, c.attacker, smashed_q, view1, None if valid is None else valid.reshape(n, b))
      if ressfl.alpha:
        cotangent = cotangent + privacy_grads
    lr_clients = client_lr(c.steps, state.round)

    def client_update(grads, opt_state, params, lr):
      opt_state = optim.with_learning_rate(opt_state, lr)
      updates, opt_state = client_tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    if frozen_clients:
      # Unused, smashed_grads and the server's backward to its input leave the program.
      online, client_opt = c.online, c.opt
    else:
      # Each client receives exactly its slice of dL/d(smashed data): the slices
      # are the rows of the reshaped gradient, and one VJP routes them all.
      # Padding rows are masked out of the loss, so their slices are zero.
      (client_grads,) = clients_vjp(cotangent)
      online, client_opt = jax.vmap(client_update)(client_grads, c.opt, c.online, lr_clients)
    if remote is not None:
      keep = lambda new, old: _rows_where(remote.mask, old, new)
      online, client_ema, client_opt, attackers = keep(
          (online, client_ema, client_opt, attackers), (c.online, c.ema, c.opt, c.attacker))
    new_state = state.replace(
        server=server_vars, server_ema=server_ema, server_opt=server_opt,
        clients=c.replace(online=online, ema=client_ema, opt=client_opt, steps=c.steps + 1,
                          attacker=attackers),
        queue=queue, step=state.step + 1)
    metrics = {'loss': loss, 'contrastive_accuracy': accuracy,
               'lr_server': lr_server, 'lr_client': jnp.mean(lr_clients), **privacy_metrics}
    if remote is not None:
      if valid is not None:
        new_state, cotangent, metrics = _unless_empty(valid, state, new_state, cotangent, metrics)
      return new_state, metrics, None if frozen_clients else cotangent
    return new_state, metrics

  return train_step


def _unless_empty(valid: jax.Array, state: SimState, new_state: SimState, cotangent: jax.Array,
                  metrics: dict) -> tuple[SimState, jax.Array, dict]:
  """The step's results, or a step that changes nothing when it has no valid row.

  Only a pool of edge clients that all dropped out has none: its loss is
  undefined (0 here, with ``valid_rows`` 0 in the metrics for the round's
  record to leave it out), and the server, its optimiser and EMA, the queue and
  the clients keep their state, as they would without the step. The step
  counts still advance, as a dropped row's does in any step.
  """
  rows = jnp.sum(valid, dtype=jnp.int32)
  idle = state.replace(clients=state.clients.replace(steps=new_state.clients.steps),
                       step=new_state.step)
  new_state, cotangent = jax.tree.map(lambda new, old: jnp.where(rows > 0, new, old),
                                      (new_state, cotangent), (idle, jnp.zeros_like(cotangent)))
  return new_state, cotangent, {**metrics, 'valid_rows': rows}


def _rows_where(mask: jax.Array, chosen: Any, other: Any) -> Any:
  """Leaf by leaf, ``chosen``'s rows where ``mask`` (n,) holds, ``other``'s elsewhere."""
  def pick(a, b):
    return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(pick, chosen, other)


def _compacting_forward(server_net, valid: jax.Array, rows: int) -> Callable:
  """Server forward of only the ``valid`` rows of a batch, with the output laid out as the input.

  The valid rows (in order) are gathered to the front of a batch of ``rows``
  rows, the rest of which repeats row 0 and is masked out of BatchNorm; each
  valid input row's output is gathered back to its place. Padding rows get
  some valid row's output, for the caller to mask.
  """
  position = jnp.where(valid, jnp.cumsum(valid) - 1, 0)
  source = jnp.zeros(rows, position.dtype).at[jnp.where(valid, position, rows)].set(
      jnp.arange(valid.shape[0], dtype=position.dtype), mode='drop')
  mask = jnp.arange(rows) < jnp.sum(valid)

  def forward(variables, x):
    out, variables = server_apply(server_net, variables, x[source], mask)
    return out[position], variables
  return forward
