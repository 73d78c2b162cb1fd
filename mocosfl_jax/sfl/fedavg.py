"""Federated averaging of client models over the sampled pool (spec 4.7, 9.4, 9.5)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def average(stacked, weights: jax.Array):
  """Weighted mean over the leading (pool) axis of every leaf; weights sum to one."""
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), stacked)


def average_and_broadcast(stacked, weights: jax.Array):
  """Every pool row replaced by the pool's weighted average.

  The reference starts its sum from client 0 rather than the first pooled
  client (spec 9.5); we average exactly the pool.
  """
  mean = average(stacked, weights)
  return jax.tree.map(lambda m, x: jnp.broadcast_to(m, x.shape), mean, stacked)
