"""Command line: ``python -m mocosfl_jax.evaluate --workdir=DIR``.

Runs the final evaluations (kNN, linear probe, MLP probe on 10% and 1% of the
labels; :mod:`mocosfl_jax.evaluation.final`) on the checkpoints of a finished
or interrupted run, writes ``DIR/evaluation.json`` and prints a table. The
config is the one recorded in the checkpoint; the probes use the same key as
``train.run``, so a finished run's numbers equal those in its summary.json.

``--checkpoint`` picks the models: ``all`` (the default, as ``train.run``
does: the newest checkpoint and the best-kNN model), ``latest``, ``best`` or a
round number. ``--probe_epochs`` overrides the config's ``eval.probe_epochs``.
Nothing in the workdir is changed except evaluation.json, whose folder is
checked before anything runs; the table is printed before the file is written.
Errors the user can fix print one ``error:`` line and exit with status 1;
Ctrl-C stops at once with one line and status 130.
"""
from __future__ import annotations

from mocosfl_jax import cli

if __name__ == '__main__':
  # Before the imports below, which take seconds (JAX): see mocosfl_jax.main.
  cli.stop_at_once_on_interrupt('stopped by SIGINT; evaluation.json is not written')

# pylint: disable=g-import-not-at-top,wrong-import-position
import logging
import pathlib
import sys
from typing import Any, Callable

from absl import app, flags
from absl import logging as absl_logging
import jax
import orbax.checkpoint as ocp

from mocosfl_jax import checkpoint
from mocosfl_jax import config as config_lib
from mocosfl_jax import config_checks
from mocosfl_jax import metrics as metrics_lib
from mocosfl_jax import train
from mocosfl_jax.config_checks import ConfigError
from mocosfl_jax.data.sources import DataError
from mocosfl_jax.evaluation import final
# pylint: enable=g-import-not-at-top,wrong-import-position

EVALUATION_FILENAME = 'evaluation.json'

log = logging.getLogger('mocosfl_jax')


class EvaluationError(ValueError):
  """A workdir that cannot be evaluated as asked; the message is one line."""


def read_checkpoint(path: pathlib.Path, **items) -> Any:
  """Restores ``items`` (orbax restore args by item name) from a checkpoint folder."""
  try:
    checkpoint.quiet_failed_reads()
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
        path, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except  (any read failure)
    reason = ' '.join(str(e).split())[:200]
    raise EvaluationError(f'checkpoint {path} is unreadable ({type(e).__name__}: {reason}); '
                          'pick another with --checkpoint=ROUND') from e


def selected_round(workdir: pathlib.Path, selection: str) -> int | None:
  """The round of the checkpoint that ``selection`` names; None for 'best'."""
  if selection == 'best':
    return None
  directory = workdir / checkpoint.CHECKPOINT_DIR
  # orbax renames a checkpoint's folder to its round once it is complete.
  rounds = sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit()) if directory.is_dir() else []
  if not rounds:
    raise EvaluationError(f'{workdir} holds no checkpoint (none in {directory})')
  if selection in ('all', 'latest'):
    return rounds[-1]
  if not selection.isdigit() or int(selection) not in rounds:
    raise EvaluationError(f'--checkpoint={selection}: use all, latest, best or one of the '
                          f'saved rounds {rounds}')
  return int(selection)


def run(workdir: str | pathlib.Path, selection: str = 'all',
        probe_epochs: int | None = None,
        show: Callable[[dict], None] | None = None) -> dict:
  """Evaluates the models of ``workdir`` and writes ``workdir/evaluation.json``.

  Args:
    workdir: a run's directory.
    selection: 'all' (the newest checkpoint and the best-kNN model, as
      ``train.run`` evaluates them), 'latest', 'best' or a saved round.
    probe_epochs: epochs of every probe; None for the config's.
    show: called with the result before the file is written, so that a
      failed write loses nothing (the command line prints the table).

  Returns:
    ``final.final_evaluation``'s result, plus the selection; as written.

  Raises:
    EvaluationError: no such workdir, no or no such checkpoint, an
      unreadable one, or probe_epochs below 1.
    cli.OutputPathError: evaluation.json cannot be written; checked before
      anything is evaluated.
    ConfigError: the recorded config fails today's checks.
    DataError: the run's data is missing or bad.
  """
  if probe_epochs is not None and probe_epochs < 1:
    raise EvaluationError(f'--probe_epochs={probe_epochs}: use at least 1')
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise EvaluationError(f'no directory {workdir}')
  output = workdir / EVALUATION_FILENAME
  cli.check_output_file(output, str(output))
  round_ = selected_round(workdir, selection)
  best = final.BestKnnModel(workdir)
  if round_ is None:
    meta = best.meta()
    if meta is None:
      raise EvaluationError(f'{workdir} holds no best-kNN model (none in {best.directory})')
  else:
    path = (workdir / checkpoint.CHECKPOINT_DIR / str(round_)).absolute()
    meta = read_checkpoint(path, meta=ocp.args.JsonRestore()).meta
  # Fields added to the code after the run keep their defaults.
  config = config_lib.default_config()
  config.update(meta['config'])
  config_checks.validate(config)
  exp = train.build(config)
  abstract_state = train.on_device(jax.eval_shape(exp.init_state, jax.random.key(0)))
  abstract_model = train.on_device(jax.eval_shape(final.eval_model, abstract_state))

  models = {}
  if round_ is not None:
    state = read_checkpoint(path, state=ocp.args.StandardRestore(abstract_state)).state
    if selection in ('all', 'latest'):
      name = 'final'
      description = (f'final model (round {round_})' if round_ == config.num_rounds else
                     f'newest checkpoint (round {round_} of {config.num_rounds}, unfinished)')
    else:
      name, description = f'round_{round_}', f'checkpoint of round {round_}'
    models[name] = (description, round_, final.eval_model(state))
  if selection in ('all', 'best'):
    restored = best.restore(abstract_model, config)
    if restored is not None:
      model, best_meta = restored
      models['best_knn'] = (f'best-kNN model (round {best_meta["round"]}, kNN '
                            f'{best_meta["knn_accuracy"]:.2f}%)', best_meta['round'], model)
    elif selection == 'best':
      raise EvaluationError(f'{workdir} holds no best-kNN model of this config')
    else:
      log.warning('no best-kNN model in %s: evaluating the newest checkpoint only',
                  best.directory)

  epochs = config.eval.probe_epochs if probe_epochs is None else probe_epochs
  evaluation = {'selection': selection,
                **final.final_evaluation(exp, models, final.probe_key(config.seed), epochs)}
  if show is not None:
    show(evaluation)
  try:
    metrics_lib.write_json(output, evaluation)
  except OSError as e:  # the folder changed since the check, or the disk is full
    raise cli.OutputPathError(f'cannot write {output} ({e.strerror or e})') from e
  return evaluation


def _print_table(evaluation: dict) -> None:
  print(final.format_table(evaluation), flush=True)


def main(argv):
  del argv
  # Orbax and JAX log every checkpoint step at INFO; the run's own log is enough.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('mocosfl_jax').setLevel(logging.INFO)
  try:
    run(flags.FLAGS.workdir, flags.FLAGS.checkpoint, flags.FLAGS.probe_epochs,
        show=_print_table)
  except (EvaluationError, cli.OutputPathError, ConfigError, DataError,
          checkpoint.CheckpointError) as e:
    # User errors are one line, not a traceback.
    sys.exit(f'error: {e}')
  print(f'written to {pathlib.Path(flags.FLAGS.workdir) / EVALUATION_FILENAME}')


if __name__ == '__main__':
  # Defined here, not at import, so that importing this module next to
  # mocosfl_jax.main (which has its own --workdir) defines no flag twice.
  flags.DEFINE_string('workdir', None, 'Directory of the run to evaluate.')
  flags.DEFINE_string('checkpoint', 'all',
                      'all (newest checkpoint and best-kNN model), latest, best or a round.')
  flags.DEFINE_integer('probe_epochs', None, 'Probe epochs; default: the config\'s.')
  flags.mark_flags_as_required(['workdir'])
  app.run(main, flags_parser=cli.parse_flags)
