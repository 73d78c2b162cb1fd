"""Dataset sources: every source yields uint8 NHWC images, int labels and class names.

A source is chosen by ``config.data.source``. The trainer only ever sees a
:class:`Split`; where the pixels came from is this module's business.

Sources other than ``digits`` decode their input once and keep the decoded
arrays in ``config.data.cache_dir``, keyed by source, name, split, resolved
path, image size and the size and modification time of every input file, so a second run
starts in seconds and an edited dataset is decoded afresh. A split read from
the cache holds its images memory-mapped: a process reads from disk only the
images it uses (on many hosts, those of its own clients; train.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import os
import pickle
import re
import socket
import tempfile
import threading
from typing import Any, Callable
import urllib.parse
import urllib.request
import zipfile

import ml_collections
import numpy as np


class DataError(ValueError):
  """Bad or missing data; its message is one line that says what to do."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a dataset, held in host memory."""
  images: np.ndarray  # uint8, (n, H, W, 3); read-only and memory-mapped when cached
  labels: np.ndarray  # int32, (n,)
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.labels)


# Normalisation statistics exactly as the reference uses them (spec 2.1, 9.26):
# the CIFAR-10 std is the widely copied (0.2023, 0.1994, 0.2010), not the true one.
NORMALIZATION = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'cifar100': ((0.50708, 0.48655, 0.44092), (0.26733, 0.25644, 0.27615)),
    'svhn_cropped': ((0.3522, 0.4004, 0.4463), (0.1189, 0.1377, 0.1784)),
    'stl10': ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    'digits': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

SOURCES = ('digits', 'npz', 'cifar_python', 'image_folder', 'tfds')

# Under 'mocosfl_jax', which the command line shows at INFO.
_log = logging.getLogger(__name__)
# Bump when the cached arrays' layout or meaning changes, so old entries miss.
_CACHE_VERSION = 2
# How long to wait for a download host before telling an offline user what to do.
_PROBE_TIMEOUT_S = 3.0
_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
# Image modes that become RGB without inventing or dropping information.
_CONVERTIBLE_MODES = ('RGB', 'L', 'P')


def normalization(name: str, train_images: np.ndarray | None = None
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel of pixels scaled to [0, 1], for the dataset ``name``.

  The reference's statistics for the names in NORMALIZATION. Any other name
  gets the per-channel mean and std of ``train_images``, as such constants
  are made, rather than another dataset's statistics.

  Raises:
    ValueError: ``name`` is not in NORMALIZATION and ``train_images`` is None.
  """
  if name in NORMALIZATION:
    return NORMALIZATION[name]
  if train_images is None:
    raise ValueError(f'no statistics for data.name {name!r}: pass its training images')
  mean, std = _channel_statistics(train_images)
  _log.info('data.name %r has no reference statistics: normalising with its training set\'s '
            'mean (%s) and std (%s)', name, ', '.join(f'{m:.4f}' for m in mean),
            ', '.join(f'{s:.4f}' for s in std))
  return mean, std


def _channel_statistics(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Exact per-channel mean and population std of uint8 NHWC images, in [0, 1] units.

  From per-channel histograms of chunks, so that 50,000 CIFAR images need
  megabytes, not the gigabytes of a float copy.
  """
  channels = images.shape[-1]
  counts = np.zeros((channels, 256), np.int64)
  for start in range(0, len(images), 4096):
    pixels = images[start:start + 4096].reshape(-1, channels)
    for c in range(channels):
      counts[c] += np.bincount(pixels[:, c], minlength=256)
  values = np.arange(256) / 255.0
  mean = counts @ values / counts.sum(1)
  var = counts @ values**2 / counts.sum(1) - mean**2
  # A constant channel would divide by zero; one grey level keeps it finite.
  std = np.maximum(np.sqrt(np.maximum(var, 0.0)), 1.0 / 255.0)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _digits(split: str, image_size: int = 32) -> Split:
  """scikit-learn's bundled 8x8 digits (1,797 real images, no download).

  Upsampled to ``image_size`` and repeated over three channels so the CIFAR
  network applies unchanged. The last 20% (a fixed, seeded choice) is the test split.
  """
  from PIL import Image
  from sklearn.datasets import load_digits

  digits = load_digits()
  pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
  order = np.random.default_rng(0).permutation(len(pixels))
  cut = int(0.8 * len(pixels))
  chosen = order[:cut] if split == 'train' else order[cut:]
  images = np.stack([
      np.asarray(Image.fromarray(pixels[i]).resize((image_size, image_size), Image.BILINEAR))
      for i in chosen])
  images = np.repeat(images[..., None], 3, axis=-1)
  return Split(images, digits.target[chosen].astype(np.int32),
               tuple(str(c) for c in range(10)))


@dataclasses.dataclass(frozen=True)
class _Input:
  """What a source will read for one split, found before anything is decoded."""
  root: str  # resolved file or folder; part of the cache key
  files: tuple[str, ...]  # inputs whose size and mtime also key the cache
  class_names: tuple[str, ...] = ()  # image_folder: known from the folder names
  builder: Any = None  # tfds: the dataset builder to read from


def _check_labels(labels: np.ndarray, count: int, class_names: tuple[str, ...],
                  where: str) -> np.ndarray:
  """``labels`` as int32 after checking there is one per image and each names a class."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or len(labels) != count or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{where}: labels have dtype {labels.dtype} and shape {labels.shape} for '
                    f'{count} images, expected one integer per image: fix the file')
  if not class_names:
    raise DataError(f'{where}: no class names found: the file must list its classes')
  bad = (labels < 0) | (labels >= len(class_names))
  if bad.any():
    raise DataError(f'{where}: label {labels[bad][0]} is outside [0, {len(class_names)}) '
                    f'for the {len(class_names)} listed classes: fix the labels or class list')
  return labels.astype(np.int32)


def _checked(images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...],
             where: str) -> Split:
  """Validates decoded arrays; ``where`` names the offending file in errors."""
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise DataError(f'{where}: images have dtype {images.dtype} and shape {images.shape}, '
                    'expected uint8 (n, H, W, 3): fix or regenerate the file')
  if len(images) == 0:
    raise DataError(f'{where}: the split holds no images: point data.path at a non-empty dataset')
  labels = _check_labels(labels, len(images), class_names, where)
  return Split(np.ascontiguousarray(images), labels, tuple(str(c) for c in class_names))


def _decode_image(data: bytes, where: str) -> np.ndarray:
  """One encoded image as a uint8 (H, W, 3) array; grayscale and palette become RGB."""
  from PIL import Image

  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f'{where}: cannot decode the image ({e}): replace the corrupt file') from None
  if image.mode not in _CONVERTIBLE_MODES:
    raise DataError(f'{where}: image mode {image.mode} is not RGB, grayscale or palette: '
                    'convert it to RGB')
  return np.asarray(image.convert('RGB'))


def _stack_same_size(images: list[np.ndarray], name_of: Callable[[int], str],
                     where: str) -> np.ndarray:
  """Stacks decoded images, naming the first whose size differs from the first image's."""
  if not images:
    raise DataError(f'{where}: the split holds no images: point data.path at a non-empty dataset')
  for i, image in enumerate(images):
    if image.shape != images[0].shape:
      raise DataError(f'{name_of(i)}: image is {image.shape[1]}x{image.shape[0]} but '
                      f'{name_of(0)} is {images[0].shape[1]}x{images[0].shape[0]}: '
                      'resize all images to one size')
  return np.stack(images)


def _locate_npz(data_config, split: str) -> _Input:
  folder = _local_path(data_config)
  file = os.path.join(folder, f'{split}.npz')
  if not os.path.isfile(file):
    raise DataError(f'{file} does not exist: data.path must be a folder holding '
                    'train.npz and test.npz')
  return _Input(folder, (file,))


def _decode_npz(found: _Input, split: str) -> Split:
  """An archive of concatenated encoded images (arrays jpeg, offsets, labels, classes)."""
  del split
  file, = found.files
  try:
    with np.load(file, allow_pickle=False) as archive:
      arrays = {key: archive[key] for key in archive.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f'{file}: unreadable archive ({e}): replace the truncated or '
                    'corrupt file') from None
  missing = {'jpeg', 'offsets', 'labels', 'classes'} - set(arrays)
  if missing:
    raise DataError(f'{file}: missing arrays {sorted(missing)}: the archive needs '
                    'jpeg, offsets, labels and classes')
  encoded, offsets, labels = arrays['jpeg'], arrays['offsets'], arrays['labels']
  if (encoded.dtype != np.uint8 or encoded.ndim != 1 or offsets.ndim != 1
      or len(offsets) != len(labels) + 1 or offsets[0] != 0 or offsets[-1] != len(encoded)
      or np.any(np.diff(offsets) <= 0)):
    raise DataError(f'{file}: offsets {offsets.shape} do not cut jpeg {encoded.shape} into '
                    f'{len(labels)} images: regenerate the archive')
  buffer = encoded.tobytes()
  images = [_decode_image(buffer[a:b], f'{file} image {i}')
            for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))]
  stacked = _stack_same_size(images, lambda i: f'{file} image {i}', file)
  return _checked(stacked, labels, tuple(arrays['classes'].tolist()), file)


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays and builtins only, so a hostile file cannot run code."""

  # Arrays and scalars under numpy 1 and 2 module names; _codecs.encode is how
  # protocol 2 stores bytes.
  _ALLOWED = {('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')} | {
      (module, name) for module in ('numpy.core.multiarray', 'numpy._core.multiarray')
      for name in ('_reconstruct', 'scalar')}

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
    return super().find_class(module, name)


def _unpickle(file: str) -> dict[str, Any]:
  """A CIFAR python pickle as a dict with str keys (the originals use bytes keys)."""
  try:
    with open(file, 'rb') as f:
      content = _ArrayUnpickler(f, encoding='bytes').load()
  except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError,
          AttributeError, IndexError) as e:
    raise DataError(f'{file}: unreadable pickle ({e}): replace the truncated or corrupt '
                    'file with the original CIFAR download') from None
  if not isinstance(content, dict):
    raise DataError(f'{file}: holds a {type(content).__name__}, not a CIFAR batch dict: '
                    'point data.path at cifar-10-batches-py or cifar-100-python')
  return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


# Per variant: the files of each split, the meta file, its class-name key, the label key.
_CIFAR_LAYOUTS = {
    'cifar10': ({'train': tuple(f'data_batch_{i}' for i in range(1, 6)),
                 'test': ('test_batch',)}, 'batches.meta', 'label_names', 'labels'),
    'cifar100': ({'train': ('train',), 'test': ('test',)}, 'meta', 'fine_label_names',
                 'fine_labels'),
}


def _cifar_variant(folder: str) -> str:
  if os.path.isfile(os.path.join(folder, 'batches.meta')):
    return 'cifar10'
  if os.path.isfile(os.path.join(folder, 'meta')):
    return 'cifar100'
  raise DataError(f'{folder}: neither batches.meta (CIFAR-10) nor meta (CIFAR-100) found: '
                  'point data.path at cifar-10-batches-py or cifar-100-python')


def _locate_cifar_python(data_config, split: str) -> _Input:
  folder = _local_path(data_config)
  variant = _cifar_variant(folder)
  # The name picks the normalisation statistics: any other would not be CIFAR's.
  if data_config.name != variant:
    raise DataError(f'{folder} holds {variant} but data.name is {data_config.name!r}: '
                    f'set --config.data.name={variant}')
  split_files, meta, _, _ = _CIFAR_LAYOUTS[variant]
  files = tuple(os.path.join(folder, f) for f in split_files[split] + (meta,))
  for file in files:
    if not os.path.isfile(file):
      raise DataError(f'{file} is missing from the {variant} folder: '
                      're-extract the original CIFAR archive there')
  return _Input(folder, files)


def _decode_cifar_python(found: _Input, split: str) -> Split:
  """The CIFAR python pickles: rows of 3072 bytes, channel-major 32x32."""
  del split
  variant = _cifar_variant(found.root)
  _, _, names_key, label_key = _CIFAR_LAYOUTS[variant]
  *batch_files, meta_file = found.files
  meta = _unpickle(meta_file)
  if names_key not in meta:
    raise DataError(f'{meta_file}: has no {names_key!r} entry: replace it with the '
                    f'original {variant} meta file')
  class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])
  images, labels = [], []
  for file in batch_files:
    batch = _unpickle(file)
    if 'data' not in batch or label_key not in batch:
      raise DataError(f'{file}: lacks the data or {label_key!r} entries of a {variant} batch: '
                      'replace it with the original file')
    data = np.asarray(batch['data'])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
      raise DataError(f'{file}: data has dtype {data.dtype} and shape {data.shape}, expected '
                      'uint8 (n, 3072): replace it with the original file')
    # Checked per batch so that the error names the file at fault.
    labels.append(_check_labels(batch[label_key], len(data), class_names, file))
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  return _checked(np.concatenate(images), np.concatenate(labels), class_names, found.root)


def _locate_image_folder(data_config, split: str) -> _Input:
  root = _local_path(data_config)
  folder = os.path.join(root, split)
  if not os.path.isdir(folder):
    raise DataError(f'{folder} does not exist: data.path must hold train/<class>/*.png '
                    'and test/<class>/*.png')
  # The train folder fixes the class order, so labels agree across splits.
  reference = os.path.join(root, 'train')
  class_names = tuple(sorted(
      d for d in os.listdir(reference) if os.path.isdir(os.path.join(reference, d))))
  if not class_names:
    raise DataError(f'{reference} has no class folders: put images in train/<class>/')
  files = []
  for d in sorted(os.listdir(folder)):
    class_dir = os.path.join(folder, d)
    if not os.path.isdir(class_dir):
      continue
    if d not in class_names:
      raise DataError(f'{class_dir}: class {d!r} has no folder in {reference}: '
                      'use the same class folders in every split')
    files.extend(os.path.join(class_dir, f) for f in sorted(os.listdir(class_dir))
                 if f.lower().endswith(_IMAGE_SUFFIXES))
  if not files:
    raise DataError(f'{folder} holds no .png/.jpg/.jpeg files in class folders: '
                    'put images in <split>/<class>/')
  return _Input(root, tuple(files), class_names)


def _decode_image_folder(found: _Input, split: str) -> Split:
  """``<root>/<split>/<class>/<image>``; classes sorted by folder name."""
  del split
  index = {c: i for i, c in enumerate(found.class_names)}
  images = []
  for file in found.files:
    with open(file, 'rb') as f:
      images.append(_decode_image(f.read(), file))
  labels = np.array([index[os.path.basename(os.path.dirname(f))] for f in found.files])
  where = os.path.dirname(os.path.dirname(found.files[0]))
  return _checked(_stack_same_size(images, lambda i: found.files[i], where), labels,
                  found.class_names, where)


def _local_hint(name: str) -> str:
  return ('use --config.data.source=npz --config.data.path=DIR (or cifar_python/image_folder), '
          'or set --config.data.data_dir to a folder where '
          f'`tfds build {name} --file_format=array_record` has prepared it')


def _missing_modules(builder) -> list[str]:
  """Modules, as pip installs them, without which tfds cannot prepare ``builder``'s data."""
  missing = []
  # tfds' own builders read their downloads with tf.io.gfile and encode images
  # with tf.image (e.g. image_classification/cifar.py, _load_data).
  if (type(builder).__module__.startswith('tensorflow_datasets.')
      and importlib.util.find_spec('tensorflow') is None):
    missing.append('tensorflow')
  try:
    builder.url_infos  # pylint: disable=pointless-statement
  except ModuleNotFoundError as e:
    # tfds 4.9.10 imports importlib_resources here without declaring it on
    # Python >= 3.9 (tensorflow/datasets#11212).
    missing.append(e.name)
  return missing


def _probe_address(url: str) -> tuple[str, int]:
  """Where a download of ``url`` first connects: the proxy that requests would use, if any."""
  parts = urllib.parse.urlsplit(url)
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(parts.hostname):
    parts = urllib.parse.urlsplit(proxy if '://' in proxy else f'http://{proxy}')
  return parts.hostname, parts.port or (443 if parts.scheme == 'https' else 80)


def _unreachable(address: tuple[str, int]) -> str:
  """Why no TCP connection to ``address`` opens within _PROBE_TIMEOUT_S, or '' when one does."""
  outcome = []

  def connect():
    try:
      socket.create_connection(address, timeout=_PROBE_TIMEOUT_S).close()
      outcome.append('')
    except OSError as e:
      outcome.append(f'{type(e).__name__}: {e}')

  # In a thread, since the name lookup ignores the socket's timeout and can
  # stall for much longer on a network that drops packets.
  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(_PROBE_TIMEOUT_S)
  return outcome[0] if outcome else f'no answer within {_PROBE_TIMEOUT_S:g} s'


def _download_and_prepare(builder, folder: str) -> None:
  """Has tfds download ``builder``'s dataset and store it as array_record (read without TF)."""
  import tensorflow_datasets as tfds

  name = builder.name
  missing = _missing_modules(builder)
  if missing:
    raise DataError(f'tfds cannot prepare {name} in {folder} without {" and ".join(missing)}: '
                    f'pip install {" ".join(missing)} to let it download, or {_local_hint(name)}')
  url_infos = builder.url_infos or {}
  # tfds' downloads have no timeout, so an offline run would hang in them.
  for address in sorted({_probe_address(url) for url in url_infos}):
    why = _unreachable(address)
    if why:
      raise DataError(f'cannot download tfds {name} into {folder}: {address[0]}:{address[1]} '
                      f'is unreachable ({why}); {_local_hint(name)}')
  size = sum(int(info.size) for info in url_infos.values())
  _log.info('downloading %s with tfds into %s (%s)', name, folder,
            f'about {size / 1e6:,.0f} MB' if size else 'size unknown')
  try:
    builder.download_and_prepare(file_format='array_record')
  except (OSError, ImportError, tfds.download.DownloadError) as e:
    first_line = str(e).strip().partition('\n')[0]
    raise DataError(f'tfds could not download and prepare {name} into {folder} '
                    f'({type(e).__name__}: {first_line}); {_local_hint(name)}') from None


def _locate_tfds(data_config, split: str) -> _Input:
  import tensorflow_datasets as tfds

  del split  # One builder serves both splits.
  name = data_config.name
  try:
    builder = tfds.builder(name, data_dir=data_config.data_dir or None)
  except Exception as e:  # tfds raises several unrelated types for unknown names.
    raise DataError(f'tfds has no dataset data.name={name!r} ({type(e).__name__}): '
                    'use cifar10, cifar100, svhn_cropped or stl10') from None
  folder = os.fspath(builder.data_dir)
  # Prepared here rather than when decoding, so the cache key lists the prepared files.
  if not builder.is_prepared():
    if not data_config.download:
      raise DataError(f'tfds {name} is not prepared in {folder} and data.download is False: '
                      f'{_local_hint(name)}')
    _download_and_prepare(builder, folder)
  files = tuple(sorted(os.path.join(folder, f) for f in os.listdir(folder))
                ) if os.path.isdir(folder) else ()
  return _Input(folder, files, builder=builder)


def _decode_tfds(found: _Input, split: str) -> Split:
  """A prepared tfds dataset, read without TensorFlow when stored as array_record."""
  builder = found.builder
  try:
    source = builder.as_data_source(split=split)
  except Exception:  # Diagnosed below; tfds' own message names no fix.
    if split not in builder.info.splits:
      raise DataError(f'tfds {builder.name} has no split {split!r} in {found.root}: '
                      f'it has {sorted(builder.info.splits)}') from None
    if importlib.util.find_spec('tensorflow') is None:
      raise DataError(f'{found.root} is stored as {builder.info.file_format.value}, which only '
                      'TensorFlow reads: pip install tensorflow, or prepare it with '
                      f'`tfds build {builder.name} --file_format=array_record`') from None
    return _tfds_with_tensorflow(builder, split, found.root)
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise DataError(f'tfds {builder.name} has no image and label features: use '
                    'source=image_folder for it')
  images, labels = [], []
  for i in range(len(source)):
    example = source[i]
    images.append(np.asarray(example['image']))
    labels.append(int(example['label']))
  where = f'tfds {builder.name} {split} in {found.root}'
  stacked = _stack_same_size(images, lambda i: f'{where}, example {i}', where)
  return _checked(stacked, np.array(labels), tuple(features['label'].names), where)


def _tfds_with_tensorflow(builder, split: str, root: str) -> Split:
  """Reads a tfrecord-prepared dataset in one batch (needs TensorFlow)."""
  import tensorflow_datasets as tfds

  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return _checked(np.asarray(data['image']), np.asarray(data['label']),
                  tuple(builder.info.features['label'].names),
                  f'tfds {builder.name} {split} in {root}')


# Each non-digits source: a cheap locate step (validates paths, lists inputs)
# and the expensive decode step that the cache skips.
_SOURCES: dict[str, tuple[Callable[..., _Input], Callable[[_Input, str], Split]]] = {
    'npz': (_locate_npz, _decode_npz),
    'cifar_python': (_locate_cifar_python, _decode_cifar_python),
    'image_folder': (_locate_image_folder, _decode_image_folder),
    'tfds': (_locate_tfds, _decode_tfds),
}


def _local_path(data_config) -> str:
  path = data_config.path
  if not path:
    raise DataError(f'data.path is empty but data.source={data_config.source!r} reads local '
                    'files: set --config.data.path=FOLDER')
  resolved = os.path.realpath(os.path.expanduser(path))
  if not os.path.isdir(resolved):
    raise DataError(f'data.path {path} is not a folder: set --config.data.path to the '
                    'dataset folder')
  return resolved


def _cache_file(data_config, split: str, found: _Input, image_size: int | None) -> str:
  """The entry's labels file (.npz); its images lie beside it (:func:`_images_file`).

  Keyed by ``image_size`` too: the images are cached resized, so that no run
  reads (and resizes) every image again.
  """
  stats = []
  for file in found.files:
    stat = os.stat(file)
    stats.append((file, stat.st_size, stat.st_mtime_ns))
  key = json.dumps([_CACHE_VERSION, data_config.source, data_config.name, split, found.root,
                    stats, image_size])
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  folder = os.path.expanduser(data_config.cache_dir or '~/.cache/mocosfl_jax')
  readable = re.sub(r'[^\w.-]', '_', f'{data_config.source}-{data_config.name}-{split}')
  return os.path.join(folder, f'{readable}-{digest}.npz')


def _images_file(cache_file: str) -> str:
  """The entry's images: a plain .npy, because numpy memory-maps no member of an .npz."""
  return cache_file[:-len('.npz')] + '.images.npy'


def _read_cache(file: str) -> Split | None:
  try:
    with np.load(file, allow_pickle=False) as cached:
      labels, class_names = cached['labels'], tuple(cached['class_names'].tolist())
    images = np.load(_images_file(file), mmap_mode='r', allow_pickle=False)
  except FileNotFoundError:
    return None
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    logging.warning('ignoring unreadable cache entry %s (%s); decoding again', file, e)
    return None
  if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
    logging.warning('ignoring cache entry %s: %s images for %d labels; decoding again', file,
                    images.shape, len(labels))
    return None
  return Split(images, labels, class_names)


def _write_atomically(file: str, write: Callable) -> None:
  """``write(f)`` into a temporary file renamed to ``file``: no reader sees half of it."""
  tmp = None
  try:
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(file), suffix='.tmp',
                                     delete=False) as f:
      tmp = f.name
      write(f)
    os.replace(tmp, file)
    tmp = None
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


def _write_cache(file: str, data: Split) -> None:
  """The images first, then the labels file, which :func:`_read_cache` looks for first."""
  try:
    os.makedirs(os.path.dirname(file), exist_ok=True)
    _write_atomically(_images_file(file), lambda f: np.save(f, data.images))
    try:
      _write_atomically(file, lambda f: np.savez(
          f, labels=data.labels, class_names=np.array(data.class_names, dtype=str)))
    except BaseException:
      os.remove(_images_file(file))  # images without labels are no entry
      raise
  except OSError as e:
    # A read-only or full cache disk costs time on the next run, not this run.
    logging.warning('could not cache decoded data at %s (%s)', file, e)


def _resized(data: Split, image_size: int, split: str) -> Split:
  """``data`` with every image resized to image_size x image_size (bilinear, as the digits).

  Resized once here rather than refused: training crops are resized to
  model.image_size anyway, and the kNN monitor and the probes embed the
  stored images whole, so storing them at that size makes training and
  evaluation see one resolution (8x8 images would otherwise train on 32x32
  crops and be evaluated at 8x8), as the digits source always did.
  """
  height, width = data.images.shape[1:3]
  if (height, width) == (image_size, image_size):
    return data
  from PIL import Image

  _log.info('resizing the %d %s images from %dx%d to %dx%d (model.image_size)', len(data),
            split, width, height, image_size, image_size)
  images = np.stack([
      np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR))
      for image in data.images])
  return Split(images, data.labels, data.class_names)


def load_split(data_config, split: str, image_size: int | None = None) -> Split:
  """Loads ``split`` ('train' or 'test') of the source named by ``data_config.source``.

  Args:
    data_config: ``config.data`` with fields source, name, path, data_dir and cache_dir.
    split: 'train' or 'test'.
    image_size: model.image_size, to which every image is resized; None
      keeps the source's size (32 for the digits).

  Returns:
    The split's images (uint8, NHWC, RGB), labels (int32) and class names.

  Raises:
    DataError: the source is unknown, or its files are missing, corrupt or inconsistent.
  """
  if split not in ('train', 'test'):
    raise DataError(f"unknown split {split!r}: use 'train' or 'test'")
  source = data_config.source
  if source == 'digits':
    return _digits(split, image_size or 32)
  if source not in _SOURCES:
    raise DataError(f'unknown data.source {source!r}: use one of {list(SOURCES)}')
  locate, decode = _SOURCES[source]
  found = locate(data_config, split)
  cache_file = _cache_file(data_config, split, found, image_size)
  data = _read_cache(cache_file)
  if data is None:
    decoded = decode(found, split)
    decoded = decoded if image_size is None else _resized(decoded, image_size, split)
    _write_cache(cache_file, decoded)
    # The decoded copy goes unless the cache could not be written: the cached
    # one is read as needed, as on every later run.
    data = _read_cache(cache_file)
    data = decoded if data is None else data
  return data


def aux_config(data_config):
  """``data_config`` reading the auxiliary set: its aux_* fields as source, name, path, data_dir.

  For :func:`load_split`, so that the auxiliary set loads (and is cached and
  resized) exactly as a target set of that source would.
  """
  fields = data_config.to_dict()
  fields.update(source=data_config.aux_source, name=data_config.aux_name,
                path=data_config.aux_path, data_dir=data_config.aux_data_dir)
  return ml_collections.ConfigDict(fields)
