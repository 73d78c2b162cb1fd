"""The reference's CIFAR ResNets (18, 34) with GroupNorm and Weight Standardization (spec 1.1-1.2).

The backbone is a flat list of modules (the stem, then the BasicBlocks stage by
stage: nine for ResNet-18) so that a cut layer is simply an index into that list
(see ``split.py``), as the reference's ``make_layers`` builds it for every depth.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mocosfl_jax.compilation import materialize
from mocosfl_jax.models.group_norm import GroupNorm

# Weight-standardized convs keep PyTorch's default conv init, U(+-1/sqrt(fan_in)),
# because the reference's Xavier re-init skips them (spec 1.8, 9.12). Since WS
# removes the kernel's scale, this choice sets the effective learning rate.
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
xavier = nn.initializers.xavier_uniform()

STAGE_CHANNELS = (64, 128, 256, 512)
# BasicBlocks in each stage, by depth (model.depth). 18 is the paper's network
# and 34 the reference's ResNet34 (its --arch); 10, one block a stage, is not in
# the reference: a server half as deep for quick studies and the test suite
# (the suite's tiny run compiles and runs in two thirds of a ResNet-18's time).
STAGE_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
DEPTHS = tuple(STAGE_BLOCKS)


def num_modules(depth: int = 18) -> int:
  """Modules of the flat list: the stem and every BasicBlock (9 for ResNet-18)."""
  return 1 + sum(STAGE_BLOCKS[depth])


def stage_of(index: int, depth: int = 18) -> tuple[int, int]:
  """(stage, block within the stage) of module ``index`` >= 1."""
  block = index - 1
  for stage, blocks in enumerate(STAGE_BLOCKS[depth]):
    if block < blocks:
      return stage, block
    block -= blocks
  raise ValueError(f'module {index} of a ResNet-{depth}, which has {num_modules(depth)}')


def standardize(kernel: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Per output filter: subtract the mean, divide by (unbiased std + eps).

  The epsilon sits outside the square root, as in the reference. The kernel is
  flattened to (fan_in, out) first: XLA:CPU lowers a reduction over the three
  leading HWIO axes to slow reduce-windows (2.5x the time for fwd + bwd).
  """
  flat = kernel.reshape(-1, kernel.shape[-1])
  fan_in = flat.shape[0]
  centred = flat - jnp.sum(flat, axis=0) / fan_in
  std = jnp.sqrt(jnp.sum(centred * centred, axis=0) / (fan_in - 1))
  return (centred / (std + eps)).reshape(kernel.shape)


def conv_as_matmul(x, kernel, strides, padding):
  """A convolution written as image patches times a matrix.

  Mathematically identical to ``lax.conv_general_dilated``. Under ``vmap`` over
  per-client kernels it becomes one batched matmul instead of a grouped
  convolution, which is the slow path on CPU and cuDNN
  (design/performance-notes.md).
  """
  kh, kw, cin, cout = kernel.shape
  return patches(x, (kh, kw), strides, padding) @ kernel.reshape(kh * kw * cin, cout)


def patches(x, window, strides, padding):
  """(B, H, W, C) -> (B, H_out, W_out, kh * kw * C), features ordered (kh, kw, C).

  Built from strided slices rather than ``lax.conv_general_dilated_patches``,
  which is a grouped convolution with a one-hot kernel (twice as slow on CPU
  forward, and autodiff turns its transpose into another such convolution);
  the slices' gradient is a sum of pads that fuses into one pass.
  """
  (kh, kw), (sh, sw), ((top, bottom), (left, right)) = window, strides, padding
  b, h, w, c = x.shape
  rows = (h + top + bottom - kh) // sh + 1
  cols = (w + left + right - kw) // sw + 1
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  taps = [padded[:, i:i + sh * (rows - 1) + 1:sh, j:j + sw * (cols - 1) + 1:sw]
          for i in range(kh) for j in range(kw)]
  return jnp.stack(taps, axis=3).reshape(b, rows, cols, kh * kw * c)


class Conv(nn.Module):
  """A bias-free conv with PyTorch padding, optionally weight-standardized."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  weight_standardization: bool = True
  as_matmul: bool = False

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    init = torch_conv_init if self.weight_standardization else xavier
    kernel = self.param('kernel', init, (k, k, x.shape[-1], self.features))
    if self.weight_standardization:
      kernel = standardize(kernel)
    kernel = kernel.astype(x.dtype)
    # PyTorch pads symmetrically (k // 2 each side); flax's 'SAME' pads
    # asymmetrically at stride 2, which would shift every downsampled map.
    padding = ((k // 2, k // 2), (k // 2, k // 2))
    strides = (self.strides, self.strides)
    if self.as_matmul:
      return conv_as_matmul(x, kernel, strides, padding)
    return lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def to_compute_dtype(x: jax.Array, dtype: str) -> jax.Array:
  """``x`` in the activations' ``dtype`` (model.dtype); float32 leaves the program as it was.

  Parameters stay float32: each conv casts its (standardized) kernel to its
  input's dtype, so 'bfloat16' runs convolutions and activations in bfloat16
  while the optimiser updates float32 weights.
  """
  return x if dtype == 'float32' else x.astype(dtype)


def group_norm(channels: int, dtype: str = 'float32') -> GroupNorm:
  """GroupNorm with 4 channels per group and PyTorch's epsilon (spec 1.2)."""
  return GroupNorm(num_groups=max(channels // 4, 1), epsilon=1e-5, dtype=dtype)


class Stem(nn.Module):
  """3x3 stride-1 conv, GroupNorm, ReLU; no max-pool (CIFAR stem)."""
  features: int
  image_size: int = 32
  as_matmul: bool = False
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x):
    x = to_compute_dtype(x, self.dtype)
    # The reference's input-size variants: 64x64 uses stride 2, 224x224 a 7x7 stride-2 conv.
    kernel, stride = (7, 2) if self.image_size >= 224 else (3, 2 if self.image_size >= 64 else 1)
    # The stem is always weight-standardized, even when WS is off elsewhere.
    x = Conv(self.features, kernel, stride, True, self.as_matmul)(x)
    return nn.relu(group_norm(self.features, self.dtype)(x))


class BasicBlock(nn.Module):
  """Post-activation BasicBlock with a 1x1 projection shortcut when the shape changes."""
  features: int
  strides: int = 1
  weight_standardization: bool = True
  as_matmul: bool = False
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x):
    norm = functools.partial(group_norm, dtype=self.dtype)
    conv = functools.partial(Conv, weight_standardization=self.weight_standardization,
                             as_matmul=self.as_matmul)
    y = conv(self.features, 3, self.strides)(x)
    y = materialize(nn.relu(norm(self.features)(y)))
    y = conv(self.features, 3, 1)(y)
    y = norm(self.features)(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides)(x)
      x = norm(self.features)(x)
    return materialize(nn.relu(x + y))


def width_problem(width: float) -> str:
  """Why ``width`` cannot build the network, or '' when it can.

  Every stage needs a positive multiple of 4 channels, the size of a GroupNorm
  group (spec 1.2). Rounding another width to one that works would silently
  train another network than the one asked for.
  """
  if all(round(c * width) >= 4 and round(c * width) % 4 == 0 for c in STAGE_CHANNELS):
    return ''
  return (f'the {"/".join(map(str, STAGE_CHANNELS))} channels of the four stages would become '
          f'{", ".join(f"{c * width:g}" for c in STAGE_CHANNELS)}, but each stage needs a '
          'positive multiple of 4 (GroupNorm groups of 4 channels): use a multiple of 1/16 '
          'such as 0.0625, 0.125, 0.25, 0.5 or 1')


def channels(width: float) -> tuple[int, ...]:
  """Stage widths for a width multiplier (1.0 = the paper's ResNet-18).

  Raises:
    ValueError: ``width_problem(width)`` is not empty.
  """
  problem = width_problem(width)
  if problem:
    raise ValueError(f'width {width!r}: {problem}')
  return tuple(int(round(c * width)) for c in STAGE_CHANNELS)


def make_module(index: int, width: float, image_size: int = 32,
                weight_standardization: bool = True, as_matmul: bool = False,
                dtype: str = 'float32', depth: int = 18) -> nn.Module:
  """Module ``index`` (0..num_modules(depth) - 1) of the flat list, computing in ``dtype``."""
  widths = channels(width)
  if index == 0:
    return Stem(widths[0], image_size, as_matmul, dtype, name='stem')
  stage, block = stage_of(index, depth)
  strides = 2 if (stage > 0 and block == 0) else 1
  return BasicBlock(widths[stage], strides, weight_standardization, as_matmul, dtype,
                    name=f'layer{stage + 1}_block{block + 1}')
