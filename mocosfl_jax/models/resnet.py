"""The reference's CIFAR ResNet-18 with GroupNorm and Weight Standardization (spec 1.1-1.2).

The backbone is a flat list of nine modules (stem + eight BasicBlocks) so that a
cut layer is simply an index into that list (see ``split.py``).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mocosfl_jax.compilation import materialize

# Weight-standardized convs keep PyTorch's default conv init, U(+-1/sqrt(fan_in)),
# because the reference's Xavier re-init skips them (spec 1.8, 9.12). Since WS
# removes the kernel's scale, this choice sets the effective learning rate.
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
xavier = nn.initializers.xavier_uniform()

STAGE_CHANNELS = (64, 128, 256, 512)
NUM_MODULES = 9  # stem + 2 BasicBlocks in each of the 4 stages


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
  # Patch features are ordered (in_channel, kh, kw).
  matrix = kernel.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout)
  return _patches_matmul(x, matrix, (kh, kw), strides, padding)


def _patches(x, window, strides, padding):
  return lax.conv_general_dilated_patches(
      x, window, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _patches_matmul(x, matrix, window, strides, padding):
  return _patches(x, window, strides, padding) @ matrix


def _patches_matmul_fwd(x, matrix, window, strides, padding):
  return _patches_matmul(x, matrix, window, strides, padding), (x, matrix)


def _patches_matmul_bwd(window, strides, padding, residuals, grad):
  """Matmuls plus a scatter-add of the patch gradients (col2im).

  Autodiff would transpose the patch extraction into a convolution with a
  one-hot kernel: 16.3 s instead of 8.6 s per CPU step at cut 2.
  """
  x, matrix = residuals
  patches = _patches(x, window, strides, padding)
  grad_matrix = jnp.einsum('bhwk,bhwo->ko', patches, grad)
  kh, kw = window
  (sh, sw), (pad_h, pad_w) = strides, padding
  grad_patches = (grad @ matrix.T).reshape(grad.shape[:3] + (x.shape[-1], kh, kw))
  b, ho, wo = grad.shape[:3]
  padded = jnp.zeros((b, x.shape[1] + sum(pad_h), x.shape[2] + sum(pad_w), x.shape[3]), x.dtype)
  for i in range(kh):
    for j in range(kw):
      padded = padded.at[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :].add(
          grad_patches[..., i, j])
  grad_x = padded[:, pad_h[0]:pad_h[0] + x.shape[1], pad_w[0]:pad_w[0] + x.shape[2], :]
  return grad_x, grad_matrix


_patches_matmul.defvjp(_patches_matmul_fwd, _patches_matmul_bwd)


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


def group_norm(channels: int) -> nn.GroupNorm:
  """GroupNorm with 4 channels per group and PyTorch's epsilon (spec 1.2)."""
  return nn.GroupNorm(num_groups=max(channels // 4, 1), epsilon=1e-5,
                      use_fast_variance=False)


class Stem(nn.Module):
  """3x3 stride-1 conv, GroupNorm, ReLU; no max-pool (CIFAR stem)."""
  features: int
  image_size: int = 32
  as_matmul: bool = False

  @nn.compact
  def __call__(self, x):
    # The reference's input-size variants: 64x64 uses stride 2, 224x224 a 7x7 stride-2 conv.
    kernel, stride = (7, 2) if self.image_size >= 224 else (3, 2 if self.image_size >= 64 else 1)
    # The stem is always weight-standardized, even when WS is off elsewhere.
    x = Conv(self.features, kernel, stride, True, self.as_matmul)(x)
    return nn.relu(group_norm(self.features)(x))


class BasicBlock(nn.Module):
  """Post-activation BasicBlock with a 1x1 projection shortcut when the shape changes."""
  features: int
  strides: int = 1
  weight_standardization: bool = True
  as_matmul: bool = False

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(Conv, weight_standardization=self.weight_standardization,
                             as_matmul=self.as_matmul)
    y = conv(self.features, 3, self.strides)(x)
    y = nn.relu(group_norm(self.features)(y))
    y = conv(self.features, 3, 1)(y)
    y = group_norm(self.features)(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides)(x)
      x = group_norm(self.features)(x)
    return materialize(nn.relu(x + y))


def channels(width: float) -> tuple[int, ...]:
  """Stage widths for a width multiplier (1.0 = the paper's ResNet-18)."""
  return tuple(max(int(round(c * width)), 4) for c in STAGE_CHANNELS)


def make_module(index: int, width: float, image_size: int = 32,
                weight_standardization: bool = True, as_matmul: bool = False) -> nn.Module:
  """Module ``index`` (0..8) of the flat ResNet-18 list."""
  widths = channels(width)
  if index == 0:
    return Stem(widths[0], image_size, as_matmul, name='stem')
  stage, block = divmod(index - 1, 2)
  strides = 2 if (stage > 0 and block == 0) else 1
  return BasicBlock(widths[stage], strides, weight_standardization, as_matmul,
                    name=f'layer{stage + 1}_block{block + 1}')
