"""Tests for mocosfl_jax.checkpoint on a small hand-made state: no training."""
import logging
import os
import pathlib
import shutil
import signal
import sys
import types

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mocosfl_jax import checkpoint
from mocosfl_jax import config as config_lib

# A failed read must not spill its other arrays' errors (checkpoint.quiet_failed_reads).
pytestmark = pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')


@flax.struct.dataclass
class State:
  params: dict
  round: jax.Array


def _state(round_):
  return State({'w': jnp.full((64, 8), float(round_)), 'count': jnp.arange(5) + round_},
               jnp.int32(round_))


def _abstract():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                      jax.eval_shape(lambda: _state(0)))


def _config(**overrides):
  config = ml_collections.ConfigDict({
      'seed': 0, 'image_sizes': (32, 32), 'optim': {'lr': 0.06},
      'checkpoint': {'every': 1, 'keep': 3}, 'eval': {'every': 10}})
  config.update_from_flattened_dict(overrides)
  return config


def _save(workdir, rounds, config=None, keep=3):
  """Saves ``_state(r)`` as round r's checkpoint for each r and waits for the writes."""
  checkpoints = checkpoint.Checkpoints(workdir, keep=keep)
  for r in rounds:
    checkpoints.save(_state(r), r, config or _config(), {'history': [[r, 1.5]]})
  checkpoints.close()


def _folder(workdir, round_):
  return pathlib.Path(workdir) / checkpoint.CHECKPOINT_DIR / str(round_)


def _restore(workdir, config=None):
  checkpoints = checkpoint.Checkpoints(workdir, keep=3)
  try:
    return checkpoints.restore(_abstract(), config or _config()), checkpoints.steps()
  finally:
    checkpoints.close()


def _assert_state(restored, round_):
  state, meta = restored
  jax.tree.map(np.testing.assert_array_equal, state, _state(round_))
  assert meta['round'] == round_
  assert meta['history'] == [[round_, 1.5]]


def test_restores_the_newest_checkpoint_and_keeps_the_newest_few(tmp_path):
  _save(tmp_path, [1, 2, 3, 4], keep=3)
  restored, steps = _restore(tmp_path)
  _assert_state(restored, 4)
  assert steps == [4, 3, 2]
  assert restored[1]['config'] == _config().to_dict() | {'image_sizes': [32, 32]}


def test_nothing_to_restore(tmp_path):
  checkpoints = checkpoint.Checkpoints(tmp_path, keep=3)
  assert checkpoints.check_compatible(_config()) is None
  assert checkpoints.restore(_abstract(), _config()) is None
  checkpoints.close()


def _truncate_arrays(folder):
  for file in (folder / 'state').rglob('*'):
    if file.is_file() and file.parent.name == 'd':  # ocdbt's data files
      with open(file, 'r+b') as f:
        f.truncate(file.stat().st_size // 2)


def _delete(relative):
  def corrupt(folder):
    target = folder / relative
    if target.is_dir():
      shutil.rmtree(target)
    else:
      target.unlink()
  return corrupt


def _empty(folder):
  shutil.rmtree(folder)
  folder.mkdir()


def _wrong_round(folder):
  """A readable checkpoint whose state is not the round its name says."""
  other = folder.parent.parent / 'other'
  _save(other, [7])
  shutil.rmtree(folder / 'state')
  shutil.copytree(_folder(other, 7) / 'state', folder / 'state')


@pytest.mark.parametrize('corrupt', [
    _truncate_arrays, _delete('state'), _delete('state/manifest.ocdbt'),
    _delete('meta/metadata'), _empty, _wrong_round,
], ids=['truncated_arrays', 'no_state', 'no_manifest', 'no_meta', 'empty', 'wrong_round'])
def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, corrupt):
  _save(tmp_path, [1, 2, 3])
  corrupt(_folder(tmp_path, 3))
  with caplog.at_level(logging.WARNING, logger='mocosfl_jax'):
    restored, steps = _restore(tmp_path)
  _assert_state(restored, 2)
  assert steps == [2, 1]
  warnings = [r.getMessage() for r in caplog.records if r.name == 'mocosfl_jax']
  assert len(warnings) == 1 and 'checkpoint of round 3 is unreadable' in warnings[0]
  # Kept for inspection, out of the way of the next save of round 3.
  set_aside = os.listdir(tmp_path / checkpoint.CORRUPT_DIR)
  assert len(set_aside) == 1 and set_aside[0].startswith('3.')
  assert not _folder(tmp_path, 3).exists()


def test_check_compatible_sets_aside_unreadable_metadata(tmp_path):
  _save(tmp_path, [1, 2, 3])
  (_folder(tmp_path, 3) / 'meta' / 'metadata').write_text('{"round": 3, "conf')
  checkpoints = checkpoint.Checkpoints(tmp_path, keep=3)
  assert checkpoints.check_compatible(_config()) == 2
  assert checkpoints.steps() == [2, 1]
  checkpoints.close()
  assert len(os.listdir(tmp_path / checkpoint.CORRUPT_DIR)) == 1


def test_no_readable_checkpoint_starts_over(tmp_path):
  _save(tmp_path, [1, 2])
  for r in (1, 2):
    _empty(_folder(tmp_path, r))
  restored, steps = _restore(tmp_path)
  assert restored is None and steps == []
  assert len(os.listdir(tmp_path / checkpoint.CORRUPT_DIR)) == 2


# The name orbax writes into, and the one with a timestamp that other orbax
# versions use.
@pytest.mark.parametrize('name', ['4.orbax-checkpoint-tmp', '4.orbax-checkpoint-tmp-1795545261'])
def test_unfinished_save_is_ignored_and_removed(tmp_path, name):
  _save(tmp_path, [1, 2, 3])
  # Complete files under the temporary name: a save killed before its rename.
  shutil.copytree(_folder(tmp_path, 3), _folder(tmp_path, 3).parent / name)
  checkpoints = checkpoint.Checkpoints(tmp_path, keep=3)
  assert checkpoints.steps() == [3, 2, 1]
  _assert_state(checkpoints.restore(_abstract(), _config()), 3)
  checkpoints.save(_state(4), 4, _config(), {'history': [[4, 1.5]]})
  checkpoints.close()
  assert sorted(os.listdir(tmp_path / checkpoint.CHECKPOINT_DIR)) == ['2', '3', '4']
  assert not (tmp_path / checkpoint.CORRUPT_DIR).exists()


def test_checkpoint_of_another_config_is_refused_naming_the_fields(tmp_path):
  _save(tmp_path, [1, 2])
  other = _config(**{'optim.lr': 0.1, 'seed': 3})
  checkpoints = checkpoint.Checkpoints(tmp_path, keep=3)
  with pytest.raises(checkpoint.CheckpointError) as check:
    checkpoints.check_compatible(other)
  with pytest.raises(checkpoint.CheckpointError) as restore:
    checkpoints.restore(_abstract(), other)
  steps = checkpoints.steps()
  checkpoints.close()
  for error in (check, restore):
    message = str(error.value)
    assert '\n' not in message
    assert '(round 2) of a different config' in message
    assert 'optim.lr 0.06 -> 0.1; seed 0 -> 3' in message
    assert '--fresh' in message
  # Refused, not set aside: the checkpoint is fine for its own config.
  assert steps == [2, 1]
  assert not (tmp_path / checkpoint.CORRUPT_DIR).exists()


def test_resumable_fields_may_change(tmp_path):
  _save(tmp_path, [1])
  restored, _ = _restore(tmp_path, _config(**{'checkpoint.every': 5, 'eval.every': 2}))
  _assert_state(restored, 1)


def test_config_differences():
  saved = {'a': 1, 'shape': [1, 2], 'nested': {'b': 'x', 'gone': 0}, 'log_every': 1}
  current = {'a': 1, 'shape': (1, 2), 'nested': {'b': 'y', 'new': True}, 'log_every': 10}
  assert checkpoint.config_differences(saved, current) == [
      "nested.b 'x' -> 'y'", 'nested.gone 0 -> (absent)', 'nested.new (absent) -> True']


def test_a_field_the_saved_config_lacks_counts_as_its_default():
  # As a checkpoint written before the field existed.
  saved = config_lib.default_config().to_dict()
  del saved['auto_adjust']
  current = config_lib.default_config()
  assert checkpoint.config_differences(saved, current.to_dict()) == []
  current.auto_adjust = True
  assert checkpoint.config_differences(saved, current.to_dict()) == [
      'auto_adjust False -> True']


def test_fresh_deletes_the_checkpoints(tmp_path):
  _save(tmp_path, [1, 2], config=_config(seed=5))
  checkpoints = checkpoint.Checkpoints(tmp_path, keep=3, fresh=True)
  assert checkpoints.steps() == []
  assert checkpoints.check_compatible(_config()) is None
  checkpoints.close()


def test_stop_on_signal_records_the_first_signal_and_passes_on_the_second():
  received = []
  previous_sigint = signal.getsignal(signal.SIGINT)
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    with checkpoint.StopOnSignal() as stop:
      assert stop.signum is None
      os.kill(os.getpid(), signal.SIGTERM)
      assert stop.signum == signal.SIGTERM and not received
      os.kill(os.getpid(), signal.SIGTERM)
      assert received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGINT) is previous_sigint
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_interrupted_names_the_signal_and_round():
  error = checkpoint.Interrupted(signal.SIGTERM, 7)
  assert (error.signum, error.round) == (signal.SIGTERM, 7)
  assert str(error).startswith('stopped by SIGTERM after round 7;')


def test_failed_read_reports_only_its_error(monkeypatch, caplog):
  """The other arrays' late failures stay off stderr; other reports do not."""
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  asyncio_log = logging.getLogger('asyncio')
  monkeypatch.setattr(asyncio_log, 'filters', [])
  checkpoint.quiet_failed_reads()
  checkpoint.quiet_failed_reads()  # installs its filters once
  assert len(asyncio_log.filters) == 1

  def report(error):
    sys.unraisablehook(types.SimpleNamespace(exc_value=error))

  report(RuntimeError('Event loop is closed'))
  report(RuntimeError('something else'))
  assert [str(r.exc_value) for r in reported] == ['something else']
  with caplog.at_level(logging.ERROR, logger='asyncio'):
    for text in ('Task exception was never retrieved\nfuture: <Task coro=<async_deserialize() '
                 'defined at .../orbax/checkpoint/serialization.py:394>>',
                 'Future exception was never retrieved\nfuture: <Future exception='
                 "ValueError('OUT_OF_RANGE: [tensorstore_spec=...]')>",
                 'Task exception was never retrieved\nfuture: <Task coro=<mine()>>'):
      asyncio_log.error(text)
  assert [r.getMessage() for r in caplog.records] == [
      'Task exception was never retrieved\nfuture: <Task coro=<mine()>>']
