"""MoCo v1 / v2 pair augmentations, run on the device (spec 2.2).

The reference builds every view with torchvision transforms on a PIL image, one
image at a time on the host. Here the same pipeline runs on a batch of uint8
images inside the jitted training step. Each view first draws a small record of
random choices (:class:`ViewParams`) and then applies it; keeping the two apart
lets every op be tested against its definition and every probability be
checked by counting draws.

Images are float32 in [0, 1] between the ops, channels last. The reference
rounds to uint8 after every PIL op; we keep full precision instead.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

VERSIONS = ('mocov2', 'mocov1')
# Fixed views: both views are the image itself, normalised; no randomness. A
# run with edge clients (mocosfl_jax/serve.py) then gives the simulation's
# numbers to float tolerance, whatever each side's random streams.
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
# Taps on each side of the blur kernel: 3 sigma at the largest sigma.
BLUR_RADIUS = 6
FLIP_P = 0.5

# ITU-R 601-2 luma, as PIL's convert('L'). pix.rgb_to_grayscale uses 0.2989,
# whose weights sum to 0.9999 and so would darken white.
_LUMA = (0.299, 0.587, 0.114)


def normalize(images, mean, std):
  """uint8 images to [0, 1], then (x - mean) / std per channel; no augmentation."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (jnp.asarray(images).astype(jnp.float32) / 255.0 - mean) / std


# ---------------------------------------------------------------------------
# Random-resized crop.


class CropBox(NamedTuple):
  """A crop in pixels: rows [top, top + height), columns [left, left + width)."""
  top: jax.Array
  left: jax.Array
  height: jax.Array
  width: jax.Array


def _fallback_box(height: int, width: int, ratio) -> tuple[int, int, int, int]:
  """torchvision's crop when no attempt fits: central, aspect clamped to ratio."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _crop_box(uniforms, height: int, width: int, scale, ratio, attempts: int) -> CropBox:
  """The crop box of torchvision's RandomResizedCrop from 2 * attempts + 2 uniforms."""
  area = (scale[0] + (scale[1] - scale[0]) * uniforms[:attempts]) * (height * width)
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_low + (log_high - log_low) * uniforms[attempts:2 * attempts])
  # jnp.round rounds halves to even, as Python's round does in torchvision.
  w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(fits)
  found = fits[first]
  fb_top, fb_left, fb_h, fb_w = _fallback_box(height, width, ratio)
  h = jnp.where(found, h[first], fb_h)
  w = jnp.where(found, w[first], fb_w)

  def offset(u, room):  # uniform over 0..room, as torch.randint(0, room + 1)
    return jnp.minimum(jnp.floor(u * (room + 1)).astype(jnp.int32), room)

  top = jnp.where(found, offset(uniforms[-2], height - h), fb_top)
  left = jnp.where(found, offset(uniforms[-1], width - w), fb_left)
  return CropBox(top, left, h, w)


def sample_crop_box(key, height: int, width: int, scale=CROP_SCALE, ratio=CROP_RATIO,
                    attempts: int = CROP_ATTEMPTS) -> CropBox:
  """torchvision's RandomResizedCrop.get_params for one (height, width) image.

  torchvision loops over up to ``attempts`` draws of (area fraction, log-uniform
  aspect ratio) and keeps the first box that fits. All attempts are drawn at
  once here and the first fitting one is taken, which gives the same
  distribution without a data-dependent loop.
  """
  uniforms = jax.random.uniform(key, (2 * attempts + 2,))
  return _crop_box(uniforms, height, width, scale, ratio, attempts)


def _resample_matrix(start, length, in_size: int, out_size: int):
  """(out_size, in_size) weights of PIL's bilinear resize of pixels [start, start + length).

  jax.image.scale_and_translate has the same triangle kernel but would read
  pixels outside the box at its edges; PIL only ever sees the cropped image, so
  the weights are cut at the box and renormalised.
  """
  scale = jnp.asarray(length, jnp.float32) / out_size
  # Shrinking widens the triangle by the scale (PIL's antialiasing).
  support = jnp.maximum(scale, 1.0)
  centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  pixels = jnp.arange(in_size)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(pixels + 0.5 - centres[:, None]) / support)
  weights = jnp.where((pixels >= start) & (pixels < start + length), weights, 0.0)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def _separable(rows, image, cols):
  """rows @ image @ cols.T on each channel of an (H, W, C) image."""
  # HIGHEST keeps GPUs from rounding pixel values to TF32.
  return jnp.einsum('yh,hwc,xw->yxc', rows, image, cols,
                    precision=jax.lax.Precision.HIGHEST)


def resized_crop(image, box: CropBox, out_size: int):
  """Crops ``box`` from an (H, W, 3) image and resizes it bilinearly to out_size."""
  height, width = image.shape[:2]
  rows = _resample_matrix(box.top, box.height, height, out_size)
  cols = _resample_matrix(box.left, box.width, width, out_size)
  return _separable(rows, image, cols)


# ---------------------------------------------------------------------------
# Colour: torchvision's PIL semantics. pix's brightness is additive and its
# contrast and saturation work per channel in HSV, so those three are written
# out here; its hue shift is the same as torchvision's.


def grayscale(image):
  """Luma replicated to three channels (RandomGrayscale's output)."""
  # A weighted sum, not a matmul, which GPUs may round to TF32.
  luma = sum(weight * image[..., c] for c, weight in enumerate(_LUMA))
  return jnp.repeat(luma[..., None], 3, axis=-1)


def _blend(image, degenerate, factor):
  """PIL's Image.blend as ImageEnhance uses it, clipped to the valid range."""
  return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 1.0)


def adjust_brightness(image, factor):
  """Scales every pixel by ``factor`` (a blend with black)."""
  return _blend(image, 0.0, factor)


def adjust_contrast(image, factor):
  """Blends with the image's mean luma: one scalar for the whole image."""
  return _blend(image, jnp.mean(grayscale(image)[..., 0]), factor)


def adjust_saturation(image, factor):
  """Blends with the image's own grayscale version."""
  return _blend(image, grayscale(image), factor)


def adjust_hue(image, shift):
  """Rotates the hue by ``shift``, a fraction of the hue circle."""
  return pix.adjust_hue(image, shift)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(image, factors, order):
  """torchvision's ColorJitter with drawn ``factors``, applied in ``order``.

  Args:
    image: (H, W, 3) float32 in [0, 1].
    factors: (4,) brightness, contrast, saturation factors and hue shift.
    order: (4,) a permutation of 0..3 indexing ``factors``; torchvision's randperm.

  Returns:
    The jittered image, in [0, 1].
  """
  branches = [lambda x, op=op, i=i: op(x, factors[i]) for i, op in enumerate(_JITTER_OPS)]
  for position in range(len(_JITTER_OPS)):
    image = jax.lax.switch(order[position], branches, image)
  return image


# ---------------------------------------------------------------------------
# Blur and flip.


def gaussian_blur(image, sigma):
  """PIL's GaussianBlur(radius=sigma) of an (H, W, C) image: edge pixels repeat.

  pix.gaussian_blur pads with zeros, which darkens the border, and its one
  kernel per call vmaps into a slow grouped convolution. A per-image (n, n)
  matrix with the edge clamp folded in does both right, about 20x faster.
  """
  taps = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1)
  kernel = jnp.exp(-0.5 * (taps / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel)

  def matrix(n):
    sources = jnp.clip(jnp.arange(n)[:, None] + taps, 0, n - 1)
    return jnp.sum(jax.nn.one_hot(sources, n) * kernel[:, None], axis=1)

  return _separable(matrix(image.shape[0]), image, matrix(image.shape[1]))


def hflip(image):
  """Mirrors an (H, W, C) image left to right."""
  return pix.flip_left_right(image)


# ---------------------------------------------------------------------------
# One view: draw the choices, then apply them.


class ViewParams(NamedTuple):
  """Every random choice one view of one image needs."""
  box: CropBox
  jitter: jax.Array  # bool: apply the colour jitter
  factors: jax.Array  # (4,) brightness, contrast, saturation, hue shift
  order: jax.Array  # (4,) int32 permutation of the jitter ops
  gray: jax.Array  # bool
  blur: jax.Array  # bool; always False for mocov1
  sigma: jax.Array
  flip: jax.Array  # bool


def _check_version(version: str):
  if version not in VERSIONS:
    raise ValueError(f'unknown augmentation version {version!r}; allowed: {", ".join(VERSIONS)}')


def sample_view_params(key, version: str, height: int, width: int,
                       crop_scale=CROP_SCALE) -> ViewParams:
  """Draws the random choices of one view of one (height, width) image.

  Everything comes from one vector of uniforms: each separate jax.random call
  adds its own threefry to the program, and those dominate the compile time.
  """
  _check_version(version)
  num_crop = 2 * CROP_ATTEMPTS + 2
  u = jax.random.uniform(key, (num_crop + 13,))
  crop, u = u[:num_crop], u[num_crop:]
  low, high = jnp.asarray(JITTER_LOW), jnp.asarray(JITTER_HIGH)
  return ViewParams(
      box=_crop_box(crop, height, width, crop_scale, CROP_RATIO, CROP_ATTEMPTS),
      jitter=u[0] < JITTER_P,
      factors=low + (high - low) * u[1:5],
      # The ranks of i.i.d. uniforms are a uniformly random permutation.
      order=jnp.argsort(u[5:9]).astype(jnp.int32),
      gray=u[9] < GRAYSCALE_P,
      blur=u[10] < BLUR_P[version],
      sigma=BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[11],
      flip=u[12] < FLIP_P,
  )


def apply_view_params(image, params: ViewParams, version: str, out_size: int):
  """Applies one view's choices to an (H, W, 3) float32 image in [0, 1].

  The order is mocov2's. mocov1 flips right after the crop instead, but every
  later op is pointwise or mirror-symmetric, so the flip commutes with them and
  only the missing blur tells the two versions apart.
  """
  _check_version(version)
  x = resized_crop(image, params.box, out_size)
  x = jnp.where(params.jitter, color_jitter(x, params.factors, params.order), x)
  x = jnp.where(params.gray, grayscale(x), x)
  if BLUR_P[version] > 0:
    x = jnp.where(params.blur, gaussian_blur(x, params.sigma), x)
  return jnp.where(params.flip, hflip(x), x)


def resolve_version(moco_config) -> str:
  """``moco.augmentation`` resolved: 'auto' is MoCo v1's for the V1 head, v2's otherwise."""
  if moco_config.augmentation != 'auto':
    return moco_config.augmentation
  return 'mocov1' if moco_config.version == 'V1' else 'mocov2'


def make_pair_augment(version: str, mean, std, out_size: int = 32, crop_scale=CROP_SCALE):
  """Builds the two-view augmentation of the reference's pair loaders.

  Args:
    version: 'mocov2' (the paper's), 'mocov1', or 'none' (fixed views).
    mean: per-channel mean subtracted after scaling to [0, 1].
    std: per-channel std divided by after that.
    out_size: side of the square output views.
    crop_scale: (min, max) fraction of the image area a crop covers.

  Returns:
    ``augment(key, images) -> (view1, view2)``: images uint8 (B, H, W, 3);
    views float32 (B, out_size, out_size, 3), normalised; view1 is the query
    and view2 the key. Every image and view
    draws its own key from ``key``; the same key gives the same views. Pure,
    jittable and vmappable. With 'none' both views are the normalised images
    (which must be out_size already) and the key is unused.
  """
  if version == FIXED:
    def fixed(key, images):
      del key
      views = normalize(images, mean, std)
      return views, views
    return fixed
  _check_version(version)
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)

  def one_view(key, image):
    params = sample_view_params(key, version, image.shape[0], image.shape[1], crop_scale)
    return apply_view_params(image, params, version, out_size)

  def augment(key, images):
    batch = images.shape[0]
    keys = jax.random.split(key, (2, batch))
    x = images.astype(jnp.float32) / 255.0
    views = jax.vmap(jax.vmap(one_view), in_axes=(0, None))(keys, x)
    views = (views - mean) / std
    return views[0], views[1]

  return augment
