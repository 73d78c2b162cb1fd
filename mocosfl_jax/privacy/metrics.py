"""Reconstruction quality per image (spec 6.1): MSE, SSIM and PSNR of images in [0, 1].

Every function takes two batches of NHWC images and returns one value per
image; the attack averages them over its test images, as the reference does
(which scores the images one at a time).

SSIM: dm-pix's ``pix.ssim`` (11x11 Gaussian window, sigma 1.5, C1 = 0.01^2,
C2 = 0.03^2, per channel, mean of the map) in two variants:
  * ``ssim`` (padding 'zero'), the attack's SSIM: a filter that zero-pads by
    5 pixels, so the map covers the whole image, as the reference's
    pytorch_ssim (``conv2d(..., padding=5)``) does; the numbers compare with
    the paper's and with ResSFL's target SSIM. The padding biases it upwards:
    the window's weights sum to less than 1 near the borders, so even a
    constant image gets a border "structure", and a mid-grey image scores
    about 0.28 against 32x32 textures (0.45 at 16x16);
  * ``ssim(padding='valid')``: dm-pix's own 'valid' filter (a 22x22 map for a
    32x32 image, borders left out, as tf.image.ssim), near 0 for a constant
    image; the attack reports it beside the reference's.
dm-pix clips the variances at 0 and the covariance by Cauchy-Schwarz: both
hold without clipping for a window whose weights sum to at most 1, as the
zero-padded one's do, so the clipping only absorbs rounding and the 'zero'
variant equals pytorch_ssim.
"""
from __future__ import annotations

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

WINDOW = 11
SIGMA = 1.5


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
  """The normalised 1-D Gaussian of pytorch_ssim (and dm-pix), centred at size // 2."""
  x = np.arange(size) - size // 2
  g = np.exp(-x**2 / (2 * sigma**2))
  return g / g.sum()


def _band(n: int, window: np.ndarray) -> np.ndarray:
  """(n, n) matrix of a 'same' convolution with zero padding: row i weighs pixels i +- r."""
  r = len(window) // 2
  offsets = np.arange(n)[None, :] - np.arange(n)[:, None] + r
  inside = (offsets >= 0) & (offsets < len(window))
  return np.where(inside, window[np.clip(offsets, 0, len(window) - 1)], 0.0).astype(np.float32)


def _zero_padded_blur(z):
  """The separable Gaussian of every channel of (N, H, W, C), zero padding of WINDOW // 2."""
  window = gaussian_window()
  rows, cols = _band(z.shape[-3], window), _band(z.shape[-2], window)
  return jnp.einsum('ij,...jkc,lk->...ilc', rows, z, cols, precision=jax.lax.Precision.HIGHEST)


def mse(a, b):
  """Mean squared error of each image pair, over pixels and channels."""
  return jnp.mean(jnp.square(a - b), axis=(-3, -2, -1))


def psnr(a, b):
  """10 log10(1 / MSE) of each image pair (peak 1): infinite for identical images."""
  return 10.0 * jnp.log10(1.0 / mse(a, b))


def ssim(a, b, padding: str = 'zero'):
  """SSIM of each image pair: the mean of its map, 'zero' (the reference's) or 'valid' padding."""
  if padding not in ('zero', 'valid'):
    raise ValueError(f"padding {padding!r}: use 'zero' or 'valid'")
  return pix.ssim(a, b, max_val=1.0, filter_size=WINDOW, filter_sigma=SIGMA,
                  filter_fn=_zero_padded_blur if padding == 'zero' else None)


def per_image(reconstructions, images) -> dict[str, jax.Array]:
  """{'mse', 'ssim', 'ssim_valid', 'psnr'}: one value per image."""
  return {'mse': mse(reconstructions, images), 'ssim': ssim(reconstructions, images),
          'ssim_valid': ssim(reconstructions, images, 'valid'),
          'psnr': psnr(reconstructions, images)}
