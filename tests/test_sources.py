"""Tests for the dataset sources, their validation and the decoded-array cache."""
import importlib.util
import io
import json
import logging
import os
import pickle
import socket
import tempfile
import time

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from mocosfl_jax.data import sources
from mocosfl_jax.data.sources import DataError

CLASSES = ('cat', 'dog', 'frog')


@pytest.fixture(autouse=True)
def _private_tempdir(tmp_path, monkeypatch):
  """Puts the folders that tfds makes with tempfile.mkdtemp under tmp_path.

  tfds never deletes them: DatasetInfo.initialize_from_bucket leaves one in
  the system's temporary directory whenever a builder opens an unprepared
  folder.
  """
  folder = tmp_path / 'tempfile'
  folder.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(folder))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
  """The download probe is refused at once and no proxy is set: no test reaches the network."""
  def refuse(address, *args, **kwargs):
    raise OSError(101, f'Network is unreachable (tests stay offline): {address}')

  monkeypatch.setattr(socket, 'create_connection', refuse)
  for variable in ('http_proxy', 'https_proxy', 'all_proxy', 'no_proxy'):
    monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv(variable.upper(), raising=False)


def _config(tmp_path, source, path='', name='cifar10', data_dir='', download=True):
  return ml_collections.ConfigDict(dict(
      source=source, name=name, path=str(path), data_dir=str(data_dir), download=download,
      cache_dir=str(tmp_path / 'cache')))


def _images(n, seed, size=8):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _png(image, mode='RGB'):
  buffer = io.BytesIO()
  Image.fromarray(image).convert(mode).save(buffer, format='PNG')
  return buffer.getvalue()


def _write_npz(file, images, labels, classes=CLASSES, encoded=None, **overrides):
  """An archive in the layout of shared/data/cifar10 (PNG keeps the pixels exact)."""
  encoded = encoded if encoded is not None else [_png(image) for image in images]
  offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
  arrays = dict(jpeg=np.frombuffer(b''.join(encoded), np.uint8), offsets=offsets,
                labels=np.asarray(labels, np.int64), classes=np.array(classes))
  arrays.update(overrides)
  np.savez_compressed(file, **arrays)


@pytest.fixture
def npz_dir(tmp_path):
  folder = tmp_path / 'npz'
  folder.mkdir()
  _write_npz(folder / 'train.npz', _images(6, 0), [0, 1, 2, 0, 1, 2])
  _write_npz(folder / 'test.npz', _images(3, 1), [2, 1, 0])
  return folder


def _write_cifar(folder, variant, splits):
  """The python pickles as the CIFAR download ships them (bytes keys, CHW rows)."""
  folder.mkdir()
  names_key, label_key, meta = {
      'cifar10': (b'label_names', b'labels', 'batches.meta'),
      'cifar100': (b'fine_label_names', b'fine_labels', 'meta')}[variant]
  with open(folder / meta, 'wb') as f:
    pickle.dump({names_key: [c.encode() for c in CLASSES]}, f, protocol=2)
  for file, (images, labels) in splits.items():
    with open(folder / file, 'wb') as f:
      pickle.dump({b'data': images.transpose(0, 3, 1, 2).reshape(len(images), -1),
                   label_key: list(labels), b'batch_label': b'x'}, f, protocol=2)


@pytest.fixture
def cifar10_dir(tmp_path):
  batches = {f'data_batch_{i}': (_images(2, i, 32), [i % 3, (i + 1) % 3]) for i in range(1, 6)}
  batches['test_batch'] = (_images(3, 9, 32), [0, 1, 2])
  _write_cifar(tmp_path / 'cifar-10-batches-py', 'cifar10', batches)
  return tmp_path / 'cifar-10-batches-py', batches


def _write_tree(root, split, files):
  """``root/split/<class>/<name>.png`` from {(class, name): image}."""
  for (cls, name), image in files.items():
    (root / split / cls).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / split / cls / f'{name}.png')


@pytest.fixture
def folder_dir(tmp_path):
  root = tmp_path / 'images'
  train = _images(4, 3)
  _write_tree(root, 'train', {('dog', 'a'): train[0], ('cat', 'b'): train[1],
                              ('cat', 'c'): train[2], ('frog', 'd'): train[3]})
  _write_tree(root, 'test', {('frog', 'e'): _images(1, 4)[0]})
  return root, train


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """A tfds dataset that tfds prepares as array_record without TensorFlow."""
  VERSION = tfds.core.Version('1.0.0')
  SIZES = {'train': 6, 'test': 3}

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
        'label': tfds.features.ClassLabel(names=list(CLASSES))}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(n) for split, n in self.SIZES.items()}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'image': np.full((8, 8, 3), 10 * i, np.uint8), 'label': i % 3}


class TrainOnlyImages(TinyImages):
  SIZES = {'train': 2}


class RemoteImages(TinyImages):
  """TinyImages as if tfds downloaded it: its checksums list one file on a host."""
  url_infos = {'https://data.example/tiny.tar.gz': tfds.core.download.checksums.UrlInfo(
      size=2_400_000, checksum='', filename='tiny.tar.gz')}


class UndeclaredImportImages(TinyImages):
  """Fails like tfds 4.9.10 without importlib_resources (tensorflow/datasets#11212)."""

  @property
  def url_infos(self):
    raise ModuleNotFoundError("No module named 'importlib_resources'",
                              name='importlib_resources')


@pytest.fixture
def tfds_dir(tmp_path):
  for builder in (TinyImages, TrainOnlyImages):
    builder(data_dir=str(tmp_path / 'tfds'), file_format='array_record').download_and_prepare()
  return tmp_path / 'tfds'


def _load_twice_second_from_cache(monkeypatch, config, split, image_size=None):
  first = sources.load_split(config, split, image_size)

  def fail(*args):
    raise AssertionError('decoded again despite a cached copy')

  locate, _ = sources._SOURCES[config.source]
  monkeypatch.setitem(sources._SOURCES, config.source, (locate, fail))
  return first, sources.load_split(config, split, image_size)


def _one_line_naming(error, path):
  message = str(error.value)
  assert '\n' not in message
  assert str(path) in message, message


def test_digits_needs_no_files():
  split = sources.load_split(ml_collections.ConfigDict(dict(source='digits')), 'test')
  assert split.images.shape[1:] == (32, 32, 3) and split.num_classes == 10


def test_npz_round_trip(tmp_path, npz_dir):
  train = sources.load_split(_config(tmp_path, 'npz', npz_dir), 'train')
  test = sources.load_split(_config(tmp_path, 'npz', npz_dir), 'test')
  np.testing.assert_array_equal(train.images, _images(6, 0))
  np.testing.assert_array_equal(test.images, _images(3, 1))
  assert train.labels.dtype == np.int32 and list(test.labels) == [2, 1, 0]
  assert train.class_names == CLASSES


def test_npz_grayscale_becomes_rgb(tmp_path):
  (tmp_path / 'd').mkdir()
  gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
  _write_npz(tmp_path / 'd' / 'train.npz', None, [0],
             encoded=[_png(np.repeat(gray[..., None], 3, -1), mode='L')])
  split = sources.load_split(_config(tmp_path, 'npz', tmp_path / 'd'), 'train')
  np.testing.assert_array_equal(split.images[0], np.repeat(gray[..., None], 3, -1))


@pytest.mark.parametrize('variant', ['cifar10', 'cifar100'])
def test_cifar_python_round_trip(tmp_path, variant):
  folder = tmp_path / variant
  train, test = _images(5, 0, 32), _images(2, 1, 32)
  train_labels = [1, 2, 0, 1, 2]
  if variant == 'cifar10':
    batches = {f'data_batch_{i + 1}': (train[i:i + 1], train_labels[i:i + 1]) for i in range(5)}
    batches['test_batch'] = (test, [2, 0])
  else:
    batches = {'train': (train, train_labels), 'test': (test, [2, 0])}
  _write_cifar(folder, variant, batches)
  config = _config(tmp_path, 'cifar_python', folder, name=variant)
  loaded_train = sources.load_split(config, 'train')
  loaded_test = sources.load_split(config, 'test')
  np.testing.assert_array_equal(loaded_train.images, train)
  np.testing.assert_array_equal(loaded_test.images, test)
  assert list(loaded_train.labels) == train_labels and list(loaded_test.labels) == [2, 0]
  assert loaded_train.class_names == CLASSES


def test_image_folder_round_trip(tmp_path, folder_dir):
  root, train = folder_dir
  loaded = sources.load_split(_config(tmp_path, 'image_folder', root), 'train')
  assert loaded.class_names == CLASSES  # sorted folder names
  # Files come in class order, then by name: cat/b, cat/c, dog/a, frog/d.
  np.testing.assert_array_equal(loaded.images, train[[1, 2, 0, 3]])
  assert list(loaded.labels) == [0, 0, 1, 2]
  # The test split lacks cat and dog, yet frog keeps the label the train split gives it.
  test = sources.load_split(_config(tmp_path, 'image_folder', root), 'test')
  assert list(test.labels) == [2] and test.class_names == CLASSES


def test_tfds_mock_data_loads_without_tensorflow(tmp_path, monkeypatch):
  # mock_data serves examples for a dataset it leaves unprepared.
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  with tfds.testing.mock_data(num_examples=5):
    split = sources.load_split(_config(tmp_path, 'tfds', data_dir=tmp_path / 'x'), 'train')
  assert split.images.shape == (5, 32, 32, 3) and split.images.dtype == np.uint8
  assert split.num_classes == 10 and ((split.labels >= 0) & (split.labels < 10)).all()


def test_tfds_reads_prepared_array_record(tmp_path, tfds_dir):
  split = sources.load_split(_config(tmp_path, 'tfds', name='tiny_images', data_dir=tfds_dir),
                             'train')
  order = np.argsort(split.images[:, 0, 0, 0])  # tfds shuffles records when preparing
  np.testing.assert_array_equal(split.images[order],
                                np.repeat(np.arange(0, 60, 10), 192).reshape(6, 8, 8, 3))
  np.testing.assert_array_equal(split.labels[order], [0, 1, 2, 0, 1, 2])
  assert split.class_names == CLASSES


def test_tfds_missing_data_fails_fast_with_local_hint(tmp_path):
  # Offline (the network is blocked here), and without TensorFlow where it is
  # not installed: either way one line, at once, saying how to use local files.
  start = time.monotonic()
  with pytest.raises(DataError) as error:
    sources.load_split(_config(tmp_path, 'tfds', data_dir=tmp_path / 'empty'), 'train')
  assert time.monotonic() - start < 10
  _one_line_naming(error, tmp_path / 'empty')
  assert '--config.data.source=npz --config.data.path=' in str(error.value)


def test_tfds_without_tensorflow_says_what_to_install(tmp_path, monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *args: None if name == 'tensorflow' else find_spec(name, *args))
  with pytest.raises(DataError) as error:
    sources.load_split(_config(tmp_path, 'tfds', data_dir=tmp_path / 'empty'), 'train')
  _one_line_naming(error, tmp_path / 'empty')
  assert 'pip install tensorflow' in str(error.value)
  assert '--config.data.source=npz' in str(error.value)


def test_tfds_undeclared_tfds_import_says_what_to_install(tmp_path):
  with pytest.raises(DataError, match='pip install importlib_resources to let it download'):
    sources.load_split(_config(tmp_path, 'tfds', name='undeclared_import_images',
                               data_dir=tmp_path / 'empty'), 'train')


def test_tfds_offline_download_fails_at_once_with_local_hint(tmp_path, monkeypatch):
  def never(*args, **kwargs):
    raise AssertionError('tfds was asked to download while offline')

  monkeypatch.setattr(RemoteImages, 'download_and_prepare', never)
  start = time.monotonic()
  with pytest.raises(DataError) as error:
    sources.load_split(_config(tmp_path, 'tfds', name='remote_images',
                               data_dir=tmp_path / 'empty'), 'train')
  assert time.monotonic() - start < 2
  _one_line_naming(error, tmp_path / 'empty')
  assert 'data.example:443 is unreachable' in str(error.value)
  assert '--config.data.source=npz --config.data.path=' in str(error.value)


def test_tfds_silent_network_fails_within_the_probe_timeout(tmp_path, monkeypatch):
  monkeypatch.setattr(socket, 'create_connection',
                      lambda *args, **kwargs: time.sleep(1) or socket.socket())
  monkeypatch.setattr(sources, '_PROBE_TIMEOUT_S', 0.1)
  start = time.monotonic()
  with pytest.raises(DataError, match=r'no answer within 0.1 s'):
    sources.load_split(_config(tmp_path, 'tfds', name='remote_images',
                               data_dir=tmp_path / 'empty'), 'train')
  assert time.monotonic() - start < 2


def test_tfds_probe_goes_through_the_proxy(monkeypatch):
  monkeypatch.setenv('https_proxy', 'http://proxy.example:3128')
  assert sources._probe_address('https://data.example/x') == ('proxy.example', 3128)
  monkeypatch.setenv('no_proxy', 'data.example')
  assert sources._probe_address('https://data.example/x') == ('data.example', 443)


def test_tfds_downloads_and_prepares_missing_data(tmp_path, monkeypatch, caplog):
  probed = []
  monkeypatch.setattr(socket, 'create_connection',
                      lambda address, timeout: probed.append(address) or socket.socket())
  with caplog.at_level(logging.INFO, logger='mocosfl_jax'):
    split = sources.load_split(_config(tmp_path, 'tfds', name='remote_images',
                                       data_dir=tmp_path / 'tfds'), 'train')
  assert probed == [('data.example', 443)]
  folder = tmp_path / 'tfds' / 'remote_images' / '1.0.0'
  assert f'downloading remote_images with tfds into {folder} (about 2 MB)' in caplog.text
  assert len(split) == 6 and split.class_names == CLASSES
  assert any(f.name.endswith('.array_record-00000-of-00001') for f in folder.iterdir())


def test_tfds_missing_data_without_download_says_so(tmp_path):
  with pytest.raises(DataError, match='data.download is False') as error:
    sources.load_split(_config(tmp_path, 'tfds', name='remote_images',
                               data_dir=tmp_path / 'empty', download=False), 'train')
  _one_line_naming(error, tmp_path / 'empty')


def test_tfds_splits_are_cached_apart(tmp_path, tfds_dir):
  config = _config(tmp_path, 'tfds', name='tiny_images', data_dir=tfds_dir)
  assert len(sources.load_split(config, 'train')) == 6
  assert len(sources.load_split(config, 'test')) == 3


def test_tfds_missing_split(tmp_path, tfds_dir):
  with pytest.raises(DataError, match="no split 'test'"):
    sources.load_split(_config(tmp_path, 'tfds', name='train_only_images', data_dir=tfds_dir),
                       'test')


def test_tfds_tfrecord_without_tensorflow_says_what_to_do(tmp_path, tfds_dir, monkeypatch):
  # The export extra installs TensorFlow: hide it, as on a core install.
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'tensorflow' else find_spec(name, *a))
  info_file = tfds_dir / 'tiny_images' / '1.0.0' / 'dataset_info.json'
  info = json.loads(info_file.read_text())
  info['fileFormat'] = 'tfrecord'
  info_file.write_text(json.dumps(info))
  with pytest.raises(DataError) as error:
    sources.load_split(_config(tmp_path, 'tfds', name='tiny_images', data_dir=tfds_dir), 'train')
  _one_line_naming(error, tfds_dir / 'tiny_images' / '1.0.0')
  assert 'pip install tensorflow' in str(error.value)


def test_tfds_unknown_name(tmp_path):
  with pytest.raises(DataError, match='no_such_set'):
    sources.load_split(_config(tmp_path, 'tfds', name='no_such_set'), 'train')


@pytest.mark.parametrize('source', ['npz', 'cifar_python', 'image_folder', 'tfds'])
def test_cache_hit_skips_decoding(tmp_path, monkeypatch, npz_dir, cifar10_dir, folder_dir,
                                  tfds_dir, source):
  path = {'npz': npz_dir, 'cifar_python': cifar10_dir[0], 'image_folder': folder_dir[0],
          'tfds': ''}[source]
  name = 'tiny_images' if source == 'tfds' else 'cifar10'
  config = _config(tmp_path, source, path, name=name, data_dir=tfds_dir)
  first, second = _load_twice_second_from_cache(monkeypatch, config, 'train')
  np.testing.assert_array_equal(first.images, second.images)
  np.testing.assert_array_equal(first.labels, second.labels)
  assert first.class_names == second.class_names and second.labels.dtype == np.int32


def test_cache_is_keyed_by_split_and_path(tmp_path, npz_dir):
  sources.load_split(_config(tmp_path, 'npz', npz_dir), 'train')
  assert len(sources.load_split(_config(tmp_path, 'npz', npz_dir), 'test')) == 3
  other = tmp_path / 'other'
  other.mkdir()
  _write_npz(other / 'train.npz', _images(2, 5), [1, 1])
  assert len(sources.load_split(_config(tmp_path, 'npz', other), 'train')) == 2


def test_changed_file_misses_the_cache(tmp_path, npz_dir):
  config = _config(tmp_path, 'npz', npz_dir)
  sources.load_split(config, 'test')
  _write_npz(npz_dir / 'test.npz', _images(3, 7), [0, 0, 0])
  stat = os.stat(npz_dir / 'test.npz')
  os.utime(npz_dir / 'test.npz', ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  np.testing.assert_array_equal(sources.load_split(config, 'test').images, _images(3, 7))


def test_interrupted_cache_write_leaves_no_entry(tmp_path, monkeypatch, npz_dir):
  config = _config(tmp_path, 'npz', npz_dir)

  def interrupted(f, **arrays):
    f.write(b'PK\x03\x04 half an archive')
    raise RuntimeError('interrupted')

  with monkeypatch.context() as patch:
    patch.setattr(np, 'savez', interrupted)
    with pytest.raises(RuntimeError):
      sources.load_split(config, 'train')
  assert os.listdir(tmp_path / 'cache') == []
  first, second = _load_twice_second_from_cache(monkeypatch, config, 'train')
  np.testing.assert_array_equal(first.images, second.images)


@pytest.mark.parametrize('part', ['.npz', '.images.npy'])
def test_unreadable_cache_entry_is_rebuilt(tmp_path, npz_dir, part):
  config = _config(tmp_path, 'npz', npz_dir)
  sources.load_split(config, 'train')
  entry, = (tmp_path / 'cache').glob('*' + part)
  entry.write_bytes(b'garbage')
  np.testing.assert_array_equal(sources.load_split(config, 'train').images, _images(6, 0))


def test_cached_images_are_memory_mapped_and_match_the_decoded_ones(tmp_path, npz_dir):
  config = _config(tmp_path, 'npz', npz_dir)
  decoded = sources.load_split(config, 'train')
  cached = sources.load_split(config, 'train')
  # The first run's too: it keeps the cached copy, not the decoded one.
  assert isinstance(decoded.images, np.memmap)
  assert isinstance(cached.images, np.memmap) and not cached.images.flags.writeable
  np.testing.assert_array_equal(cached.images[[4, 1]], decoded.images[[4, 1]])
  # Images whose count is not the labels' are no entry either.
  np.save(next((tmp_path / 'cache').glob('*.images.npy')), _images(5, 0))
  assert len(sources.load_split(config, 'train').images) == 6


def _truncate(file):
  data = file.read_bytes()
  file.write_bytes(data[:len(data) // 2])


def _npz_case(case, folder):
  """Breaks ``folder/train.npz`` in one way; returns the file the error must name."""
  file = folder / 'train.npz'
  images, labels = _images(3, 0), [0, 1, 2]
  if case == 'truncated':
    _truncate(file)
  elif case == 'missing_array':
    np.savez(file, jpeg=np.zeros(3, np.uint8), labels=np.zeros(1))
  elif case == 'bad_offsets':
    sizes = [len(_png(image)) for image in images]
    _write_npz(file, images, labels, offsets=np.array([0, sizes[0] + 1, sizes[0], sum(sizes)]))
  elif case == 'label_out_of_range':
    _write_npz(file, images, [0, 1, 3])
  elif case == 'corrupt_image':
    _write_npz(file, images, labels, encoded=[_png(images[0]), b'\x89PNG garbage',
                                              _png(images[2])])
  elif case == 'size_mismatch':
    _write_npz(file, images, labels, encoded=[_png(images[0]), _png(images[1]),
                                              _png(_images(1, 0, 16)[0])])
  elif case == 'rgba':
    _write_npz(file, images, labels, encoded=[_png(image, 'RGBA') for image in images])
  elif case == 'empty':
    _write_npz(file, images[:0], [], encoded=[])
  elif case == 'missing_split':
    file.unlink()
  return file


@pytest.mark.parametrize('case', ['truncated', 'missing_array', 'bad_offsets',
                                  'label_out_of_range', 'corrupt_image', 'size_mismatch',
                                  'rgba', 'empty', 'missing_split'])
def test_npz_corrupt_inputs_name_the_file(tmp_path, npz_dir, case):
  file = _npz_case(case, npz_dir)
  with pytest.raises(DataError) as error:
    sources.load_split(_config(tmp_path, 'npz', npz_dir), 'train')
  _one_line_naming(error, file)
  expected = {'corrupt_image': 'image 1', 'size_mismatch': 'image 2', 'bad_offsets': 'offsets',
              'rgba': 'mode RGBA'}.get(case, '')
  assert expected in str(error.value)


class _Evil:
  """Unpickling it would create a folder: proof that the pickle ran code."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.makedirs, (str(self.path),))


@pytest.mark.parametrize('case', ['truncated', 'wrong_shape', 'label_out_of_range',
                                  'missing_entries', 'missing_batch', 'missing_meta_key',
                                  'code_in_pickle'])
def test_cifar_python_corrupt_inputs_name_the_file(tmp_path, cifar10_dir, case):
  folder, _ = cifar10_dir
  file = folder / 'data_batch_3'
  if case == 'truncated':
    _truncate(file)
  elif case == 'wrong_shape':
    file.write_bytes(pickle.dumps({b'data': np.zeros((2, 100), np.uint8), b'labels': [0, 1]}))
  elif case == 'label_out_of_range':
    file.write_bytes(pickle.dumps({b'data': np.zeros((2, 3072), np.uint8), b'labels': [0, 7]}))
  elif case == 'missing_entries':
    file.write_bytes(pickle.dumps({b'batch_label': b'x'}))
  elif case == 'missing_batch':
    file.unlink()
  elif case == 'missing_meta_key':
    file = folder / 'batches.meta'
    file.write_bytes(pickle.dumps({b'names': []}))
  elif case == 'code_in_pickle':
    file.write_bytes(pickle.dumps({b'data': _Evil(tmp_path / 'pwned'), b'labels': [0]}))
  with pytest.raises(DataError) as error:
    sources.load_split(_config(tmp_path, 'cifar_python', folder), 'train')
  _one_line_naming(error, file)
  assert not (tmp_path / 'pwned').exists()


@pytest.mark.parametrize('name', ['cifar100', 'my_cifar'])
def test_cifar_python_name_mismatch(tmp_path, cifar10_dir, name):
  # Another name would normalise CIFAR-10 with other statistics than the reference's.
  with pytest.raises(DataError, match='data.name=cifar10'):
    sources.load_split(_config(tmp_path, 'cifar_python', cifar10_dir[0], name=name), 'train')


def test_images_are_resized_to_the_model_size_for_training_and_evaluation(tmp_path, npz_dir,
                                                                          monkeypatch):
  # 8x8 images: the crops of training are 32x32, and so must be what the kNN
  # monitor and the probes embed, which is the stored images.
  config = _config(tmp_path, 'npz', npz_dir)
  for split, seed in (('train', 0), ('test', 1)):
    loaded = sources.load_split(config, split, image_size=32)
    assert loaded.images.shape[1:] == (32, 32, 3) and loaded.images.dtype == np.uint8
    want = [np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR))
            for image in _images(len(loaded), seed)]
    np.testing.assert_array_equal(loaded.images, want)
  # Cached resized: a second run neither decodes nor resizes (it reads only
  # what it uses of the memory-mapped images).
  with monkeypatch.context() as patch:
    patch.setattr(sources, '_resized', lambda *args: pytest.fail('resized again'))
    _, again = _load_twice_second_from_cache(patch, config, 'train', image_size=32)
  assert isinstance(again.images, np.memmap) and again.images.shape[1:] == (32, 32, 3)
  # Already the model's size: untouched; no size given: the source's.
  np.testing.assert_array_equal(sources.load_split(config, 'train', image_size=8).images,
                                _images(6, 0))
  assert sources.load_split(config, 'train').images.shape[1:] == (8, 8, 3)
  digits = ml_collections.ConfigDict(dict(source='digits'))
  assert sources.load_split(digits, 'test', image_size=64).images.shape[1:] == (64, 64, 3)


def test_the_experiment_stores_images_at_the_model_size(tmp_path, npz_dir):
  from mocosfl_jax import config as config_lib
  from mocosfl_jax import train

  c = config_lib.default_config()
  c.num_clients, c.data.source, c.data.name = 2, 'npz', 'tiny'
  c.data.path, c.data.cache_dir = str(npz_dir), str(tmp_path / 'cache')
  exp = train.build(c)
  assert exp.train.images.shape[1:3] == exp.test.images.shape[1:3] == (32, 32)


def test_known_names_keep_the_reference_statistics():
  assert sources.normalization('cifar10') == ((0.4914, 0.4822, 0.4465),
                                              (0.2023, 0.1994, 0.2010))
  images = _images(4, 0)
  assert sources.normalization('cifar100', images) == sources.NORMALIZATION['cifar100']


def test_other_names_are_normalised_with_their_training_set():
  images = _images(40, 0)
  images[..., 2] = 7  # a constant channel must not divide by zero
  mean, std = sources.normalization('my_photos', images)
  pixels = images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-12)
  np.testing.assert_allclose(std[:2], pixels.std(0)[:2], rtol=1e-12)
  assert std[2] == pytest.approx(1 / 255)
  with pytest.raises(ValueError, match='my_photos'):
    sources.normalization('my_photos')


@pytest.mark.parametrize('case', ['corrupt', 'size_mismatch', 'rgba', 'unknown_class',
                                  'missing_split'])
def test_image_folder_corrupt_inputs_name_the_file(tmp_path, folder_dir, case):
  root, _ = folder_dir
  split = 'train'
  if case == 'corrupt':
    file = root / 'train' / 'cat' / 'c.png'
    _truncate(file)
  elif case == 'size_mismatch':
    file = root / 'train' / 'dog' / 'a.png'  # first in file order after cat/b, cat/c
    Image.fromarray(_images(1, 0, 16)[0]).save(file)
  elif case == 'rgba':
    file = root / 'train' / 'frog' / 'd.png'
    Image.fromarray(_images(1, 0)[0]).convert('RGBA').save(file)
  elif case == 'unknown_class':
    split, file = 'test', root / 'test' / 'horse'
    _write_tree(root, 'test', {('horse', 'x'): _images(1, 0)[0]})
  elif case == 'missing_split':
    split, file = 'test', root / 'test'
    for png in file.rglob('*.png'):
      png.unlink()
    (file / 'frog').rmdir()
    file.rmdir()
  with pytest.raises(DataError) as error:
    sources.load_split(_config(tmp_path, 'image_folder', root), split)
  _one_line_naming(error, file)


@pytest.mark.parametrize('source,path,message', [
    ('npz', '', 'data.path is empty'),
    ('npz', '/no/such/folder', '/no/such/folder'),
    ('hdf5', '', "unknown data.source 'hdf5'"),
])
def test_config_errors(tmp_path, source, path, message):
  with pytest.raises(DataError, match=message):
    sources.load_split(_config(tmp_path, source, path), 'train')
