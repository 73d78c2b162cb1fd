"""Tests for the edge client library (mocosfl_jax/edge): data, views, schedule, client.

The library must run without JAX, so it is checked against the simulator here,
in the test process, where JAX is allowed: the NumPy views against the
simulator's sampler and ops, the NumPy schedule against the engine's optax
schedules. The client is driven through FakeModel, a NumPy stand-in with the
ClientModel's interface whose every call is logged.
"""
import functools
import io
import itertools
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from mocosfl_jax.edge import augment, data, schedule
from mocosfl_jax.edge.client import EdgeClient

SIDECAR = {
    'image_size': 16, 'batch': 4, 'trainable': True,
    'augmentation': {'version': 'mocov2', 'crop_scale_min': 0.08},
    'optimizer': {'momentum': 0.9, 'weight_decay': 5e-4, 'client_lr': 0.06,
                  'schedule': 'cosine', 'client_schedule': 'per_round', 'num_rounds': 10,
                  'multistep_gamma': 0.2, 'ema_decay': 0.99},
    'source': {'checkpoint': 'latest', 'round': 3, 'client_steps': None},
}


class FakeModel:
  """ClientModel's interface in NumPy: a 1x1 convolution to 2 channels, SGD, an EMA copy."""

  def __init__(self, sidecar=SIDECAR, seed=0):
    self.sidecar = sidecar
    self.batch = sidecar['batch']
    self.image_size = sidecar['image_size']
    self.trainable = sidecar['trainable']
    self.smashed_shape = (self.image_size, self.image_size, 2)  # one row
    w = np.random.default_rng(seed).normal(size=(3, 2)).astype(np.float32)
    self.weights = {'online/w': w, 'ema/w': w.copy(), 'momentum/w': np.zeros_like(w)}
    self.calls = []

  def _check(self, images):
    assert images.dtype == np.float32
    assert images.shape == (self.batch,) + self.smashed_shape[:2] + (3,)
    assert images.min() >= 0 and images.max() <= 1

  def infer(self, images):
    self._check(images)
    self.calls.append(('infer', images))
    return images @ self.weights['online/w']

  def ema_infer(self, images):
    self._check(images)
    self.calls.append(('ema_infer', images))
    return images @ self.weights['ema/w']

  def ema_update(self, decay):
    self.calls.append(('ema_update', decay))
    self.weights['ema/w'] = decay * self.weights['ema/w'] + (1 - decay) * self.weights['online/w']

  def train(self, images, smashed_grad, lr):
    self._check(images)
    self.calls.append(('train', images, smashed_grad, lr))
    opt = self.sidecar['optimizer']
    w = self.weights['online/w']
    grad = images.reshape(-1, 3).T @ smashed_grad.reshape(-1, 2) + opt['weight_decay'] * w
    self.weights['momentum/w'] = opt['momentum'] * self.weights['momentum/w'] + grad
    self.weights['online/w'] = w - lr * self.weights['momentum/w']

  def get_weights(self):
    return {k: v.copy() for k, v in self.weights.items()}

  def set_weights(self, weights):
    self.weights = {k: np.asarray(v, np.float32).copy() for k, v in weights.items()}


def _images(n, seed=0, size=12):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _within_binomial(count, n, p):
  return abs(count / n - p) <= 5 * math.sqrt(p * (1 - p) / n)


def _ks_distance(a, b):
  """Two-sample Kolmogorov-Smirnov statistic; exact for ties (discrete samples)."""
  a, b = np.sort(a), np.sort(b)
  points = np.union1d(a, b)
  return np.max(np.abs(np.searchsorted(a, points, 'right') / len(a)
                       - np.searchsorted(b, points, 'right') / len(b)))


def _ks_bound(n, alpha=1e-6):
  """The KS distance two samples of n from one distribution exceed with probability alpha."""
  return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt(2 / n)


# ---------------------------------------------------------------------------
# The edge process stays free of JAX and TensorFlow.


def test_edge_client_process_never_imports_jax_or_tensorflow(tmp_path):
  script = textwrap.dedent('''
      import importlib, pkgutil, sys
      import numpy as np
      import mocosfl_jax.edge as edge
      for module in pkgutil.iter_modules(edge.__path__):
        importlib.import_module('mocosfl_jax.edge.' + module.name)
      sys.path.insert(0, sys.argv[1])
      from test_edge_lib import FakeModel, _images
      from mocosfl_jax.edge.client import EdgeClient
      client = EdgeClient(FakeModel(), _images(6), seed=1)
      query, key = client.forward()
      client.apply_gradient(np.ones_like(query), round_index=0)
      client.save(sys.argv[2])
      heavy = ('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'tensorflow', 'ml_collections')
      print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))
      print(sorted(m.name for m in pkgutil.iter_modules(edge.__path__)))
  ''')
  result = subprocess.run(
      [sys.executable, '-c', script, os.path.dirname(__file__), str(tmp_path / 'ckpt.npz')],
      capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  loaded, modules = result.stdout.strip().splitlines()
  assert loaded == '[]'
  assert {'augment', 'client', 'data', 'model', 'schedule'} <= set(eval(modules))


# ---------------------------------------------------------------------------
# Views: the simulator's distributions and ops.

STAT_DRAWS = 40000


@functools.lru_cache(maxsize=None)
def _simulator_params(size):
  """The simulator's choices of STAT_DRAWS mocov2 views of size x size images."""
  import jax
  from mocosfl_jax.data import augment as sim
  sample = functools.partial(sim.sample_view_params, version='mocov2', height=size, width=size)
  keys = jax.random.split(jax.random.key(7), STAT_DRAWS)
  return jax.tree.map(np.asarray, jax.jit(jax.vmap(sample))(keys))


def _crop_statistics(top, height, width, size):
  """Area fraction, log aspect ratio and top offset as a fraction of the room left."""
  return height * width / size**2, np.log(width / height), top / np.maximum(size - height, 1)


def test_constants_are_the_simulators():
  from mocosfl_jax.data import augment as sim
  for name in ('VERSIONS', 'FIXED', 'CROP_SCALE', 'CROP_RATIO', 'CROP_ATTEMPTS', 'JITTER_P', 'JITTER_LOW',
               'JITTER_HIGH', 'GRAYSCALE_P', 'BLUR_P', 'BLUR_SIGMA', 'BLUR_RADIUS', 'FLIP_P',
               '_LUMA'):
    assert getattr(augment, name) == getattr(sim, name), name


@pytest.mark.parametrize('size', [32, 224])
def test_crop_distribution_matches_the_simulators(size):
  # 32: CIFAR, where sides round to few pixels; 224: the ranges themselves.
  theirs = _simulator_params(size).box
  ours = augment.sample_params(np.random.default_rng(0), STAT_DRAWS, 'mocov2', size, size)
  assert np.all((ours.top >= 0) & (ours.left >= 0) & (ours.height >= 1) & (ours.width >= 1))
  assert np.all((ours.top + ours.height <= size) & (ours.left + ours.width <= size))
  for a, b in zip(_crop_statistics(theirs.top, theirs.height, theirs.width, size),
                  _crop_statistics(ours.top, ours.height, ours.width, size)):
    assert _ks_distance(a, b) < _ks_bound(STAT_DRAWS)
  fraction, log_ratio, _ = _crop_statistics(ours.top, ours.height, ours.width, size)
  assert fraction.min() < 0.09 and fraction.max() > 0.95
  assert log_ratio.min() < -0.27 and log_ratio.max() > 0.27


def test_crop_scale_floor_moves_the_area_distribution():
  ours = augment.sample_params(np.random.default_rng(1), 5000, 'mocov2', 224, 224, (0.5, 1.0))
  fraction = ours.height * ours.width / 224**2
  assert fraction.min() >= 0.5 * 0.98 and fraction.min() < 0.52 and fraction.max() > 0.95


def test_crop_falls_back_to_a_central_box_with_clamped_ratio():
  # No attempt fits a 64 x 2 image; torchvision then crops 3 x 2 from the centre.
  ours = augment.sample_params(np.random.default_rng(2), 50, 'mocov2', 64, 2)
  for value, want in zip((ours.top, ours.left, ours.height, ours.width), (30, 0, 3, 2)):
    np.testing.assert_array_equal(value, want)


def test_jitter_factors_sigma_and_order_match_the_simulators():
  theirs = _simulator_params(32)
  ours = augment.sample_params(np.random.default_rng(3), STAT_DRAWS, 'mocov2', 32, 32)
  for column, (low, high) in enumerate(zip(augment.JITTER_LOW, augment.JITTER_HIGH)):
    values = ours.factors[:, column]
    assert values.min() >= low and values.max() <= high
    assert values.min() < low + 0.01 and values.max() > high - 0.01
    assert _ks_distance(values, theirs.factors[:, column]) < _ks_bound(STAT_DRAWS)
  assert ours.sigma.min() >= 0.1 and ours.sigma.max() <= 2.0
  assert _ks_distance(ours.sigma, theirs.sigma) < _ks_bound(STAT_DRAWS)
  assert np.all(np.sort(ours.order, axis=1) == np.arange(4))
  for position, op in itertools.product(range(4), range(4)):
    assert _within_binomial(np.sum(ours.order[:, position] == op), STAT_DRAWS, 0.25)


@pytest.mark.parametrize('version', augment.VERSIONS)
def test_op_frequencies(version):
  ours = augment.sample_params(np.random.default_rng(4), STAT_DRAWS, version, 32, 32)
  assert _within_binomial(ours.jitter.sum(), STAT_DRAWS, 0.8)
  assert _within_binomial(ours.gray.sum(), STAT_DRAWS, 0.2)
  assert _within_binomial(ours.flip.sum(), STAT_DRAWS, 0.5)
  if version == 'mocov2':
    assert _within_binomial(ours.blur.sum(), STAT_DRAWS, 0.5)
  else:
    assert not ours.blur.any()


def test_views_equal_the_simulators_for_the_same_choices():
  import jax
  from mocosfl_jax.data import augment as sim
  count, height, width = 24, 36, 28  # not square, so rows and columns cannot be swapped
  images = _images(count, seed=5, size=1)[:, :1, :1].repeat(height, 1).repeat(width, 2)
  images = (images.astype(np.int32) + _images(count, seed=6, size=36)[:, :, :28] // 2) % 256
  pixels = images.astype(np.float32) / 255
  p = augment.sample_params(np.random.default_rng(7), count, 'mocov2', height, width)
  for flag in (p.jitter, p.gray, p.blur, p.flip):
    assert flag.any() and not flag.all()  # both branches of every op are compared
  theirs = sim.ViewParams(sim.CropBox(*(np.int32(v) for v in (p.top, p.left, p.height, p.width))),
                          p.jitter, p.factors, p.order.astype(np.int32), p.gray, p.blur, p.sigma,
                          p.flip)
  apply = jax.jit(jax.vmap(lambda x, q: sim.apply_view_params(x, q, 'mocov2', 32)))
  want = np.asarray(apply(pixels, theirs))
  np.testing.assert_allclose(augment.apply_params(pixels, p, 'mocov2', 32), want, atol=2e-6)


def test_pair_views_are_float_in_unit_range_and_fixed_by_the_generator():
  images = _images(5, size=20)
  first = augment.pair_views(np.random.default_rng(8), images, 'mocov2', 16)
  again = augment.pair_views(np.random.default_rng(8), images, 'mocov2', 16)
  other = augment.pair_views(np.random.default_rng(9), images, 'mocov2', 16)
  for a, b, c in zip(first, again, other):
    assert a.shape == (5, 16, 16, 3) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert np.all(np.abs(a - c).max(axis=(1, 2, 3)) > 1e-3)
  assert np.all(np.abs(first[0] - first[1]).max(axis=(1, 2, 3)) > 1e-3)


def test_pair_views_reject_bad_input():
  with pytest.raises(ValueError, match="unknown augmentation version 'simclr'; allowed: mocov2"):
    augment.pair_views(np.random.default_rng(0), _images(2), 'simclr')
  with pytest.raises(ValueError, match='expected uint8'):
    augment.pair_views(np.random.default_rng(0), _images(2).astype(np.float32))


# ---------------------------------------------------------------------------
# Schedule: the engine's, in NumPy.


def _engine_client_lr(kind, client_schedule, base, num_rounds):
  """client_lr(steps, round) as the engine resolves it (optim.learning_rates)."""
  from mocosfl_jax import config as config_lib
  from mocosfl_jax.sfl import optim
  config = config_lib.default_config()
  config.optim.client_lr, config.num_rounds = base, num_rounds
  config.optim.schedule, config.optim.client_schedule = kind, client_schedule
  return optim.learning_rates(config)[1]


@pytest.mark.parametrize('kind,client_schedule', list(itertools.product(
    schedule.KINDS, schedule.CLIENT_SCHEDULES)))
@pytest.mark.parametrize('num_rounds', [1, 10, 200])
def test_schedule_equals_the_engines(kind, client_schedule, num_rounds):
  import jax.numpy as jnp
  base = 0.1
  engine = _engine_client_lr(kind, client_schedule, base, num_rounds)
  ours = schedule.ClientSchedule(dict(SIDECAR['optimizer'], client_lr=base, schedule=kind,
                                      client_schedule=client_schedule, num_rounds=num_rounds))
  rounds = sorted({0, 1, num_rounds // 2, int(0.6 * num_rounds), int(0.8 * num_rounds),
                   num_rounds - 1, num_rounds, num_rounds + 2})
  steps, rnds = (a.ravel() for a in np.meshgrid(np.arange(3 * num_rounds + 3), rounds))
  want = np.asarray(engine(jnp.asarray(steps, jnp.int32), jnp.asarray(rnds, jnp.int32)))
  got = np.array([ours.lr(int(t), int(r)) for t, r in zip(steps, rnds)])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


def test_schedule_shapes_that_tell_the_kinds_apart():
  make = lambda **kw: schedule.ClientSchedule(dict(SIDECAR['optimizer'], client_lr=1.0,
                                                   num_rounds=10, **kw))
  per_round = make(schedule='cosine', client_schedule='per_round')
  per_step = make(schedule='cosine', client_schedule='per_client_step')
  steps = make(schedule='multistep', client_schedule='per_round')
  assert per_round.lr(999, 0) == 1.0 and per_round.lr(0, 5) == pytest.approx(0.5)
  assert per_round.lr(0, 15) == 0.0  # optax holds at zero past the horizon
  assert per_step.lr(15, 0) == pytest.approx(0.5)  # the reference's cosine oscillates
  assert per_step.lr(20, 99) == pytest.approx(1.0)
  assert [steps.lr(0, r) for r in (5, 6, 7, 8, 9)] == pytest.approx([1, 0.2, 0.2, 0.04, 0.04])
  halving = make(schedule='multistep', client_schedule='per_round', multistep_gamma=0.5)
  assert halving.lr(0, 9) == 0.25


def test_schedule_rejects_unknown_kinds_and_missing_fields():
  with pytest.raises(ValueError, match="unknown schedule 'auto'; allowed: cosine, multistep"):
    schedule.ClientSchedule(dict(SIDECAR['optimizer'], schedule='auto'))
  with pytest.raises(ValueError, match="unknown client_schedule 'per_step'"):
    schedule.ClientSchedule(dict(SIDECAR['optimizer'], client_schedule='per_step'))
  with pytest.raises(ValueError, match="no 'num_rounds'"):
    schedule.ClientSchedule({k: v for k, v in SIDECAR['optimizer'].items() if k != 'num_rounds'})


# ---------------------------------------------------------------------------
# Data.


def _encode(image, format='PNG', mode='RGB'):
  buffer = io.BytesIO()
  Image.fromarray(image).convert(mode).save(buffer, format=format)
  return buffer.getvalue()


def _write_npz(file, encoded, **overrides):
  """An archive in the simulator's npz source format."""
  offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
  arrays = dict(jpeg=np.frombuffer(b''.join(encoded), np.uint8), offsets=offsets,
                labels=np.zeros(len(encoded), np.int64), classes=np.array(['only']))
  arrays.update(overrides)
  np.savez(file, **arrays)


def test_folder_with_loose_images_and_class_subfolders(tmp_path):
  images = _images(4, seed=10, size=8)
  (tmp_path / 'cat').mkdir()
  (tmp_path / 'b.png').write_bytes(_encode(images[0]))
  (tmp_path / 'cat' / 'a.png').write_bytes(_encode(images[1]))
  (tmp_path / 'cat' / 'b.PNG').write_bytes(_encode(images[2], mode='RGBA'))
  (tmp_path / 'a.bmp').write_bytes(_encode(images[3], format='BMP'))
  (tmp_path / 'notes.txt').write_text('not an image')
  (tmp_path / '.hidden.png').write_bytes(b'junk')
  got = data.load_images(str(tmp_path), image_size=8)
  assert got.dtype == np.uint8 and got.shape == (4, 8, 8, 3)
  # Sorted: loose files and folders by name, then files within a folder.
  np.testing.assert_array_equal(got, images[[3, 0, 1, 2]])


def test_npz_gives_the_simulators_pixels(tmp_path):
  import ml_collections
  from mocosfl_jax.data import sources
  images = _images(5, seed=11, size=8)
  folder = tmp_path / 'npz'
  folder.mkdir()
  encoded = [_encode(image, format='JPEG') for image in images[:4]] + [_encode(images[4], mode='L')]
  _write_npz(folder / 'train.npz', encoded)
  config = ml_collections.ConfigDict(dict(source='npz', name='x', path=str(folder), data_dir='',
                                          download=False, cache_dir=str(tmp_path / 'cache')))
  want = sources.load_split(config, 'train').images
  got = data.load_images(str(folder / 'train.npz'), image_size=8)
  np.testing.assert_array_equal(got, want)


def test_exif_orientation_is_applied():
  # A camera's portrait photo: stored sideways, tagged "rotate 90 degrees clockwise".
  image = np.zeros((4, 8, 3), np.uint8)
  image[:, :4, 0] = 255
  exif = Image.Exif()
  exif[0x0112] = 6
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG', exif=exif)
  got = data.decode(buffer.getvalue(), 'photo', None)
  assert got.shape == (8, 4, 3)
  assert np.all(got[:4, :, 0] == 255) and np.all(got[4:, :, 0] == 0)


def test_other_sizes_are_scaled_by_the_shorter_side_and_centre_cropped(tmp_path):
  # Left third red, middle green, right third blue: the centre crop keeps the green.
  wide = np.zeros((20, 60, 3), np.uint8)
  wide[:, :20, 0], wide[:, 20:40, 1], wide[:, 40:, 2] = 255, 255, 255
  (tmp_path / 'wide.png').write_bytes(_encode(wide))
  (tmp_path / 'small.png').write_bytes(_encode(_images(1, size=5)[0]))
  got = data.load_images(str(tmp_path), image_size=10)
  assert got.shape == (2, 10, 10, 3)
  assert np.all(got[1][:, 1:-1] == [0, 255, 0])
  with pytest.raises(data.DataError, match='wide.png: image is 60x20 but .*small.png is 5x5'):
    data.load_images(str(tmp_path), image_size=None)


def test_data_errors_are_one_line_and_name_the_problem(tmp_path):
  def error(path, size=8):
    with pytest.raises(data.DataError) as raised:
      data.load_images(str(path), size)
    assert isinstance(raised.value, ValueError) and '\n' not in str(raised.value)
    return str(raised.value)

  assert 'does not exist' in error(tmp_path / 'missing')
  (tmp_path / 'empty').mkdir()
  assert 'holds no .png/.jpg/.jpeg/.bmp/.webp files' in error(tmp_path / 'empty')
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'x.jpg').write_bytes(b'not a jpeg')
  assert f'{tmp_path / "bad" / "x.jpg"}: cannot decode the image' in error(tmp_path / 'bad')
  (tmp_path / 'file.txt').write_text('x')
  assert 'neither a folder nor an .npz' in error(tmp_path / 'file.txt')
  (tmp_path / 'broken.npz').write_bytes(b'PK\x03\x04 truncated')
  assert 'broken.npz: unreadable archive' in error(tmp_path / 'broken.npz')
  good = [_encode(image) for image in _images(2, size=8)]
  _write_npz(tmp_path / 'short.npz', good, offsets=np.array([0, 5]))
  assert 'short.npz: offsets (2,) do not cut jpeg' in error(tmp_path / 'short.npz')
  np.savez(tmp_path / 'partial.npz', jpeg=np.zeros(3, np.uint8))
  assert "partial.npz: missing arrays ['classes', 'labels', 'offsets']" in error(
      tmp_path / 'partial.npz')
  _write_npz(tmp_path / 'corrupt.npz', [good[0], b'garbage!'])
  assert 'corrupt.npz image 1: cannot decode the image' in error(tmp_path / 'corrupt.npz')


# ---------------------------------------------------------------------------
# The client.


def _client(count=10, seed=1, sidecar=SIDECAR, model_seed=0):
  return EdgeClient(FakeModel(sidecar, model_seed), _images(count, seed=12), seed=seed)


def test_data_walk_takes_whole_batches_and_reshuffles_each_pass():
  client = _client(count=10)  # batch 4: two batches a pass, two images skipped
  batches = [client.batch_ids(step) for step in range(8)]
  passes = [np.concatenate(batches[i:i + 2]) for i in range(0, 8, 2)]
  for ids in passes:
    assert len(set(ids.tolist())) == 8 and ids.min() >= 0 and ids.max() < 10
  assert len({ids.tobytes() for ids in passes}) == 4  # a fresh shuffle every pass
  # Every image is reached: a pass skips a different remainder.
  assert set(np.concatenate(passes).tolist()) == set(range(10))
  again = _client(count=10)
  other = _client(count=10, seed=2)
  assert all(np.array_equal(a, again.batch_ids(t)) for t, a in enumerate(batches))
  assert not all(np.array_equal(a, other.batch_ids(t)) for t, a in enumerate(batches))


def test_a_client_with_fewer_images_than_a_batch_wraps_around():
  client = _client(count=3)
  for step in range(4):
    ids = client.batch_ids(step)
    assert len(ids) == 4 and set(ids.tolist()) == {0, 1, 2} and ids[3] == ids[0]


def test_step_runs_in_the_engines_order_with_the_scheduled_rate():
  client = _client()
  model = client.model
  before = model.get_weights()
  query, key = client.forward()
  names = [call[0] for call in model.calls]
  assert names == ['infer', 'ema_update', 'ema_infer']
  view1, view2 = client.views(0)
  np.testing.assert_array_equal(model.calls[0][1], view1)
  np.testing.assert_array_equal(model.calls[2][1], view2)
  # The EMA moved towards the pre-step online weights before its forward pass.
  ema = 0.99 * before['ema/w'] + 0.01 * before['online/w']
  np.testing.assert_allclose(key, view2 @ ema, rtol=1e-6)
  np.testing.assert_allclose(query, view1 @ before['online/w'], rtol=1e-6)
  grad = np.random.default_rng(0).normal(size=query.shape).astype(np.float32)
  lr = client.apply_gradient(grad, round_index=3)
  _, images, sent, used = model.calls[-1]
  np.testing.assert_array_equal(images, view1)
  np.testing.assert_array_equal(sent, grad)
  assert lr == used == schedule.ClientSchedule(SIDECAR['optimizer']).lr(0, 3)
  assert client.steps == 1
  # A client exported after one step goes on with the second batch and views.
  exported = dict(SIDECAR, source=dict(SIDECAR['source'], client_steps=1))
  for later in (EdgeClient(FakeModel(), _images(10, seed=12), seed=1, steps=1),
                EdgeClient(FakeModel(exported), _images(10, seed=12), seed=1)):
    assert later.steps == 1
    later.forward()
    np.testing.assert_array_equal(later.model.calls[0][1], client.views(1)[0])
  per_step = dict(SIDECAR, optimizer=dict(SIDECAR['optimizer'], client_schedule='per_client_step'))
  client = _client(sidecar=per_step)
  for step in range(3):
    client.forward()
    assert client.apply_gradient(grad, round_index=0) == pytest.approx(
        0.06 * 0.5 * (1 + math.cos(math.pi * step / 10)))


def test_step_protocol_errors():
  client = _client()
  with pytest.raises(RuntimeError, match='call forward'):
    client.apply_gradient(np.zeros((4,) + client.model.smashed_shape), 0)
  query, _ = client.forward()
  with pytest.raises(RuntimeError, match='forward\\(\\) called twice'):
    client.forward()
  with pytest.raises(ValueError, match=r'gradient has shape \(4, 16, 16, 3\), expected'):
    client.apply_gradient(np.zeros(query.shape[:3] + (3,)), 0)
  with pytest.raises(ValueError, match='expected uint8'):
    EdgeClient(FakeModel(), _images(3).astype(np.float32))
  with pytest.raises(ValueError, match='steps -1 must be a non-negative integer'):
    EdgeClient(FakeModel(), _images(3), steps=-1)


def test_a_frozen_client_runs_infer_on_both_views_and_takes_no_gradient():
  client = _client(sidecar=dict(SIDECAR, trainable=False))
  query, key = client.forward()
  assert [call[0] for call in client.model.calls] == ['infer', 'infer'] and client.steps == 1
  view1, view2 = client.views(0)
  np.testing.assert_allclose(key, view2 @ client.model.weights['online/w'], rtol=1e-6)
  with pytest.raises(ValueError, match='frozen'):
    client.apply_gradient(np.zeros_like(query), 0)


def _train(client, steps):
  outputs = []
  for _ in range(steps):
    query, key = client.forward()
    client.apply_gradient(np.full_like(query, 0.1), round_index=1)
    outputs.append((query, key))
  return outputs


def test_checkpoint_round_trip_continues_the_same_run(tmp_path):
  path = str(tmp_path / 'client.npz')
  original = _client(seed=5)
  _train(original, 3)
  original.save(path)
  assert os.listdir(tmp_path) == ['client.npz']  # the temporary file was renamed
  resumed = _client(seed=0, model_seed=1)
  resumed.load(path)
  assert resumed.steps == 3 and resumed.seed == 5
  for name, value in original.get_weights().items():
    np.testing.assert_array_equal(resumed.get_weights()[name], value)
  for (q1, k1), (q2, k2) in zip(_train(original, 2), _train(resumed, 2)):
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(k1, k2)
  original.save(path)  # overwrites in place
  resumed.load(path)
  assert resumed.steps == 5


def test_checkpoint_errors(tmp_path):
  client = _client()
  with pytest.raises(ValueError, match='does not exist'):
    client.load(str(tmp_path / 'none.npz'))
  (tmp_path / 'junk.npz').write_bytes(b'junk')
  with pytest.raises(ValueError, match='junk.npz: unreadable checkpoint'):
    client.load(str(tmp_path / 'junk.npz'))
  np.savez(tmp_path / 'other.npz', x=np.zeros(1))
  with pytest.raises(ValueError, match='not an edge client checkpoint'):
    client.load(str(tmp_path / 'other.npz'))
  bigger = FakeModel()
  bigger.weights['online/w'] = np.zeros((3, 5), np.float32)
  EdgeClient(bigger, _images(4)).save(str(tmp_path / 'bigger.npz'))
  with pytest.raises(ValueError, match='do not fit this client model'):
    client.load(str(tmp_path / 'bigger.npz'))
