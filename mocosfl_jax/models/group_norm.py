"""GroupNorm with a hand-written backward whose reductions XLA:CPU runs fast.

Numerically it is ``flax.linen.GroupNorm(use_fast_variance=False)`` (two-pass
variance, biased, as ``torch.nn.GroupNorm``), with the same parameter names, so
checkpoints do not change. Written out because of how XLA:CPU emits reductions
(README "Performance"):

- A sum over H and W of an NHWC activation in one reduce is 2.5x slower than a
  sum over H into an (N, W, C) array followed by a sum over W: the first loop
  is vectorised along the contiguous W x C rows, the second is small.
- Autodiff of GroupNorm-then-ReLU fuses the ReLU mask, the recomputed
  normalised input and the products into each backward reduction; XLA:CPU
  runs such a fused reduce 5-10x slower than one over a stored array. The
  backward stores the incoming gradient once and reduces that.

Layer-1 GroupNorm + ReLU at batch 100, forward + backward: 42 -> 16 ms on a
2-core CPU. On other backends :func:`materialize` is the identity and XLA fuses
as it likes.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mocosfl_jax.compilation import materialize


def _sum_spatial(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (N, C): over H first (see module docstring), then W."""
  return materialize(x.sum(axis=1)).sum(axis=1)


def _group_mean(per_channel: jax.Array, groups: int, count: int) -> jax.Array:
  """(N, C) sums -> (N, G) means over each group's ``count`` elements."""
  return per_channel.reshape(per_channel.shape[0], groups, -1).sum(-1) / count


def _per_channel(per_group: jax.Array, channels: int) -> jax.Array:
  """(N, G) -> (N, 1, 1, C), broadcastable against the activation."""
  n, groups = per_group.shape
  return jnp.broadcast_to(per_group[:, :, None], (n, groups, channels // groups)).reshape(
      n, 1, 1, channels)


def _normalize(x, scale, bias, groups, epsilon):
  _, h, w, c = x.shape
  count = h * w * (c // groups)
  mean = _group_mean(_sum_spatial(x), groups, count)
  centred = x - _per_channel(mean, c)
  rstd = jax.lax.rsqrt(_group_mean(_sum_spatial(centred * centred), groups, count) + epsilon)
  return centred * (_per_channel(rstd, c) * scale) + bias, (x, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
               epsilon: float) -> jax.Array:
  """GroupNorm of an (N, H, W, C) array with per-channel ``scale`` and ``bias``."""
  return _normalize(x, scale, bias, groups, epsilon)[0]


def _group_norm_bwd(groups, epsilon, residuals, grad):
  del epsilon
  x, mean, rstd, scale = residuals
  _, h, w, c = x.shape
  count = h * w * (c // groups)
  grad = materialize(grad)
  rstd_c = _per_channel(rstd, c)
  normalized = (x - _per_channel(mean, c)) * rstd_c
  grad_sum = _sum_spatial(grad)
  grad_dot_normalized = _sum_spatial(grad * normalized)
  # d/dx of (x - mean) * rstd: subtract the group means of the upstream
  # gradient and of its projection on the normalised input.
  mean_grad = _per_channel(_group_mean(grad_sum * scale, groups, count), c)
  mean_proj = _per_channel(_group_mean(grad_dot_normalized * scale, groups, count), c)
  grad_x = rstd_c * (grad * scale - mean_grad - normalized * mean_proj)
  return (grad_x.astype(x.dtype), grad_dot_normalized.sum(0).astype(scale.dtype),
          grad_sum.sum(0).astype(scale.dtype))


group_norm.defvjp(_normalize, _group_norm_bwd)


class GroupNorm(nn.Module):
  """Drop-in for ``nn.GroupNorm(num_groups, epsilon, use_fast_variance=False)`` on NHWC."""
  num_groups: int
  epsilon: float = 1e-5
  dtype: str = 'float32'  # of the output; statistics are float32 whatever it is

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4:
      raise ValueError(f'GroupNorm expects (N, H, W, C) activations, got shape {x.shape}')
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f'GroupNorm: {self.num_groups} groups do not divide {channels} channels')
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    # As flax: statistics in at least float32, whatever the input; the output in self.dtype.
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = group_norm(x, scale, bias, self.num_groups, self.epsilon)
    return y if self.dtype == 'float32' else y.astype(self.dtype)
