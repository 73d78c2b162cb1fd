"""Tests for the on-device MoCo pair augmentations against their definitions.

Probabilities are checked by counting many draws, with a tolerance of five
binomial standard deviations; the ops are checked against formulas, against
PIL where PIL is the reference's own implementation, and the vmapped pipeline
against a per-image Python loop.
"""
import collections
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from mocosfl_jax.data import augment

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
STAT_BATCH = 1000  # images per call in the counting tests: 2000 views
# The suite compiles unoptimised (conftest.py), but these pipelines run on
# thousands of images: optimised, they run several times faster.
OPTIMISED = {'xla_backend_optimization_level': 2, 'xla_llvm_disable_expensive_passes': False}


def _noise_images(batch, seed=0, size=32):
  return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def _ramp_images(batch, size=32):
  """Gray images growing darker to brighter left to right, 0..127.

  Every op keeps the ramp increasing: gray pixels ignore hue and saturation,
  brightness and contrast factors are positive and 127 * 1.4 stays below 255.
  So a view is mirrored exactly when its left half is the brighter one.
  """
  ramp = np.linspace(0, 127, size).round().astype(np.uint8)
  return np.broadcast_to(ramp[None, None, :, None], (batch, size, size, 3)).copy()


def _within_binomial(count, n, p):
  return abs(count / n - p) <= 5 * math.sqrt(p * (1 - p) / n)


def _unnormalize(views):
  return np.asarray(views) * np.asarray(STD) + np.asarray(MEAN)


_TRACES = collections.Counter()


@functools.lru_cache(maxsize=None)
def _jitted_augment(version):
  """One jitted pipeline per version, shared so that it compiles once.

  Every test calls it on STAT_BATCH images; it counts its own traces.
  """
  run = augment.make_pair_augment(version, MEAN, STD)

  def counted(key, images):
    _TRACES[version] += 1
    return run(key, images)

  return jax.jit(counted, compiler_options=OPTIMISED)


@functools.lru_cache(maxsize=None)
def _sampled_params(version, count=20000, height=32, width=32, crop_scale=augment.CROP_SCALE):
  keys = jax.random.split(jax.random.key(7), count)
  sample = functools.partial(augment.sample_view_params, version=version, height=height,
                             width=width, crop_scale=crop_scale)
  return jax.tree.map(np.asarray, jax.jit(jax.vmap(sample))(keys))


@pytest.fixture(scope='module')
def noise_views():
  return _jitted_augment('mocov2')(jax.random.key(1), _noise_images(STAT_BATCH))


# ---------------------------------------------------------------------------
# The public function.


def test_unknown_version_lists_the_allowed_ones():
  with pytest.raises(ValueError) as error:
    augment.make_pair_augment('simclr', MEAN, STD)
  message = str(error.value)
  assert '\n' not in message and 'mocov2' in message and 'mocov1' in message


def test_output_shape_dtype_and_range(noise_views):
  assert len(noise_views) == 2
  for view in noise_views:
    assert view.shape == (STAT_BATCH, 32, 32, 3) and view.dtype == jnp.float32
    pixels = _unnormalize(view)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
  small = jax.eval_shape(augment.make_pair_augment('mocov1', MEAN, STD, out_size=16),
                         jax.random.key(0), jax.ShapeDtypeStruct((5, 32, 32, 3), jnp.uint8))
  for view in small:
    assert view.shape == (5, 16, 16, 3) and view.dtype == jnp.float32


def test_normalize_is_scale_then_standardise():
  images = _noise_images(3)
  want = (images / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
  got = augment.normalize(images, MEAN, STD)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_same_key_same_views_and_other_keys_differ():
  run = _jitted_augment('mocov2')
  images = _noise_images(STAT_BATCH, seed=3)
  first = run(jax.random.key(3), images)
  again = run(jax.random.key(3), images)
  other = run(jax.random.key(4), images)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, c in zip(first, other):
    # Every image of every view changes with the key.
    assert np.all(np.abs(np.asarray(a) - np.asarray(c)).max(axis=(1, 2, 3)) > 1e-3)


def test_jit_compiles_once_per_shape():
  run = _jitted_augment('mocov2')
  run(jax.random.key(5), _noise_images(STAT_BATCH, seed=5))
  traces = _TRACES['mocov2']
  run(jax.random.key(6), _noise_images(STAT_BATCH, seed=6))
  assert traces >= 1 and _TRACES['mocov2'] == traces


def test_two_views_of_each_image_differ(noise_views):
  view1, view2 = map(np.asarray, noise_views)
  assert np.all(np.abs(view1 - view2).max(axis=(1, 2, 3)) > 1e-3)


def _loop_twin(version, key, images, count):
  """The first ``count`` images' views, one at a time, with Python control flow."""
  keys = jax.random.split(key, (2, len(images)))[:, :count]
  # Each op jitted on its own keeps the loop quick without fusing the pipeline.
  ops = [jax.jit(op) for op in (augment.adjust_brightness, augment.adjust_contrast,
                                augment.adjust_saturation, augment.adjust_hue)]
  sample = jax.jit(augment.sample_view_params, static_argnums=(1, 2, 3))
  crop = jax.jit(augment.resized_crop, static_argnums=2)
  gray, blur = jax.jit(augment.grayscale), jax.jit(augment.gaussian_blur)
  views = []
  for view_keys in keys:
    outputs = []
    for view_key, image in zip(view_keys, images):
      p = sample(view_key, version, *image.shape[:2])
      x = crop(image.astype(np.float32) / 255, p.box, 32)
      if p.jitter:
        for op_index in np.asarray(p.order):
          x = ops[op_index](x, p.factors[op_index])
      if p.gray:
        x = gray(x)
      if version == 'mocov2' and p.blur:
        x = blur(x, p.sigma)
      if p.flip:
        x = x[:, ::-1]
      outputs.append((np.asarray(x) - np.asarray(MEAN)) / np.asarray(STD))
    views.append(np.stack(outputs))
  return views


@pytest.mark.parametrize('version', augment.VERSIONS)
def test_batched_pipeline_matches_per_image_loop(version):
  # Eight images give both views a mix of jittered, gray, blurred and flipped draws.
  images = _noise_images(STAT_BATCH, seed=2)
  key = jax.random.key(11)
  got = _jitted_augment(version)(key, images)
  want = _loop_twin(version, key, images, count=8)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g[:8]), w, atol=2e-5)


def test_vmap_over_clients_matches_each_client():
  images = _noise_images(2 * STAT_BATCH, seed=4).reshape(2, STAT_BATCH, 32, 32, 3)
  keys = jax.random.split(jax.random.key(5), 2)
  batched = jax.jit(jax.vmap(augment.make_pair_augment('mocov2', MEAN, STD)),
                    compiler_options=OPTIMISED)(keys, images)
  for client in range(2):
    single = _jitted_augment('mocov2')(keys[client], images[client])
    for b, s in zip(batched, single):
      np.testing.assert_allclose(np.asarray(b[client]), np.asarray(s), atol=1e-5)


# ---------------------------------------------------------------------------
# Random-resized crop.


def _torchvision_crop_box(rng, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params, loop and all, in numpy."""
  area = height * width
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  return (height - height) // 2, (width - width) // 2, height, width  # square: whole image


def test_crop_boxes_follow_scale_and_ratio_and_torchvision_distribution():
  size, count = 224, 20000  # large, so rounding sides to pixels barely moves the ratios
  box = _sampled_params('mocov2', count, size, size).box
  top, left, h, w = (np.asarray(v) for v in box)
  assert np.all((top >= 0) & (left >= 0) & (top + h <= size) & (left + w <= size))
  fraction, log_ratio = h * w / size**2, np.log(w / h)
  assert fraction.min() >= 0.08 * 0.98 and fraction.max() <= 1
  assert np.all(np.abs(log_ratio) <= math.log(4 / 3) + 0.02)
  # The whole range is used, not a corner of it.
  assert fraction.min() < 0.09 and fraction.max() > 0.95
  assert log_ratio.min() < -0.27 and log_ratio.max() > 0.27
  rng = np.random.default_rng(0)
  reference = np.array([_torchvision_crop_box(rng, size, size) for _ in range(count)])
  ref_fraction = reference[:, 2] * reference[:, 3] / size**2
  ref_log_ratio = np.log(reference[:, 3] / reference[:, 2])
  for ours, theirs in ((fraction, ref_fraction), (log_ratio, ref_log_ratio)):
    assert abs(ours.mean() - theirs.mean()) <= 5 * theirs.std() * math.sqrt(2 / count)
    assert abs(ours.std() - theirs.std()) <= 0.05 * theirs.std()
  # The offset is uniform over the room left: on average half of it.
  room = size - h
  assert abs(np.mean(top[room > 0] / room[room > 0]) - 0.5) < 0.01


def test_crop_scale_is_configurable():
  _, _, h, w = (np.asarray(v) for v in _sampled_params('mocov2', 5000, 224, 224, (0.5, 1.0)).box)
  fraction = h * w / 224**2
  assert fraction.min() >= 0.5 * 0.98 and fraction.min() < 0.52 and fraction.max() > 0.95


def test_crop_boxes_on_cifar_sized_images_fit():
  top, left, h, w = (np.asarray(v) for v in _sampled_params('mocov2').box)
  assert np.all((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0))
  assert np.all((top + h <= 32) & (left + w <= 32))
  assert h.min() < 12 and (h * w).max() == 32 * 32


def test_crop_falls_back_to_a_central_box_with_clamped_ratio():
  # No attempt can fit a 64 x 2 image: the 2-wide box must be about 3 high.
  # torchvision then crops w = 2, h = round(2 / (3/4)) = 3 from the centre.
  keys = jax.random.split(jax.random.key(0), 50)
  boxes = jax.jit(jax.vmap(lambda k: augment.sample_crop_box(k, 64, 2)))(keys)
  for value, want in zip(boxes, (30, 0, 3, 2)):
    np.testing.assert_array_equal(np.asarray(value), want)


@pytest.mark.parametrize('box,out_size', [((3, 5, 10, 17), 32), ((0, 0, 9, 8), 32),
                                          ((20, 1, 12, 31), 32), ((4, 2, 28, 30), 16)])
def test_resized_crop_matches_pil_bilinear(box, out_size):
  # PIL's float mode resamples without rounding, so it can be matched closely.
  top, left, h, w = box
  image = np.random.default_rng(0).random((32, 32), dtype=np.float32)
  want = Image.fromarray(image, mode='F').crop((left, top, left + w, top + h)).resize(
      (out_size, out_size), Image.BILINEAR)
  got = augment.resized_crop(np.repeat(image[..., None], 3, axis=-1),
                             augment.CropBox(*(jnp.int32(v) for v in box)), out_size)
  for channel in range(3):
    np.testing.assert_allclose(np.asarray(got[..., channel]), np.asarray(want), atol=1e-5)


def test_resized_crop_of_the_whole_image_is_identity():
  image = np.random.default_rng(1).random((32, 32, 3), dtype=np.float32)
  got = augment.resized_crop(image, augment.CropBox(*(jnp.int32(v) for v in (0, 0, 32, 32))), 32)
  np.testing.assert_allclose(np.asarray(got), image, atol=1e-6)


# ---------------------------------------------------------------------------
# Colour.


def _colour_image(seed=0):
  return np.random.default_rng(seed).random((32, 32, 3), dtype=np.float32)


def test_grayscale_has_equal_channels_with_601_weights():
  image = _colour_image()
  got = np.asarray(augment.grayscale(image))
  want = image @ np.array([0.299, 0.587, 0.114], np.float32)
  for channel in range(3):
    np.testing.assert_allclose(got[..., channel], want, atol=1e-6)
  white = np.asarray(augment.grayscale(np.ones((2, 2, 3), np.float32)))
  np.testing.assert_allclose(white, 1.0, atol=1e-6)


def test_brightness_scales_and_clips():
  image = _colour_image()
  for factor in (0.6, 1.4):
    np.testing.assert_allclose(np.asarray(augment.adjust_brightness(image, factor)),
                               np.clip(image * factor, 0, 1), atol=1e-6)


def test_contrast_blends_with_one_mean_luma_for_the_whole_image():
  image = _colour_image() * np.array([1.0, 0.3, 0.6], np.float32)  # unequal channel means
  mean_luma = (image @ np.array([0.299, 0.587, 0.114], np.float32)).mean()
  for factor in (0.6, 1.4):
    want = np.clip(mean_luma + factor * (image - mean_luma), 0, 1)
    np.testing.assert_allclose(np.asarray(augment.adjust_contrast(image, factor)), want,
                               atol=1e-5)


def test_saturation_blends_with_the_grayscale_image():
  image = _colour_image()
  gray = (image @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
  for factor in (0.6, 1.4):
    want = np.clip(gray + factor * (image - gray), 0, 1)
    np.testing.assert_allclose(np.asarray(augment.adjust_saturation(image, factor)), want,
                               atol=1e-5)


@pytest.mark.parametrize('name', ['Brightness', 'Contrast', 'Color'])
def test_enhance_ops_match_pil_up_to_rounding(name):
  # The reference runs ImageEnhance on uint8 images; it rounds, we do not.
  op = {'Brightness': augment.adjust_brightness, 'Contrast': augment.adjust_contrast,
        'Color': augment.adjust_saturation}[name]
  image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  for factor in (0.6, 1.4):
    want = np.asarray(getattr(ImageEnhance, name)(Image.fromarray(image)).enhance(factor))
    got = np.asarray(op(image.astype(np.float32) / 255, factor)) * 255
    assert np.abs(got - want).max() <= 1.5


def test_hue_shift_of_zero_is_identity_and_shifts_are_fractions_of_the_circle():
  image = _colour_image()
  np.testing.assert_allclose(np.asarray(augment.adjust_hue(image, 0.0)), image, atol=1e-6)
  red = np.array([[[1.0, 0.0, 0.0]]], np.float32)
  np.testing.assert_allclose(np.asarray(augment.adjust_hue(red, 1 / 3)), [[[0, 1, 0]]],
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(augment.adjust_hue(red, -0.1)), [[[1, 0, 0.6]]],
                             atol=1e-5)


def test_color_jitter_applies_the_ops_in_the_drawn_order():
  ops = (augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation,
         augment.adjust_hue)
  image = _colour_image(seed=4)
  factors = jnp.array([1.35, 0.65, 1.3, 0.08])
  jitter = jax.jit(augment.color_jitter)
  results = []
  for order in itertools.permutations(range(4)):
    want = image
    for index in order:
      want = ops[index](want, factors[index])
    got = jitter(image, factors, jnp.array(order, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    results.append(np.asarray(got))
  # The order matters for these factors, so a fixed order would have failed above.
  assert len({r.round(4).tobytes() for r in results}) > 12


def test_jitter_factors_are_uniform_in_range():
  factors = _sampled_params('mocov2').factors
  for column, (low, high) in enumerate(zip(augment.JITTER_LOW, augment.JITTER_HIGH)):
    values = factors[:, column]
    assert values.min() >= low and values.max() <= high
    assert values.min() < low + 0.01 and values.max() > high - 0.01
    # Uniform: mean at the centre, standard deviation width / sqrt(12).
    assert abs(values.mean() - (low + high) / 2) < 0.01 * (high - low)
    assert abs(values.std() - (high - low) / math.sqrt(12)) < 0.02 * (high - low)
  np.testing.assert_allclose([augment.JITTER_LOW, augment.JITTER_HIGH],
                             [[0.6, 0.6, 0.6, -0.1], [1.4, 1.4, 1.4, 0.1]])


def test_jitter_order_is_a_uniform_permutation():
  order = _sampled_params('mocov2').order
  assert np.all(np.sort(order, axis=1) == np.arange(4))
  # Each op sits at each position a quarter of the time.
  for position, op in itertools.product(range(4), range(4)):
    assert _within_binomial(np.sum(order[:, position] == op), len(order), 0.25)


# ---------------------------------------------------------------------------
# Blur and flip.


def test_blur_keeps_a_constant_image_constant():
  image = np.full((32, 32, 3), 0.7, np.float32)
  for sigma in (0.1, 1.0, 2.0):
    np.testing.assert_allclose(np.asarray(augment.gaussian_blur(image, sigma)), 0.7,
                               atol=1e-6)


def test_blur_is_a_gaussian_with_repeated_edges():
  image = _colour_image(seed=5)
  taps = np.arange(-6, 7)
  for sigma in (0.5, 1.3, 2.0):
    kernel = np.exp(-0.5 * (taps / sigma)**2)
    kernel /= kernel.sum()
    padded = np.pad(image, ((6, 6), (6, 6), (0, 0)), mode='edge')
    rows = sum(k * padded[6 + t:38 + t] for k, t in zip(kernel, taps))
    want = sum(k * rows[:, 6 + t:38 + t] for k, t in zip(kernel, taps))
    np.testing.assert_allclose(np.asarray(augment.gaussian_blur(image, sigma)), want,
                               atol=1e-5)


def test_blur_matches_pil_radius_sigma():
  # PIL approximates the Gaussian with three box blurs of the same variance.
  yy, xx = np.mgrid[:32, :32]
  image = np.stack([128 + 100 * np.sin(xx / 3), 128 + 100 * np.cos(yy / 4),
                    128 + 50 * np.sin((xx + yy) / 5)], axis=-1).astype(np.uint8)
  for sigma in (0.5, 1.0, 2.0):
    want = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))
    got = np.asarray(augment.gaussian_blur(image.astype(np.float32), sigma))
    assert np.abs(got - want).mean() < 1.0


def test_flip_is_an_exact_mirror():
  image = _colour_image(seed=6)
  np.testing.assert_array_equal(np.asarray(augment.hflip(image)), image[:, ::-1])


# ---------------------------------------------------------------------------
# How often each op fires.


@pytest.mark.parametrize('version', augment.VERSIONS)
def test_op_probabilities(version):
  params = _sampled_params(version)
  n = len(params.flip)
  assert _within_binomial(params.jitter.sum(), n, 0.8)
  assert _within_binomial(params.gray.sum(), n, 0.2)
  assert _within_binomial(params.flip.sum(), n, 0.5)
  if version == 'mocov2':
    assert _within_binomial(params.blur.sum(), n, 0.5)
    assert params.sigma.min() >= 0.1 and params.sigma.max() <= 2.0
    assert abs(params.sigma.mean() - 1.05) < 0.02
  else:
    assert not params.blur.any()


def test_grayscaled_view_fraction(noise_views):
  pixels = np.concatenate([_unnormalize(v) for v in noise_views])
  spread = np.abs(pixels - pixels[..., :1]).max(axis=(1, 2, 3))
  # Colour views of noise keep channel gaps far above float error.
  assert np.all((spread < 1e-5) | (spread > 1e-2))
  assert _within_binomial(np.sum(spread < 1e-5), len(pixels), 0.2)


def test_flipped_view_fraction():
  views = _jitted_augment('mocov2')(jax.random.key(2), _ramp_images(STAT_BATCH))
  pixels = np.concatenate([_unnormalize(v)[..., 0] for v in views])
  left, right = pixels[:, :, :16].mean(axis=(1, 2)), pixels[:, :, 16:].mean(axis=(1, 2))
  assert np.all(left != right)
  assert _within_binomial(np.sum(left > right), len(pixels), 0.5)
