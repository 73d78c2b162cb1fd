"""The model-inversion attack's decoder, "res_normN4C64" (spec 6.1).

Smashed data (N, h, w, C) -> images (N, H, W, 3) in [0, 1]. The decoder is
built of pre-activation residual units with BatchNorm (the reference's choice
for batches of 20 or more) and ``u = log2(H / h)`` upsampling stages, each a
PyTorch-style 3x3 stride-2 transposed conv (padding 1, output padding 1, which
exactly doubles H and W) with BatchNorm.

Parameters start from PyTorch's default init, U(+-1/sqrt(fan_in)) for kernels
and biases, as the reference's evaluation decoder does (it is not passed
through the Xavier re-init). For the transposed convs, whose PyTorch fan-in is
``out x 9`` rather than ``in x 9``, the two agree at the decoder's 64 -> 64.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mocosfl_jax.models import bottleneck, resnet

NAME = 'res_normN4C64'
# Residual units between the first and the upsampling stages ("N4").
NUM_BLOCKS = 4


def _torch_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  # PyTorch's BatchNorm2d: running averages with momentum 0.1, epsilon 1e-5.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class Conv(nn.Module):
  """A conv with PyTorch's default init, same padding and an optional bias."""
  features: int
  kernel_size: int = 3
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    fan_in = self.kernel_size**2 * x.shape[-1]
    return nn.Conv(self.features, (self.kernel_size, self.kernel_size), padding='SAME',
                   use_bias=self.use_bias, kernel_init=resnet.torch_conv_init,
                   bias_init=_torch_bias_init(fan_in))(x)


class ConvTranspose(nn.Module):
  """PyTorch's ConvTranspose2d(3, stride 2, padding 1, output_padding 1) with bias: 2H x 2W."""
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', resnet.torch_conv_init, (3, 3, x.shape[-1], self.features))
    bias = self.param('bias', _torch_bias_init(9 * self.features), (self.features,))
    return bottleneck.conv_transpose(x, kernel) + bias


class ResidualUnit(nn.Module):
  """BN, ReLU, conv, BN, ReLU, conv, plus the input (or its 1x1 conv and BN); no final ReLU."""
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    y = Conv(self.features)(nn.relu(_batch_norm(train)(x)))
    y = Conv(self.features)(nn.relu(_batch_norm(train)(y)))
    shortcut = x
    if x.shape[-1] != self.features:
      shortcut = _batch_norm(train, 'shortcut_norm')(
          Conv(self.features, 1, use_bias=False, name='shortcut')(x))
    return y + shortcut


def upsampling_stages(smashed_size: int, image_size: int) -> int:
  """log2(image_size / smashed_size): the transposed convs back to the image's size.

  Raises:
    ValueError: the ratio is not a power of 2 (1, 2, 4, ...).
  """
  ratio = image_size // smashed_size if smashed_size else 0
  if ratio < 1 or ratio * smashed_size != image_size or ratio & (ratio - 1):
    raise ValueError(f'the {NAME} decoder needs smashed data whose size divides the image\'s '
                     f'{image_size} by a power of 2, not {smashed_size}')
  return int(math.log2(ratio))


class ResNormDecoder(nn.Module):
  """res_normN4C64: R(C->c), 4 x R(c->c), two stages (a transposed conv while
  upsampling is left, else R(c->c)), more transposed convs beyond u = 2,
  R(c->3), sigmoid; ReLU after every stage but the last.

  ``channels`` is the reference's 64; tests shrink it.
  """
  image_size: int
  channels: int = 64

  @nn.compact
  def __call__(self, smashed, train: bool = False):
    if smashed.shape[1] != smashed.shape[2]:
      raise ValueError(f'the {NAME} decoder needs square smashed data, not '
                       f'{smashed.shape[1]}x{smashed.shape[2]}')
    u = upsampling_stages(smashed.shape[1], self.image_size)
    x = nn.relu(ResidualUnit(self.channels)(smashed, train))
    for _ in range(NUM_BLOCKS):
      x = nn.relu(ResidualUnit(self.channels)(x, train))
    for stage in range(max(u, 2)):
      if stage < u:
        x = _batch_norm(train)(ConvTranspose(self.channels)(x))
      else:
        x = ResidualUnit(self.channels)(x, train)
      x = nn.relu(x)
    return nn.sigmoid(ResidualUnit(3)(x, train))
