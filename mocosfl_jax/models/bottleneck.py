"""The reference's bottleneck layer at the cut ("bnl", spec 1.5).

``model.bottleneck`` is '' (off) or ``[K<k>]C<c>[S<s>][noRELU]``: the client
compresses its smashed data to ``c`` channels, dividing H and W by ``s``, and
the server restores the original shape before its first module. With ``s = 1``
both sides are one ``k x k`` same-padded conv; with ``s >= 2`` the client has
``1 + log2(s / 2)`` 3x3 stride-2 convs and the server mirrors them with as many
3x3 stride-2 transposed convs (PyTorch's padding 1, output padding 1, which
exactly doubles H and W). Every conv has a bias; ReLUs go between the convs and
after the last one on each side, unless noRELU. C4S2, the TAResSFL setting,
turns 64x32x32 smashed data into 4x16x16.

Deviations from the reference: it falls back to C8S1 when it cannot parse the
option (and cannot parse a trailing noRELU), while here a malformed option is
refused; so are a kernel with ``s >= 2`` (the reference ignores it), an even
kernel, a stride that is not a power of 2 and a stride that does not divide
the smashed data's height and width (the server could not restore the shape).
"""
from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
from jax import lax

from mocosfl_jax.models import resnet

GRAMMAR = '[K<k>]C<c>[S<s>][noRELU]'
# The reference recognises these three spellings of noRELU.
_PATTERN = re.compile(
    r'(?:K(?P<k>\d+))?C(?P<c>\d+)(?:S(?P<s>\d+))?(?P<norelu>noRELU|norelu|noReLU)?')


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed option: ``channels`` after compression, ``stride``, ``kernel`` (stride 1 only)."""
  channels: int
  stride: int = 1
  kernel: int = 3
  relu: bool = True

  @property
  def num_convs(self) -> int:
    """Convs on each side: 1 at stride 1, else 1 + log2(stride / 2)."""
    return 1 if self.stride == 1 else int(math.log2(self.stride))


def problem(option: str) -> str:
  """Why ``option`` is not a bottleneck, or '' when it is one (or '', off)."""
  if not option:
    return ''
  match = _PATTERN.fullmatch(option)
  if not match:
    return f'use \'\' (off) or {GRAMMAR}, for example C4S2 or K1C8noRELU'
  k, c, s = match.group('k'), int(match.group('c')), int(match.group('s') or 1)
  if c < 1:
    return f'C{c}: the bottleneck needs at least 1 channel ({GRAMMAR})'
  if s < 1 or s & (s - 1):
    return f'S{s}: the stride must be a power of 2 (1, 2, 4, ...) ({GRAMMAR})'
  if k is not None and s > 1:
    return (f'K{k} with S{s}: the kernel applies only at stride 1; strided bottlenecks use 3x3 '
            f'convs ({GRAMMAR})')
  if k is not None and int(k) % 2 == 0:
    return f'K{k}: the kernel must be odd so that the conv keeps H and W ({GRAMMAR})'
  return ''


def parse(option: str) -> Spec | None:
  """The option's Spec, or None for '' (off).

  Raises:
    ValueError: ``problem(option)`` is not empty.
  """
  why = problem(option)
  if why:
    raise ValueError(f'bottleneck {option!r}: {why}')
  if not option:
    return None
  match = _PATTERN.fullmatch(option)
  return Spec(channels=int(match.group('c')), stride=int(match.group('s') or 1),
              kernel=int(match.group('k') or 3), relu=match.group('norelu') is None)


def shape_problem(option: str, smashed_hw: tuple[int, int]) -> str:
  """Why a valid ``option`` cannot restore smashed data of ``smashed_hw``, or ''."""
  spec = parse(option)
  if spec is None or all(n % spec.stride == 0 for n in smashed_hw):
    return ''
  h, w = smashed_hw
  return (f'S{spec.stride} does not divide the smashed data\'s {h}x{w}, so the server\'s '
          'transposed convs could not restore it: use a smaller stride or another '
          'cut_layer or image_size')


class BiasConv(nn.Module):
  """A plain conv with bias, Xavier init and PyTorch's symmetric padding (spec 1.8).

  ``as_matmul`` as in ``resnet.Conv``: vmapped over clients it becomes one
  batched matmul instead of a grouped convolution.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  as_matmul: bool = False

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', resnet.xavier, (k, k, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    kernel, bias = kernel.astype(x.dtype), bias.astype(x.dtype)
    padding = ((k // 2, k // 2), (k // 2, k // 2))
    strides = (self.strides, self.strides)
    if self.as_matmul:
      return resnet.conv_as_matmul(x, kernel, strides, padding) + bias
    return lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias


def conv_transpose(x, kernel, strides: int = 2, padding: int = 1, output_padding: int = 1):
  """PyTorch's ``conv_transpose2d`` (NHWC; ``kernel`` (kh, kw, in, out)), bias-free.

  Output size (H - 1) * strides - 2 * padding + kh + output_padding: 2H for
  the bottleneck's k3/s2/p1/op1. It is the gradient of a strided conv: the
  input dilated by ``strides``, padded by ``k - 1 - padding`` (plus the output
  padding after), convolved with the spatially flipped kernel.
  """
  kh, kw = kernel.shape[:2]
  pads = ((kh - 1 - padding, kh - 1 - padding + output_padding),
          (kw - 1 - padding, kw - 1 - padding + output_padding))
  return lax.conv_general_dilated(
      x, kernel[::-1, ::-1], (1, 1), pads, lhs_dilation=(strides, strides),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class BiasConvTranspose(nn.Module):
  """PyTorch's ConvTranspose2d(k3, s2, p1, output_padding=1) with bias and Xavier init."""
  features: int

  @nn.compact
  def __call__(self, x):
    # Xavier's bound depends on fan_in + fan_out only, so it is PyTorch's for
    # its (in, out, kh, kw) weight too.
    kernel = self.param('kernel', resnet.xavier, (3, 3, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    return conv_transpose(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)


class Compress(nn.Module):
  """The client's side, appended after its last module; its output is the smashed data."""
  option: str
  as_matmul: bool = False

  @nn.compact
  def __call__(self, x):
    spec = parse(self.option)
    for i in range(spec.num_convs):
      if i:
        x = nn.relu(x) if spec.relu else x
      kernel, stride = (spec.kernel, 1) if spec.stride == 1 else (3, 2)
      x = BiasConv(spec.channels, kernel, stride, self.as_matmul, name=f'conv{i + 1}')(x)
    return nn.relu(x) if spec.relu else x


class Decompress(nn.Module):
  """The server's side, prepended before its first module: back to ``features`` channels."""
  option: str
  features: int

  @nn.compact
  def __call__(self, x):
    spec = parse(self.option)
    if spec.stride == 1:
      x = BiasConv(self.features, spec.kernel, name='conv1')(x)
    else:
      for i in range(spec.num_convs):
        last = i == spec.num_convs - 1
        x = BiasConvTranspose(self.features if last else spec.channels, name=f'deconv{i + 1}')(x)
        if not last and spec.relu:
          x = nn.relu(x)
    return nn.relu(x) if spec.relu else x
