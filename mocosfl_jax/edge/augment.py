"""MoCo v1 / v2 pair augmentations in NumPy, for the edge client.

The simulator augments on the accelerator (mocosfl_jax/data/augment.py); an
edge device has neither JAX nor an accelerator, so the same pipeline is written
here with NumPy alone: the same random choices from the same distributions
(torchvision's RandomResizedCrop with its ten attempts and central fallback,
ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8 in a random order, grayscale
p = 0.2, MoCo v2's Gaussian blur p = 0.5 with sigma in [0.1, 2], flip p = 0.5),
and the same ops: PIL's antialiased bilinear resize, PIL's enhance blends, the
HSV hue rotation and a 13-tap Gaussian with repeated edges. Given the same
choices a view equals the simulator's to float32 rounding. The ops are NumPy
rather than Pillow calls because Pillow rounds to uint8 after every op and
blurs with three box filters: that would be the reference's pipeline, not the
simulator's, which keeps full precision.

Every view draws its choices from 35 uniforms of an explicit
``numpy.random.Generator``, so one generator state gives one set of views; the
uniforms come from NumPy's generator, not JAX's, so the views are not the
simulator's views, only views from the same distribution.

Views are float32 in [0, 1], channels last: the exported client model
normalises inside.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

VERSIONS = ('mocov2', 'mocov1')
# No augmentation, both views the image itself (resized to the model's size):
# fixed views, so that a run with edge clients can be compared with the pure
# simulation number for number (the simulator's moco.augmentation='none').
FIXED = 'none'

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
JITTER_P = 0.8
# ColorJitter(0.4, 0.4, 0.4, 0.1): brightness, contrast, saturation, hue.
JITTER_LOW = (0.6, 0.6, 0.6, -0.1)
JITTER_HIGH = (1.4, 1.4, 1.4, 0.1)
GRAYSCALE_P = 0.2
BLUR_P = {'mocov2': 0.5, 'mocov1': 0.0}
BLUR_SIGMA = (0.1, 2.0)
BLUR_RADIUS = 6
FLIP_P = 0.5
# ITU-R 601-2 luma, as PIL's convert('L').
_LUMA = (0.299, 0.587, 0.114)

_CROP_UNIFORMS = 2 * CROP_ATTEMPTS + 2
UNIFORMS_PER_VIEW = _CROP_UNIFORMS + 13


class ViewParams(NamedTuple):
  """Every random choice of one view (or, with a leading axis, of many)."""
  top: np.ndarray  # int: crop rows [top, top + height)
  left: np.ndarray  # int: crop columns [left, left + width)
  height: np.ndarray
  width: np.ndarray
  jitter: np.ndarray  # bool: apply the colour jitter
  factors: np.ndarray  # (..., 4) brightness, contrast, saturation factors, hue shift
  order: np.ndarray  # (..., 4) permutation of the jitter ops
  gray: np.ndarray  # bool
  blur: np.ndarray  # bool; always False for mocov1
  sigma: np.ndarray
  flip: np.ndarray  # bool


def check_version(version: str) -> None:
  if version not in VERSIONS + (FIXED,):
    raise ValueError(f'unknown augmentation version {version!r}; '
                     f'allowed: {", ".join(VERSIONS + (FIXED,))}')


# ---------------------------------------------------------------------------
# Drawing the choices.


def _fallback_box(height: int, width: int) -> tuple[int, int, int, int]:
  """torchvision's crop when no attempt fits: central, aspect clamped to the ratio range."""
  in_ratio = width / height
  if in_ratio < CROP_RATIO[0]:
    w, h = width, int(round(width / CROP_RATIO[0]))
  elif in_ratio > CROP_RATIO[1]:
    h, w = height, int(round(height * CROP_RATIO[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def _crop_boxes(u: np.ndarray, height: int, width: int, scale) -> tuple[np.ndarray, ...]:
  """torchvision's RandomResizedCrop.get_params from (n, 22) uniforms.

  All ten attempts are drawn at once and the first that fits is kept, which is
  the distribution of torchvision's loop without its data-dependent exit.
  """
  attempts = CROP_ATTEMPTS
  area = (scale[0] + (scale[1] - scale[0]) * u[:, :attempts]) * (height * width)
  log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
  aspect = np.exp(log_low + (log_high - log_low) * u[:, attempts:2 * attempts])
  # np.round rounds halves to even, as Python's round does in torchvision.
  w = np.round(np.sqrt(area * aspect)).astype(np.int64)
  h = np.round(np.sqrt(area / aspect)).astype(np.int64)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = np.argmax(fits, axis=1)
  found = fits[np.arange(len(u)), first]
  fb_top, fb_left, fb_h, fb_w = _fallback_box(height, width)
  h = np.where(found, h[np.arange(len(u)), first], fb_h)
  w = np.where(found, w[np.arange(len(u)), first], fb_w)
  # Uniform over 0..room, as torch.randint(0, room + 1).
  top = np.minimum(np.floor(u[:, -2] * (height - h + 1)).astype(np.int64), height - h)
  left = np.minimum(np.floor(u[:, -1] * (width - w + 1)).astype(np.int64), width - w)
  return np.where(found, top, fb_top), np.where(found, left, fb_left), h, w


def params_from_uniforms(u: np.ndarray, version: str, height: int, width: int,
                         crop_scale=CROP_SCALE) -> ViewParams:
  """The choices of n views of (height, width) images from (n, UNIFORMS_PER_VIEW) uniforms."""
  check_version(version)
  u = np.asarray(u, np.float64).reshape(-1, UNIFORMS_PER_VIEW)
  crop, v = u[:, :_CROP_UNIFORMS], u[:, _CROP_UNIFORMS:]
  low, high = np.asarray(JITTER_LOW), np.asarray(JITTER_HIGH)
  return ViewParams(
      *_crop_boxes(crop, height, width, crop_scale),
      jitter=v[:, 0] < JITTER_P,
      factors=(low + (high - low) * v[:, 1:5]).astype(np.float32),
      # The ranks of i.i.d. uniforms are a uniformly random permutation.
      order=np.argsort(v[:, 5:9], axis=1),
      gray=v[:, 9] < GRAYSCALE_P,
      blur=v[:, 10] < BLUR_P[version],
      sigma=(BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * v[:, 11]).astype(np.float32),
      flip=v[:, 12] < FLIP_P,
  )


def sample_params(rng: np.random.Generator, count: int, version: str, height: int, width: int,
                  crop_scale=CROP_SCALE) -> ViewParams:
  """The choices of ``count`` views of (height, width) images."""
  return params_from_uniforms(rng.random((count, UNIFORMS_PER_VIEW)), version, height, width,
                              crop_scale)


# ---------------------------------------------------------------------------
# The ops, on a batch of (N, H, W, 3) float32 images in [0, 1], one choice per
# image: a few array ops per batch, not per image, so Python's overhead stays
# small on a slow device core.


def _resample_matrices(start: np.ndarray, length: np.ndarray, in_size: int,
                       out_size: int) -> np.ndarray:
  """(N, out_size, in_size) weights of PIL's bilinear resize of pixels [start, start + length).

  A triangle filter widened by the scale when shrinking (PIL's antialiasing),
  cut at the box and renormalised, since PIL sees only the cropped image.
  """
  start, length = (np.asarray(v, np.float64)[:, None, None] for v in (start, length))
  scale = length / out_size
  support = np.maximum(scale, 1.0)
  centres = start + (np.arange(out_size)[:, None] + 0.5) * scale
  pixels = np.arange(in_size)
  weights = np.maximum(0.0, 1.0 - np.abs(pixels + 0.5 - centres) / support)
  weights = np.where((pixels >= start) & (pixels < start + length), weights, 0.0)
  return (weights / weights.sum(axis=2, keepdims=True)).astype(np.float32)


def _separable(rows: np.ndarray, images: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """rows[n] @ images[n] @ cols[n].T on each channel: (N, Y, H), (N, H, W, C), (N, X, W)."""
  n, height, width, channels = images.shape
  tall = (rows @ images.reshape(n, height, width * channels)).reshape(n, -1, width, channels)
  return np.matmul(cols[:, None], tall).astype(np.float32)


def resized_crop(images: np.ndarray, top, left, height, width, out_size: int) -> np.ndarray:
  """Each image's box (arrays of N) cropped and resized bilinearly to (out_size, out_size)."""
  rows = _resample_matrices(top, height, images.shape[1], out_size)
  cols = _resample_matrices(left, width, images.shape[2], out_size)
  return _separable(rows, images, cols)


def grayscale(images: np.ndarray) -> np.ndarray:
  """Luma replicated to three channels (RandomGrayscale's output)."""
  luma = sum(np.float32(weight) * images[..., c] for c, weight in enumerate(_LUMA))
  return np.repeat(luma[..., None], 3, axis=-1)


def _per_image(values) -> np.ndarray:
  return np.asarray(values, np.float32).reshape(-1, 1, 1, 1)


def _blend(images: np.ndarray, degenerate, factors) -> np.ndarray:
  """PIL's Image.blend as ImageEnhance uses it, clipped to the valid range."""
  return np.clip(degenerate + _per_image(factors) * (images - degenerate), 0.0, 1.0)


def adjust_brightness(images: np.ndarray, factors) -> np.ndarray:
  """Scales every pixel by its image's factor (a blend with black)."""
  return _blend(images, np.float32(0.0), factors)


def adjust_contrast(images: np.ndarray, factors) -> np.ndarray:
  """Blends with the image's mean luma: one scalar for the whole image."""
  mean = np.mean(grayscale(images)[..., 0], axis=(1, 2), dtype=np.float32)
  return _blend(images, _per_image(mean), factors)


def adjust_saturation(images: np.ndarray, factors) -> np.ndarray:
  """Blends with the image's own grayscale version."""
  return _blend(images, grayscale(images), factors)


def adjust_hue(images: np.ndarray, shifts) -> np.ndarray:
  """Rotates the hue by each image's shift, a fraction of the circle (dm_pix's HSV round trip)."""
  red, green, blue = images[..., 0], images[..., 1], images[..., 2]
  value = np.maximum(np.maximum(red, green), blue)
  range_ = value - np.minimum(np.minimum(red, green), blue)
  saturation = np.where(value > 0, range_ / np.where(value > 0, value, 1), 0).astype(np.float32)
  norm = 1 / (6 * np.where(range_ > 0, range_, 1))
  hue = np.where(value == green, norm * (blue - red) + 2 / 6, norm * (red - green) + 4 / 6)
  hue = np.where(value == red, norm * (green - blue), hue)
  hue = np.where(range_ > 0, hue, 0) + (hue < 0)
  dh = ((hue + _per_image(shifts)[..., 0]) % 1.0) * 6
  one_minus_s = 1 - saturation
  planes = [value * (one_minus_s + saturation * np.clip(d, 0, 1))
            for d in (np.abs(dh - 3) - 1, 2 - np.abs(dh - 2), 2 - np.abs(dh - 4))]
  return np.stack(planes, axis=-1).astype(np.float32)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(images: np.ndarray, factors: np.ndarray, order: np.ndarray) -> np.ndarray:
  """torchvision's ColorJitter: image n gets ``factors[n]`` (4,) applied in ``order[n]`` (4,)."""
  images = images.copy()
  for position in range(len(_JITTER_OPS)):
    for index, op in enumerate(_JITTER_OPS):
      chosen = order[:, position] == index
      if chosen.any():
        images[chosen] = op(images[chosen], factors[chosen, index])
  return images


def _blur_matrices(size: int, sigma: np.ndarray) -> np.ndarray:
  """(N, size, size) Gaussians of BLUR_RADIUS taps each side, edge pixels repeated."""
  taps = np.arange(-BLUR_RADIUS, BLUR_RADIUS + 1)
  kernel = np.exp(-0.5 * (taps / np.asarray(sigma, np.float32)[:, None]) ** 2)
  kernel = kernel / kernel.sum(axis=1, keepdims=True)
  sources = np.clip(np.arange(size)[:, None] + taps, 0, size - 1)
  # Row i sums the kernel over its clamped sources: the edge taps pile up there.
  picks = sources[:, :, None] == np.arange(size)  # (size, taps, size)
  return np.einsum('nt,itj->nij', kernel, picks).astype(np.float32)


def gaussian_blur(images: np.ndarray, sigma) -> np.ndarray:
  """PIL's GaussianBlur(radius=sigma) per image, as the simulator computes it (exact taps)."""
  return _separable(_blur_matrices(images.shape[1], sigma), images,
                    _blur_matrices(images.shape[2], sigma))


def apply_params(images: np.ndarray, p: ViewParams, version: str, out_size: int) -> np.ndarray:
  """Each image's choices applied: (N, H, W, 3) float32 and a ViewParams of N choices.

  The order is mocov2's; mocov1 flips right after the crop, but every later op
  is pointwise or mirror-symmetric, so only the missing blur tells them apart.
  """
  x = resized_crop(images, p.top, p.left, p.height, p.width, out_size)
  x[p.jitter] = color_jitter(x[p.jitter], p.factors[p.jitter], p.order[p.jitter])
  x[p.gray] = grayscale(x[p.gray])
  blur = p.blur & (BLUR_P[version] > 0)
  if blur.any():
    x[blur] = gaussian_blur(x[blur], p.sigma[blur])
  x[p.flip] = x[p.flip, :, ::-1]
  return x


def pair_views(rng: np.random.Generator, images: np.ndarray, version: str = 'mocov2',
               out_size: int = 32, crop_scale=CROP_SCALE) -> tuple[np.ndarray, np.ndarray]:
  """The two views of every image, as the simulator's pair loaders make them.

  Args:
    rng: the generator all choices come from; its state fixes the views.
    images: uint8 (B, H, W, 3).
    version: 'mocov2' (the paper's), 'mocov1', or 'none' (both views the
      image, resized bilinearly to ``out_size`` if it is not that size; ``rng``
      is not used).
    out_size: side of the square views (the model's image size).
    crop_scale: (min, max) fraction of the image area a crop covers.

  Returns:
    (view1, view2), float32 (B, out_size, out_size, 3) in [0, 1], not
    normalised; view1 is the query and view2 the key.
  """
  check_version(version)
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images have dtype {images.dtype} and shape {images.shape}, '
                     'expected uint8 (B, H, W, 3)')
  batch, height, width = images.shape[:3]
  pixels = images.astype(np.float32) / np.float32(255)
  if version == FIXED:
    whole = np.zeros(batch, np.int64), np.full(batch, height), np.full(batch, width)
    view = resized_crop(pixels, whole[0], whole[0], whole[1], whole[2], out_size)
    return view, view.copy()
  params = sample_params(rng, 2 * batch, version, height, width, crop_scale)
  views = apply_params(np.concatenate([pixels, pixels]), params, version, out_size)
  return views[:batch], views[batch:]
