"""The symmetric MoCo v2 loss and the key queue (spec 4.3, 4.4, 9.8, 9.9)."""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """PyTorch's F.normalize: x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@flax.struct.dataclass
class Queue:
  """A ring buffer of keys.

  Shared (feature sharing on): ``keys`` is (K, D) and ``ptr`` a scalar.
  Per client (feature sharing off): ``keys`` is (N, K // N, D), ``ptr`` is (N,),
  and rows are gathered with the pool like any other per-client state.
  """
  keys: jax.Array
  ptr: jax.Array

  @property
  def per_client(self) -> bool:
    return self.keys.ndim == 3


def init_queue(key: jax.Array, size: int, dim: int, num_clients: int | None = None) -> Queue:
  """Standard-normal keys, each L2-normalised (the reference normalises only the shared queue;
  per-client queues start normalised too, the intended behaviour of spec 9.8)."""
  if num_clients is None:
    return Queue(l2_normalize(jax.random.normal(key, (size, dim))), jnp.zeros((), jnp.int32))
  keys = jax.random.normal(key, (num_clients, size // num_clients, dim))
  return Queue(l2_normalize(keys), jnp.zeros((num_clients,), jnp.int32))


def _ring_write(keys: jax.Array, ptr: jax.Array, new: jax.Array, valid: jax.Array | None):
  if valid is None:
    rows = (ptr + jnp.arange(new.shape[0])) % keys.shape[0]
    return keys.at[rows].set(new.astype(keys.dtype)), (ptr + new.shape[0]) % keys.shape[0]
  # Valid keys go to consecutive rows in their order; invalid ones get an
  # out-of-range row, which the scatter drops.
  rows = jnp.where(valid, (ptr + jnp.cumsum(valid) - 1) % keys.shape[0], keys.shape[0])
  written = jnp.sum(valid, dtype=ptr.dtype)
  return (keys.at[rows].set(new.astype(keys.dtype), mode='drop'),
          (ptr + written) % keys.shape[0])


def enqueue(queue: Queue, k1: jax.Array | None, k2: jax.Array, num_clients: int,
            valid: jax.Array | None = None) -> Queue:
  """Writes the step's keys (2nB, or nB without ``k1``), overwriting the oldest and wrapping around.

  Shared queue: the reference's order, ``[k1; k2]``. Per-client queues: each
  client's own rows of k1 then k2 go to its own queue. ``k1`` is None for the
  asymmetric loss, which only has the key view's keys. ``valid`` (nB,) marks
  the rows that hold keys (ragged batches); the others are not written and do
  not advance the pointer.
  """
  blocks = [k for k in (k1, k2) if k is not None]
  if not queue.per_client:
    marks = None if valid is None else jnp.concatenate([valid] * len(blocks))
    return Queue(*_ring_write(queue.keys, queue.ptr, jnp.concatenate(blocks), marks))
  per = lambda k: k.reshape((num_clients, -1) + k.shape[1:])
  mine = jnp.concatenate([per(k) for k in blocks], axis=1)
  if valid is None:
    return Queue(*jax.vmap(lambda k, p, m: _ring_write(k, p, m, None))(
        queue.keys, queue.ptr, mine))
  marks = jnp.concatenate([per(valid)] * len(blocks), axis=1)
  return Queue(*jax.vmap(_ring_write)(queue.keys, queue.ptr, mine, marks))


def info_nce(q: jax.Array, k: jax.Array, queue_keys: jax.Array, temperature: float,
             valid: jax.Array | None = None):
  """Mean cross-entropy of the positive logit against the queue's negatives.

  q, k: (nB, D) L2-normalised. queue_keys: (K, D) shared, or (n, Kc, D) per client,
  in which case row r of q only sees its own client's queue. ``valid`` (nB,)
  restricts the loss and the accuracy to the rows it marks (ragged batches).
  Returns (loss, top-1 accuracy).
  """
  positive = jnp.sum(q * k, axis=-1, keepdims=True)
  if queue_keys.ndim == 2:
    negative = q @ queue_keys.T
  else:
    n = queue_keys.shape[0]
    negative = jnp.einsum('nbd,nkd->nbk', q.reshape(n, -1, q.shape[-1]), queue_keys)
    negative = negative.reshape(q.shape[0], -1)
  logits = jnp.concatenate([positive, negative], axis=1) / temperature
  labels = jnp.zeros(q.shape[0], jnp.int32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = jnp.argmax(logits, axis=1) == 0
  if valid is None:
    return loss.mean(), jnp.mean(correct)
  # where, not a product: an invalid row's gradient is exactly zero. No valid
  # row at all (edge clients that all dropped out) gives 0, not 0 / 0.
  count = jnp.maximum(jnp.sum(valid), 1)
  return (jnp.sum(jnp.where(valid, loss, 0.0)) / count,
          jnp.sum(valid & correct) / count)


def collapse_value(queue_size: int, symmetric: bool = True) -> float:
  """The loss of a collapsed representation: ln(K + 1) a term (2 terms: 17.40 for K = 6000)."""
  return float((2.0 if symmetric else 1.0) * jnp.log(queue_size + 1.0))


LOSSES = ('auto', 'symmetric', 'asymmetric')


def is_symmetric(loss: str, moco_version: str) -> bool:
  """``moco.loss`` resolved: 'auto' is the reference's choice, asymmetric for V1 only (spec 1.6)."""
  if loss == 'auto':
    return moco_version != 'V1'
  return loss == 'symmetric'
