"""Metrics files of a training run: ``metrics.jsonl``, TensorBoard, summaries.

``metrics.jsonl`` in the workdir is the source of truth: one JSON object per
logged round. TensorBoard event files are a convenience view of the same
scalars. A run resumed from a checkpoint at round ``r`` first cuts the JSONL
file back to rounds ``<= r``, so that it ends up identical to the file an
uninterrupted run would have written.

Non-finite floats are written the way Python's ``json`` writes them (``NaN``,
``Infinity``): a diverged loss stays visible instead of turning into ``null``,
and ``json.loads`` reads it back.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from typing import Any, Iterator, Mapping
import warnings

import numpy as np

METRICS_FILENAME = 'metrics.jsonl'

# Keys that index a record rather than measure something.
_INDEX_KEYS = ('round', 'step')


def _to_builtin(obj: Any) -> Any:
  """``json.dumps`` hook for numpy (and jax) scalars and arrays."""
  if hasattr(obj, '__array__'):
    return np.asarray(obj).tolist()
  raise TypeError(f'Object of type {type(obj).__name__} is not JSON '
                  'serializable')


def _dumps(obj: Any, **kwargs) -> str:
  return json.dumps(obj, default=_to_builtin, **kwargs)


def _atomic_write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` so that readers see the old or new file only.

  The file gets the usual mode (0644 under the usual umask 022), not
  mkstemp's private 0600.
  """
  directory = os.path.dirname(os.path.abspath(path))
  tmp_path = os.path.join(directory,
                          f'.{os.path.basename(path)}.{secrets.token_hex(6)}.tmp')
  # O_EXCL: a name taken (by chance) fails instead of being shared.
  fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      # Without the fsync a crash right after os.replace can leave an empty
      # file under the final name on some filesystems.
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    os.unlink(tmp_path)
    raise


def write_json(path: str, obj: Any) -> None:
  """Atomically writes ``obj`` as indented JSON, converting numpy values.

  Args:
    path: Destination file; its directory must exist.
    obj: JSON-serializable object; numpy scalars and arrays (and anything
      else with ``__array__``) are converted to Python numbers and lists.
  """
  _atomic_write_text(path, _dumps(obj, indent=2) + '\n')


def _iter_records(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields ``(raw_line, record)`` per valid line, warning about the others."""
  with open(path, 'r', encoding='utf-8') as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        # Typically the last line of a run killed mid-write.
        warnings.warn(f'{path}:{line_number}: dropping malformed line ({e})')
        continue
      if not isinstance(record, dict):
        warnings.warn(
            f'{path}:{line_number}: dropping line that is not a JSON object')
        continue
      yield line.rstrip('\n'), record


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Reads the records of ``workdir/metrics.jsonl`` in file order.

  Malformed lines, such as a half-written last line of a killed run, are
  skipped with a warning naming the file and line number.

  Args:
    workdir: Directory of a training run.

  Returns:
    One dict per valid line.

  Raises:
    FileNotFoundError: if ``workdir`` has no metrics file.
  """
  path = os.path.join(workdir, METRICS_FILENAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no metrics file: {path}')
  return [record for _, record in _iter_records(path)]


def _truncate_to_round(path: str, last_round: int) -> int | None:
  """Keeps only records with ``round <= last_round``; returns their max step."""
  kept_lines = []
  max_step = None
  for line, record in _iter_records(path):
    record_round = record.get('round')
    if not isinstance(record_round, (int, float)) or isinstance(
        record_round, bool):
      warnings.warn(
          f'{path}: dropping record without a numeric round: {line[:80]}')
      continue
    if record_round > last_round:
      continue
    kept_lines.append(line + '\n')
    step = record.get('step')
    if isinstance(step, (int, float)) and not isinstance(step, bool):
      max_step = step if max_step is None else max(max_step, step)
  _atomic_write_text(path, ''.join(kept_lines))
  return None if max_step is None else int(max_step)


def _scalar(value: Any) -> float | int | None:
  """``value`` as a Python number if it is a real numeric scalar, else None."""
  if hasattr(value, '__array__') and np.ndim(value) == 0:
    value = np.asarray(value).item()
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return value


class MetricsWriter:
  """Appends per-round records to ``metrics.jsonl`` and to TensorBoard.

  Usage::

    with MetricsWriter(workdir, resume_from_round=restored_round) as writer:
      writer.write({'round': r, 'step': s, 'loss': loss})
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True,
               resume_from_round: int | None = None):
    """Opens the metrics sinks of ``workdir``, creating it if needed.

    Args:
      workdir: Directory of the training run.
      tensorboard: Whether to also write TensorBoard event files into
        ``workdir``.
      resume_from_round: Round of the checkpoint this run resumes from. Records
        of later rounds, written by the interrupted run after that checkpoint,
        are removed from ``metrics.jsonl`` and hidden in TensorBoard.
    """
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILENAME)
    purge_step = None
    if resume_from_round is not None:
      if os.path.exists(self.path):
        last_step = _truncate_to_round(self.path, resume_from_round)
        purge_step = 0 if last_step is None else last_step + 1
      else:
        warnings.warn(f'resuming from round {resume_from_round} but '
                      f'{self.path} does not exist; earlier rounds are lost',
                      stacklevel=2)
        purge_step = 0
    self._ensure_ends_with_newline()
    self._file = open(self.path, 'a', encoding='utf-8')
    self._workdir = workdir
    self._tensorboard = tensorboard
    self._purge_step = purge_step
    self._tb = None
    if tensorboard and purge_step is not None:
      # At once: the purge must reach TensorBoard even if no record follows.
      self._event_writer()

  def _event_writer(self):
    """The TensorBoard writer, created with the first record or the purge.

    Created late so that an event file always holds a record or a purge: a new
    run stopped before its first record leaves none, and an event file in a
    workdir is a result of a run, as train.earlier_results counts it.
    """
    if self._tb is None:
      # Imported here so that readers of metrics (plotting) do not pay for it.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      # tensorboardX names event files by the second and opens them with 'wb',
      # so two writers started within one second (a quick resume) would share
      # and clobber a file. A nanosecond suffix keeps names distinct and sorts
      # them in creation order, which is the order TensorBoard loads them.
      # purge_step makes TensorBoard discard the interrupted run's events from
      # that step on, mirroring the JSONL truncation.
      self._tb = tensorboardX.SummaryWriter(
          logdir=self._workdir, purge_step=self._purge_step,
          filename_suffix=f'.{time.time_ns()}')
    return self._tb

  def _ensure_ends_with_newline(self) -> None:
    # A run killed mid-line leaves a partial last line; appending straight
    # after it would corrupt the first new record as well.
    if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
      return
    with open(self.path, 'rb') as f:
      f.seek(-1, os.SEEK_END)
      ends_with_newline = f.read(1) == b'\n'
    if not ends_with_newline:
      with open(self.path, 'a', encoding='utf-8') as f:
        f.write('\n')

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends one record and logs its numeric scalars to TensorBoard.

    Args:
      record: Metrics of one round. Must contain 'round' and 'step'; every
        other key with a real numeric scalar value (not None, not bool) becomes
        a TensorBoard scalar at ``global_step=record['step']``.

    Raises:
      KeyError: if 'round' or 'step' is missing; nothing is written then.
      ValueError: if 'step' is not a number; nothing is written then.
    """
    missing = [key for key in _INDEX_KEYS if key not in record]
    if missing:
      raise KeyError(f'metrics record lacks {missing}: {dict(record)}')
    step = _scalar(record['step'])
    if step is None:
      raise ValueError(f"metrics record 'step' is not a number: {dict(record)}")
    # One write call per line, flushed at once: a killed run keeps every
    # record written before the kill.
    self._file.write(_dumps(dict(record)) + '\n')
    self._file.flush()
    if not self._tensorboard:
      return
    tb = self._event_writer()
    for key, value in record.items():
      value = _scalar(value)
      if key in _INDEX_KEYS or value is None:
        continue
      tb.add_scalar(key, value, global_step=int(step))
    # Keeps TensorBoard in step with the JSONL file if the run is killed.
    tb.flush()

  def close(self) -> None:
    """Closes both sinks; safe to call more than once."""
    if not self._file.closed:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
