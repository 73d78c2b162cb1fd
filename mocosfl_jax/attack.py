"""Command line: ``python -m mocosfl_jax.attack --workdir=DIR``.

Runs the model-inversion attack (spec 6.1, :mod:`mocosfl_jax.privacy.attack`)
on client 0 of a run's checkpoint and writes ``DIR/attack.json`` (the mean
MSE, SSIM and PSNR over the test images, the decoder's hold-out history, the
settings and the evaluated checkpoint) and ``DIR/attack.png`` (test images
above their reconstructions). ``--checkpoint`` picks the model as ``export``
does: ``latest`` (the default), ``best`` or a round number. The attack's
settings are the run's ``privacy.*`` fields; ``--epochs`` overrides
``privacy.attack_epochs``. Errors the user can fix print one ``error:`` line
and exit with status 1; Ctrl-C stops at once with one line and status 130.
"""
from __future__ import annotations

from mocosfl_jax import cli

if __name__ == '__main__':
  # Before the imports below, which take seconds (JAX): see mocosfl_jax.main.
  cli.stop_at_once_on_interrupt('stopped by SIGINT; attack.json is not written')

# pylint: disable=g-import-not-at-top,wrong-import-position
import logging
import pathlib
import sys
from typing import Any, Callable, Mapping

from absl import app, flags
from absl import logging as absl_logging

from mocosfl_jax import checkpoint
from mocosfl_jax import config_checks
from mocosfl_jax import evaluate
from mocosfl_jax.config_checks import ConfigError
from mocosfl_jax.data import sources
from mocosfl_jax.data.sources import DataError
from mocosfl_jax.export import workdir as workdir_lib
from mocosfl_jax.models import split
from mocosfl_jax.privacy import attack as attack_lib
# pylint: enable=g-import-not-at-top,wrong-import-position


def run(workdir: str | pathlib.Path, selection: str = 'latest',
        overrides: Mapping[str, Any] | None = None,
        show: Callable[[dict], None] | None = None) -> dict:
  """Attacks client 0 of ``workdir``'s checkpoint ``selection``; writes attack.json and .png.

  Args:
    workdir: a run's directory.
    selection: 'latest', 'best' or a saved round.
    overrides: ``privacy`` fields to replace, e.g. ``{'attack_epochs': 5}``.
    show: called with the result before the files are written.

  Returns:
    The result written to attack.json.

  Raises:
    evaluate.EvaluationError: no such workdir or checkpoint, or an unreadable one.
    cli.OutputPathError: a result file cannot be written; checked before anything runs.
    ConfigError: the recorded config fails today's checks, or a bad override.
    DataError: the run's data is missing or bad.
  """
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise evaluate.EvaluationError(f'no directory {workdir}')
  for name in (attack_lib.RESULT_FILENAME, attack_lib.IMAGE_FILENAME):
    cli.check_output_file(workdir / name, str(workdir / name))
  if selection == 'all':
    raise evaluate.EvaluationError(
        f'--checkpoint=all: the attack evaluates one model; use {workdir_lib.SELECTIONS}')
  client = workdir_lib.load(workdir, selection)
  config = client.config
  for name, value in (overrides or {}).items():
    config.privacy[name] = value
  config_checks.validate(config)
  client_net, _ = split.build(config)
  train = sources.load_split(config.data, 'train', config.model.image_size)
  test = sources.load_split(config.data, 'test', config.model.image_size)
  try:
    result, originals, reconstructions = attack_lib.attack_client(
        config, client_net, client.online, train, test)
  except ValueError as e:  # smashed data that the decoder cannot map back to the image
    raise ConfigError(str(e)) from e
  result['checkpoint'] = client.source
  if show is not None:
    show(result)
  try:
    attack_lib.write_results(workdir, result, originals, reconstructions)
  except OSError as e:  # the folder changed since the check, or the disk is full
    raise cli.OutputPathError(f'cannot write the results into {workdir} '
                              f'({e.strerror or e})') from e
  return result


def describe(result: dict) -> str:
  """The result in three lines."""
  m, data, v = result['metrics'], result['data'], result['validation']
  source = result['checkpoint']
  return '\n'.join([
      f'model-inversion attack on {source["checkpoint"]} (round {source["round"]}), '
      f'{result["decoder"]} decoder trained on {data["train_pairs"]} pairs, '
      f'best hold-out epoch {v["best_epoch"]} of {len(v["validation_mse"])}',
      f'  {data["test_images"]} test images: MSE {m["mse"]:.4f}, SSIM {m["ssim"]:.4f} '
      f'(borders out: {m["ssim_valid"]:.4f}), PSNR {m["psnr"]:.2f} dB',
      '  higher MSE, lower SSIM and PSNR: a more private client'])


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('mocosfl_jax').setLevel(logging.INFO)
  f = flags.FLAGS
  overrides = {} if f.epochs is None else {'attack_epochs': f.epochs}
  try:
    run(f.workdir, f.checkpoint, overrides, show=lambda r: print(describe(r), flush=True))
  except (evaluate.EvaluationError, cli.OutputPathError, ConfigError, DataError,
          checkpoint.CheckpointError) as e:
    # User errors are one line, not a traceback.
    sys.exit(f'error: {e}')
  workdir = pathlib.Path(f.workdir)
  print(f'written to {workdir / attack_lib.RESULT_FILENAME} and '
        f'{workdir / attack_lib.IMAGE_FILENAME}')


if __name__ == '__main__':
  # Defined here, not at import, as in ``evaluate``: importing this module
  # next to mocosfl_jax.main (which has its own --workdir) defines no flag twice.
  flags.DEFINE_string('workdir', None, 'Directory of the run to attack.')
  flags.DEFINE_string('checkpoint', 'latest', 'latest, best or a saved round.')
  flags.DEFINE_integer('epochs', None, "Decoder epochs; default: the run's privacy.attack_epochs.")
  flags.mark_flags_as_required(['workdir'])
  app.run(main, flags_parser=cli.parse_flags)
