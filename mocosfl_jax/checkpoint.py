"""Checkpoints of a run: the whole SimState plus JSON metadata, saved with orbax.

A checkpoint lives in ``<workdir>/checkpoints/<round>/`` and holds two items:

* ``state``: the :class:`~mocosfl_jax.sfl.state.SimState` (server, EMA server,
  optimiser states, every client's models, optimiser states and step counters,
  the queue and its pointer, the round and step counters). Data order, pool
  draws and augmentation keys are derived from the seed and ``state.round``,
  so the state and the config determine everything that follows.
* ``meta``: JSON with the round, the config the run used and whatever the
  trainer needs to finish its summary (the kNN history, timings).

Orbax writes a checkpoint into ``<round>.orbax-checkpoint-tmp`` and renames
it to ``<round>`` once every file is written; a run killed mid-write leaves
only the temporary folder, which is ignored and removed on the next start, so
the last complete checkpoint is never replaced by a partial one. Saving is
asynchronous: the state is copied on the device and written in a background
thread while training goes on.

A checkpoint that cannot be read (truncated or missing files) is moved to
``<workdir>/corrupt_checkpoints/`` with a warning and the previous one is
used. A checkpoint written under a different config raises
:class:`CheckpointError` naming the differing fields.
"""
from __future__ import annotations

import logging
import pathlib
import shutil
import signal
import sys
import threading
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mocosfl_jax import config as config_lib
from mocosfl_jax import distributed

log = logging.getLogger('mocosfl_jax')

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'corrupt_checkpoints'

# Config fields that may change between a run and its resumption: they say
# where inputs come from and are cached, and how often the run reports,
# evaluates or saves, not what it computes. Every other field must match the
# checkpoint's.
RESUMABLE_FIELDS = frozenset({
    'checkpoint.every', 'checkpoint.keep', 'log_every',
    'eval.every', 'eval.batch_size', 'eval.final_probes', 'eval.probe_epochs',
    'data.cache_dir', 'data.data_dir', 'data.aux_data_dir', 'data.download',
    # Different formulations of the same computation (benchmark.py).
    'model.client_impl', 'round_impl',
    # Where the state lives, not what it holds (sharding.py).
    'mesh.devices',
    # How long the server waits for edge clients (serve.py).
    'edge.timeout_s', 'edge.max_message_mb',
    # The attack on the final model evaluates, it does not train.
    'privacy.attack_at_end', 'privacy.attack_data_fraction', 'privacy.attack_val_fraction',
    'privacy.attack_epochs', 'privacy.attack_batch_size', 'privacy.attack_lr',
    'privacy.attack_channels', 'privacy.attack_test_images', 'privacy.attack_seed',
})


class CheckpointError(ValueError):
  """A checkpoint that this run cannot continue from; the message is one line."""


class Interrupted(Exception):
  """SIGINT or SIGTERM stopped the run after checkpointing a completed round."""

  def __init__(self, signum: int, round_: int):
    self.signum = signum
    self.round = round_
    super().__init__(f'stopped by {signal.Signals(signum).name} after round {round_}; '
                     'its checkpoint is saved: run the same command again to resume')


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _json_like(value: Any) -> Any:
  """Tuples as lists, as they come back from a JSON file."""
  if isinstance(value, (tuple, list)):
    return [_json_like(v) for v in value]
  return value


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """``field saved -> current`` for every differing field outside RESUMABLE_FIELDS.

  A field that the saved config lacks (added to the code after it was
  written) counts as its default, so a run saved before then still resumes.
  """
  saved, current = _flatten(saved), _flatten(current)
  defaults = _flatten(config_lib.default_config().to_dict())
  missing = object()
  differences = []
  for name in sorted(set(saved) | set(current)):
    if name in RESUMABLE_FIELDS:
      continue
    old = saved[name] if name in saved else _json_like(defaults.get(name, missing))
    new = _json_like(current.get(name, missing))
    if old != new:
      show = lambda v: '(absent)' if v is missing else repr(v)
      differences.append(f'{name} {show(old)} -> {show(new)}')
  return differences


# One dispatch for the whole tree. The copies are new buffers: jit never
# returns an input's buffer as an output unless the input is donated.
_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _closed_loop_report(unraisable) -> bool:
  error = unraisable.exc_value
  return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


class _OrphanedReads(logging.Filter):
  """Drops asyncio's reports of orbax and TensorStore failures nobody awaited."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith(('Task exception was never retrieved',
                                    'Future exception was never retrieved'))
                and ('orbax' in message or 'tensorstore' in message))


def quiet_failed_reads() -> None:
  """Keeps the late reports of a failed read's other arrays off stderr.

  Orbax reads arrays in concurrent tasks on an event loop that it closes as
  soon as one read fails. TensorStore still completes the other reads: each
  callback, finding the loop closed, reports 'RuntimeError: Event loop is
  closed' through sys.unraisablehook, and each task or future that failed
  too is logged by asyncio as '... exception was never retrieved' when it is
  collected. That is up to a traceback per array on stderr, around the one
  error that restore() raises and that we report. They can come after
  restore() has returned, so the filters installed here stay; every other
  report passes. Call it before reading a checkpoint.
  """
  asyncio_log = logging.getLogger('asyncio')
  if not any(isinstance(f, _OrphanedReads) for f in asyncio_log.filters):
    asyncio_log.addFilter(_OrphanedReads())
  previous = sys.unraisablehook
  if getattr(previous, 'quiet_failed_reads', False):
    return

  def hook(unraisable):
    if not _closed_loop_report(unraisable):
      previous(unraisable)

  hook.quiet_failed_reads = True
  sys.unraisablehook = hook


def _remove_unfinished_saves(directory: pathlib.Path) -> None:
  """Deletes the folders of saves that a killed run left unfinished.

  Done here rather than by orbax's ``cleanup_tmp_directories``: orbax runs
  that in a background thread that only ``save`` waits for, not ``close``,
  so a run that stopped before its first save (bad data, say) exited with
  the thread still running, and it printed a traceback at interpreter
  shutdown.
  """
  for unfinished in ocp.step.all_temporary_paths(directory):
    shutil.rmtree(unfinished.get())


class Checkpoints:
  """The checkpoints of one workdir: find, verify, restore and save them.

  Usage::

    checkpoints = Checkpoints(workdir, keep=3)
    checkpoints.check_compatible(config)  # cheap; before anything compiles
    restored = checkpoints.restore(abstract_state, config)
    ...
    checkpoints.save(state, rnd, config, extra)
    checkpoints.close()  # waits for the pending save
  """

  def __init__(self, workdir: str | pathlib.Path, *, keep: int, fresh: bool = False):
    """Opens (and with ``fresh``, first deletes) ``<workdir>/checkpoints``.

    Args:
      workdir: the run's directory.
      keep: how many of the newest checkpoints to keep.
      fresh: delete the existing checkpoints instead of resuming from them.
    """
    self.workdir = pathlib.Path(workdir)
    self.directory = self.workdir / CHECKPOINT_DIR
    # With many processes the primary deletes, and the others look only after it did.
    if distributed.is_primary():
      if fresh and self.directory.exists():
        log.warning('--fresh: deleting the checkpoints in %s', self.directory)
        shutil.rmtree(self.directory)
      _remove_unfinished_saves(self.directory)
    distributed.barrier('mocosfl_checkpoints_cleared')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory.absolute(), options=options,
                                          item_names=('state', 'meta'))

  def steps(self) -> list[int]:
    """Rounds of the complete checkpoints, newest first."""
    return sorted(self._manager.all_steps(), reverse=True)

  def _set_aside(self, step: int, error: Exception) -> None:
    """Moves an unreadable checkpoint out of the way, keeping it for inspection."""
    target = self.workdir / CORRUPT_DIR / f'{step}.{time.time_ns()}'
    if distributed.is_primary():
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
    distributed.barrier(f'mocosfl_set_aside_{step}')
    self._manager.reload()
    reason = ' '.join(str(error).split())[:200]
    log.warning('checkpoint of round %d is unreadable (%s: %s); moved to %s, '
                'trying the previous one', step, type(error).__name__, reason, target)

  def _check(self, step: int, meta: Mapping[str, Any], config) -> None:
    differences = config_differences(meta['config'], config.to_dict())
    if differences:
      raise CheckpointError(
          f'{self.directory} holds a checkpoint (round {step}) of a different config: '
          f'{"; ".join(differences)}. Resume with the same config, or pass --fresh to '
          'delete the checkpoints, or use another --workdir')

  def check_compatible(self, config) -> int | None:
    """Raises CheckpointError unless the newest readable checkpoint fits ``config``.

    Reads only the JSON metadata, so it can run before the data is loaded and
    anything is compiled. Unreadable checkpoints are set aside on the way.

    Returns:
      The round of that checkpoint, or None if there is none.
    """
    for step in self.steps():
      try:
        quiet_failed_reads()
        meta = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
        self._check(step, meta, config)
        return step
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any read failure)
        self._set_aside(step, e)
    return None

  def restore(self, abstract_state, config) -> tuple[Any, dict[str, Any]] | None:
    """The newest readable checkpoint's state and metadata, or None if none is left.

    Args:
      abstract_state: the state's tree of ``jax.ShapeDtypeStruct`` (with
        shardings), e.g. from ``jax.eval_shape`` of the state's initialiser.
      config: the run's config; a checkpoint of a different one is an error.

    Raises:
      CheckpointError: the checkpoint was written under a different config.
    """
    for step in self.steps():
      try:
        quiet_failed_reads()
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        self._check(step, restored.meta, config)
        if int(restored.state.round) != step or restored.meta['round'] != step:
          raise ValueError(f'it holds round {int(restored.state.round)}')
        return restored.state, restored.meta
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any read failure)
        self._set_aside(step, e)
    return None

  def save(self, state, round_: int, config, extra: Mapping[str, Any]) -> None:
    """Starts saving ``state`` as round ``round_``'s checkpoint and returns.

    Args:
      state: the SimState after ``round_`` rounds. It is copied on the device
        first, because the next round donates (and overwrites) its buffers
        while the background thread still writes them.
      round_: completed rounds; the checkpoint's name.
      config: the config of the run, recorded for the compatibility check.
      extra: JSON-serialisable metadata to restore with the state.
    """
    snapshot = _copy(state)
    meta = {'round': round_, 'config': config.to_dict(), **extra}
    self._manager.save(round_, args=ocp.args.Composite(
        state=ocp.args.StandardSave(snapshot), meta=ocp.args.JsonSave(meta)))

  def wait(self) -> None:
    """Blocks until the pending save, if any, is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the pending save and releases the manager."""
    self._manager.close()


class StopOnSignal:
  """Turns SIGINT and SIGTERM into a request to stop after the current round.

  The trainer polls :attr:`signum` after each round, saves a checkpoint and
  raises :class:`Interrupted`. A second signal gets the previous handler (for
  SIGINT, a KeyboardInterrupt) for when the round itself hangs. Outside the
  main thread, where Python cannot install handlers, this does nothing.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    log.warning('%s received: stopping after this round with a checkpoint '
                '(send it again to stop at once)', signal.Signals(signum).name)
    self._restore()

  def _restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __enter__(self) -> StopOnSignal:
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        previous = signal.signal(signum, self._handle)
        # None: a handler installed from C, which Python cannot reinstall.
        self._previous[signum] = signal.SIG_DFL if previous is None else previous
    return self

  def __exit__(self, *exc_info) -> None:
    self._restore()
