"""Tests for mocosfl_jax.metrics: JSONL records, resume, TensorBoard, JSON."""
import glob
import json
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from mocosfl_jax import metrics


def _records(rounds, steps_per_round=10):
  return [{'round': r, 'step': r * steps_per_round, 'loss': 10.0 / r,
           'contrastive_accuracy': 0.1 * r, 'lr_server': 0.06,
           'knn_accuracy': 50.0 + r if r % 2 == 0 else None}
          for r in rounds]


def _write_run(workdir, records, **kwargs):
  with metrics.MetricsWriter(workdir, **kwargs) as writer:
    for record in records:
      writer.write(record)


def _read_bytes(workdir):
  with open(os.path.join(workdir, metrics.METRICS_FILENAME), 'rb') as f:
    return f.read()


def _append(workdir, text):
  with open(os.path.join(workdir, metrics.METRICS_FILENAME), 'a') as f:
    f.write(text)


def _read_events(path):
  """Events of a TFRecord-framed event file, without TensorFlow.

  Each record is: uint64 length, uint32 masked CRC of the length, the
  serialized Event, uint32 masked CRC of the data.
  """
  events = []
  with open(path, 'rb') as f:
    data = f.read()
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack_from('<Q', data, offset)
    offset += 12
    events.append(event_pb2.Event.FromString(data[offset:offset + length]))
    offset += length + 4
  return events


def _scalars(events):
  """{tag: [(step, value), ...]} of the scalar summaries in ``events``."""
  scalars = {}
  for event in events:
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def _event_files(workdir):
  return sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*')))


def test_records_round_trip(tmp_path):
  records = _records(range(1, 4))
  _write_run(tmp_path, records, tensorboard=False)
  assert metrics.read_metrics(tmp_path) == records


def test_numpy_values_are_written_as_numbers(tmp_path):
  _write_run(tmp_path, [{'round': np.int64(1), 'step': np.int32(10),
                         'loss': np.float32(0.5), 'hist': np.arange(3)}],
             tensorboard=False)
  assert metrics.read_metrics(tmp_path) == [
      {'round': 1, 'step': 10, 'loss': 0.5, 'hist': [0, 1, 2]}]


def test_each_record_is_on_disk_before_close(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, tensorboard=False)
  try:
    writer.write(_records([1])[0])
    assert metrics.read_metrics(tmp_path) == _records([1])
  finally:
    writer.close()


def test_record_without_step_is_rejected_and_not_written(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(KeyError, match='step'):
      writer.write({'round': 1, 'loss': 1.0})
  assert metrics.read_metrics(tmp_path) == []


def test_truncated_last_line_is_dropped_with_warning(tmp_path):
  _write_run(tmp_path, _records(range(1, 4)), tensorboard=False)
  _append(tmp_path, '{"round": 4, "step": 40, "lo')
  path = os.path.join(tmp_path, metrics.METRICS_FILENAME)
  with pytest.warns(UserWarning, match=f'{path}:4: dropping malformed line'):
    records = metrics.read_metrics(tmp_path)
  assert records == _records(range(1, 4))


def test_append_after_truncated_line_keeps_new_record(tmp_path):
  _write_run(tmp_path, _records([1]), tensorboard=False)
  _append(tmp_path, '{"round": 2, "st')
  _write_run(tmp_path, _records([3]), tensorboard=False)
  with pytest.warns(UserWarning, match=':2: dropping malformed line'):
    records = metrics.read_metrics(tmp_path)
  assert records == _records([1, 3])


def test_read_metrics_missing_file_names_path(tmp_path):
  workdir = os.path.join(tmp_path, 'no_such_run')
  with pytest.raises(FileNotFoundError, match='no_such_run'):
    metrics.read_metrics(workdir)


def test_resume_keeps_exactly_rounds_up_to_checkpoint(tmp_path):
  _write_run(tmp_path, _records(range(1, 6)), tensorboard=False)
  _append(tmp_path, '{"round": 6, "step"')  # Killed mid-write.
  path = os.path.join(tmp_path, metrics.METRICS_FILENAME)
  with pytest.warns(UserWarning, match=f'{path}:6: dropping malformed line'):
    metrics.MetricsWriter(
        tmp_path, tensorboard=False, resume_from_round=3).close()
  assert metrics.read_metrics(tmp_path) == _records(range(1, 4))


def test_resumed_run_writes_same_file_as_uninterrupted_run(tmp_path):
  uninterrupted = os.path.join(tmp_path, 'uninterrupted')
  resumed = os.path.join(tmp_path, 'resumed')
  _write_run(uninterrupted, _records(range(1, 8)), tensorboard=False)
  # The interrupted run got to round 5 and half of round 6, but its last
  # checkpoint is from round 4.
  _write_run(resumed, _records(range(1, 6)), tensorboard=False)
  _append(resumed, '{"round": 6, ')
  with pytest.warns(UserWarning, match='malformed'):
    _write_run(resumed, _records(range(5, 8)), tensorboard=False,
               resume_from_round=4)
  assert _read_bytes(resumed) == _read_bytes(uninterrupted)


def test_resume_rewrite_is_atomic(tmp_path, monkeypatch):
  _write_run(tmp_path, _records(range(1, 6)), tensorboard=False)
  before = _read_bytes(tmp_path)

  def failing_replace(src, dst):
    raise OSError('disk full')

  monkeypatch.setattr(metrics.os, 'replace', failing_replace)
  with pytest.raises(OSError, match='disk full'):
    metrics.MetricsWriter(tmp_path, tensorboard=False, resume_from_round=2)
  assert _read_bytes(tmp_path) == before
  assert os.listdir(tmp_path) == [metrics.METRICS_FILENAME]


def test_tensorboard_scalars_at_record_steps(tmp_path):
  records = _records(range(1, 5))
  records[0]['note'] = 'text is not a scalar'
  records[0]['converged'] = False
  _write_run(tmp_path, records)
  (event_file,) = _event_files(tmp_path)
  scalars = _scalars(_read_events(event_file))
  assert set(scalars) == {'loss', 'contrastive_accuracy', 'lr_server',
                          'knn_accuracy'}
  steps, values = zip(*scalars['loss'])
  assert steps == tuple(r['step'] for r in records)
  assert values == pytest.approx([r['loss'] for r in records])
  # kNN accuracy is None on odd rounds: only the evaluated rounds appear.
  assert scalars['knn_accuracy'] == [(20, 52.0), (40, 54.0)]


def test_tensorboard_resume_purges_steps_after_checkpoint(tmp_path):
  _write_run(tmp_path, _records(range(1, 6)))
  _write_run(tmp_path, _records(range(4, 6)), resume_from_round=3)
  first, second = _event_files(tmp_path)
  assert _scalars(_read_events(first))['loss'][-1][0] == 50
  events = _read_events(second)
  starts = [e.step for e in events
            if e.session_log.status == event_pb2.SessionLog.START]
  # TensorBoard drops earlier events with step >= a START event's step.
  assert starts == [31]
  assert [step for step, _ in _scalars(events)['loss']] == [40, 50]


def test_write_json_converts_numpy(tmp_path):
  path = os.path.join(tmp_path, 'summary.json')
  metrics.write_json(path, {'knn_accuracy': np.float32(81.5),
                            'rounds': np.int64(200),
                            'per_client': np.array([1.0, 2.0])})
  with open(path) as f:
    assert json.load(f) == {'knn_accuracy': 81.5, 'rounds': 200,
                            'per_client': [1.0, 2.0]}


def test_write_json_is_atomic(tmp_path, monkeypatch):
  path = os.path.join(tmp_path, 'summary.json')
  metrics.write_json(path, {'round': 1})

  def failing_replace(src, dst):
    raise OSError('disk full')

  monkeypatch.setattr(metrics.os, 'replace', failing_replace)
  with pytest.raises(OSError):
    metrics.write_json(path, {'round': 2})
  with open(path) as f:
    assert json.load(f) == {'round': 1}
  assert os.listdir(tmp_path) == ['summary.json']
