"""Federated averaging of client models over the sampled pool (spec 4.7, 9.4, 9.5)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def average(stacked, weights: jax.Array):
  """Weighted mean over the leading (pool) axis of every leaf; weights sum to one.

  Summed in float32 at least, and stored in the leaf's dtype: a bfloat16 sum
  of a large pool would round at every term (moco.ema_dtype).
  """
  def mean(x):
    wide = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.tensordot(weights.astype(wide), x.astype(wide), axes=1).astype(x.dtype)
  return jax.tree.map(mean, stacked)


def average_and_broadcast(stacked, weights: jax.Array):
  """Every pool row replaced by the pool's weighted average.

  The reference starts its sum from client 0 rather than the first pooled
  client (spec 9.5); we average exactly the pool.
  """
  mean = average(stacked, weights)
  return jax.tree.map(lambda m, x: jnp.broadcast_to(m, x.shape), mean, stacked)
