"""Decoders from smashed data to images: the attack's "res_normN4C64" (spec 6.1)
and ResSFL's simulated attackers, "custom" or res_normN4C64 (spec 6.2, 6.3).

Smashed data (N, h, w, C) -> images (N, H, W, 3) in [0, 1]. The decoder is
built of pre-activation residual units with BatchNorm (the reference's choice
for batches of 20 or more) and ``u = log2(H / h)`` upsampling stages, each a
PyTorch-style 3x3 stride-2 transposed conv (padding 1, output padding 1, which
exactly doubles H and W) with BatchNorm.

Parameters start from PyTorch's default init, U(+-1/sqrt(fan_in)) for kernels
and biases, as the reference's evaluation decoder does (it is not passed
through the Xavier re-init). For the transposed convs, whose PyTorch fan-in is
``out x 9`` rather than ``in x 9``, the two agree at the decoder's 64 -> 64.

ResSFL's simulated attackers (:func:`simulated_attacker`) are passed through
the reference's Xavier re-init (spec 1.8, 6.1): every plain conv and
transposed conv gets Xavier-uniform kernels (gain 1) and zero biases, the
norms keep scale 1 and bias 0, and weight-standardized convs, which that
re-init skips by its exact type test, keep PyTorch's default init. Flax's
Xavier on an HWIO kernel uses 9 x (in + out) as PyTorch's does on a
transposed conv's (in, out, 3, 3) weight, so the bounds agree.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mocosfl_jax.models import bottleneck, resnet
from mocosfl_jax.models.group_norm import GroupNorm

NAME = 'res_normN4C64'
CUSTOM = 'custom'
ATTACKERS = (CUSTOM, NAME)
# The reference's simulated res_normN4C64 uses GroupNorm and weight
# standardization instead of BatchNorm for client batches below this.
GROUP_NORM_BELOW = 20
# Residual units between the first and the upsampling stages ("N4").
NUM_BLOCKS = 4


def _torch_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  # PyTorch's BatchNorm2d: running averages with momentum 0.1, epsilon 1e-5.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _norm(x, train: bool, mask, group_norm: bool, name: str | None = None):
  """BatchNorm whose statistics skip the rows that ``mask`` (N,) leaves out, or GroupNorm."""
  if group_norm:
    channels = x.shape[-1]
    # 4 channels a group as the backbone's (spec 1.2), fewer where they do not divide.
    return GroupNorm(math.gcd(channels, max(channels // 4, 1)), name=name)(x)
  if mask is not None:
    mask = jnp.broadcast_to(mask.reshape((-1, 1, 1, 1)), x.shape)
  return _batch_norm(train, name)(x, mask=mask)


class Conv(nn.Module):
  """A conv with same padding and an optional bias; PyTorch's default init, or Xavier
  and a zero bias; or weight-standardized with PyTorch's default init."""
  features: int
  kernel_size: int = 3
  use_bias: bool = True
  xavier: bool = False
  standardized: bool = False

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    fan_in = k**2 * x.shape[-1]
    bias_init = _torch_bias_init(fan_in)
    if self.standardized:
      kernel = resnet.standardize(self.param('kernel', resnet.torch_conv_init,
                                             (k, k, x.shape[-1], self.features)))
      y = lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), ((k // 2, k // 2),) * 2,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return y + self.param('bias', bias_init, (self.features,)) if self.use_bias else y
    kernel_init = resnet.xavier if self.xavier else resnet.torch_conv_init
    return nn.Conv(self.features, (k, k), padding='SAME', use_bias=self.use_bias,
                   kernel_init=kernel_init,
                   bias_init=nn.initializers.zeros if self.xavier else bias_init)(x)


class ConvTranspose(nn.Module):
  """PyTorch's ConvTranspose2d(3, stride 2, padding 1, output_padding 1) with bias: 2H x 2W."""
  features: int
  xavier: bool = False

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', resnet.xavier if self.xavier else resnet.torch_conv_init,
                        (3, 3, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros if self.xavier
                      else _torch_bias_init(9 * self.features), (self.features,))
    return bottleneck.conv_transpose(x, kernel) + bias


class ResidualUnit(nn.Module):
  """BN, ReLU, conv, BN, ReLU, conv, plus the input (or its 1x1 conv and BN); no final ReLU.

  ``group_norm``: GroupNorm for BN and weight-standardized 3x3 convs (the
  1x1 shortcut stays plain: a standardized 1x1 conv of few channels is
  ill-defined).
  """
  features: int
  group_norm: bool = False
  xavier: bool = False

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    conv = functools.partial(Conv, xavier=self.xavier, standardized=self.group_norm)
    norm = functools.partial(_norm, train=train, mask=mask, group_norm=self.group_norm)
    y = conv(self.features)(nn.relu(norm(x)))
    y = conv(self.features)(nn.relu(norm(y)))
    shortcut = x
    if x.shape[-1] != self.features:
      shortcut = norm(Conv(self.features, 1, use_bias=False, xavier=self.xavier,
                           name='shortcut')(x), name='shortcut_norm')
    return y + shortcut


def upsampling_stages(smashed_size: int, image_size: int, name: str = NAME) -> int:
  """log2(image_size / smashed_size): the transposed convs back to the image's size.

  Raises:
    ValueError: the ratio is not a power of 2 (1, 2, 4, ...).
  """
  ratio = image_size // smashed_size if smashed_size else 0
  if ratio < 1 or ratio * smashed_size != image_size or ratio & (ratio - 1):
    raise ValueError(f'the {name} decoder needs smashed data whose size divides the image\'s '
                     f'{image_size} by a power of 2, not {smashed_size}')
  return int(math.log2(ratio))


class ResNormDecoder(nn.Module):
  """res_normN4C64: R(C->c), 4 x R(c->c), two stages (a transposed conv while
  upsampling is left, else R(c->c)), more transposed convs beyond u = 2,
  R(c->3), sigmoid; ReLU after every stage but the last.

  ``channels`` is the reference's 64; tests shrink it. ``mask`` (N,) keeps
  rows out of the BatchNorm statistics (padding rows of ragged batches).
  ``group_norm`` and ``xavier``: the simulated attacker's variants (module
  docstring).
  """
  image_size: int
  channels: int = 64
  group_norm: bool = False
  xavier: bool = False

  @nn.compact
  def __call__(self, smashed, train: bool = False, mask=None):
    u = _stages(smashed, self.image_size, NAME)
    unit = functools.partial(ResidualUnit, group_norm=self.group_norm, xavier=self.xavier)
    x = nn.relu(unit(self.channels)(smashed, train, mask))
    for _ in range(NUM_BLOCKS):
      x = nn.relu(unit(self.channels)(x, train, mask))
    for stage in range(max(u, 2)):
      if stage < u:
        x = _norm(ConvTranspose(self.channels, self.xavier)(x), train, mask, self.group_norm)
      else:
        x = unit(self.channels)(x, train, mask)
      x = nn.relu(x)
    return nn.sigmoid(unit(3)(x, train, mask))


def _stages(smashed, image_size: int, name: str) -> int:
  if smashed.shape[1] != smashed.shape[2]:
    raise ValueError(f'the {name} decoder needs square smashed data, not '
                     f'{smashed.shape[1]}x{smashed.shape[2]}')
  return upsampling_stages(smashed.shape[1], image_size, name)


class CustomDecoder(nn.Module):
  """"custom" (spec 6.2), the reference's default simulated attacker; no normalisation.

  For C smashed channels and u upsampling stages: u - 1 stages of [conv
  C -> C/2, ReLU, transposed conv, ReLU], then a conv keeping the channels,
  ReLU, and a conv (u = 0) or transposed conv (u >= 1) to 3 channels, sigmoid.
  Always Xavier-initialised: it only ever serves as a simulated attacker.
  """
  image_size: int

  @nn.compact
  def __call__(self, smashed, train: bool = False, mask=None):
    del train, mask  # nothing to normalise
    u = _stages(smashed, self.image_size, CUSTOM)
    x, channels = smashed, smashed.shape[-1]
    for _ in range(u - 1):
      channels = max(channels // 2, 1)
      x = nn.relu(Conv(channels, xavier=True)(x))
      x = nn.relu(ConvTranspose(channels, xavier=True)(x))
    x = nn.relu(Conv(channels, xavier=True)(x))
    x = ConvTranspose(3, xavier=True)(x) if u else Conv(3, xavier=True)(x)
    return nn.sigmoid(x)


def simulated_attacker(name: str, image_size: int, batch_size: int,
                       channels: int = 64) -> nn.Module:
  """ResSFL's simulated attacker ``name`` for clients of ``batch_size`` images (spec 6.3).

  res_normN4C64 with BatchNorm from GROUP_NORM_BELOW images a batch, with
  GroupNorm and weight standardization below, as the reference chooses;
  ``channels`` is its width. Xavier-initialised (module docstring).
  """
  if name == CUSTOM:
    return CustomDecoder(image_size)
  if name == NAME:
    return ResNormDecoder(image_size, channels, group_norm=batch_size < GROUP_NORM_BELOW,
                          xavier=True)
  raise ValueError(f'simulated attacker {name!r}: use one of {list(ATTACKERS)}')
