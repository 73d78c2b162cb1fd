"""Command line: ``python -m mocosfl_jax.main --config=configs/quickstart.py --workdir=DIR``.

Fields are overridden with ``--config.field=value``. This module only parses
flags; the run lives in :mod:`mocosfl_jax.train`.

A workdir that holds checkpoints resumes from the newest readable one;
``--fresh`` deletes them and the earlier results and starts over. SIGINT
(Ctrl-C) and SIGTERM stop the run after the current round with a checkpoint;
the exit status is then 128 + the signal number (130 and 143), as a shell
reports a run killed by that signal, so schedulers see an unfinished run. A
second signal stops at once. Outside the rounds (start-up, final probes)
Ctrl-C stops at once with one line and status 130. Errors the user can fix
(flags, config file, config, data, a workdir that cannot be written, an
incompatible checkpoint, a diverged run) print one ``error:`` line and exit
with status 1.

Many processes (hosts) train one run together (README, "Many hosts"): start
the same command in each with ``--coordinator_address``, ``--num_processes``
and ``--process_id``, or without them under SLURM, Open MPI or on a Cloud TPU
pod slice, whose environment tells JAX the same.
"""
from __future__ import annotations

from mocosfl_jax import cli

if __name__ == '__main__':
  # Before the imports below, which take seconds (JAX): Ctrl-C at any moment
  # of start-up ends the command with one line.
  cli.stop_at_once_on_interrupt('stopped by SIGINT; run the same command again to resume '
                                'from the newest checkpoint, if any')

# pylint: disable=g-import-not-at-top,wrong-import-position
import functools
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mocosfl_jax import checkpoint
from mocosfl_jax import distributed
from mocosfl_jax import train
from mocosfl_jax.config_checks import ConfigError
from mocosfl_jax.data.sources import DataError
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Directory for metrics and checkpoints.')
_FRESH = flags.DEFINE_bool('fresh', False,
                           'Delete the checkpoints and earlier results in --workdir and '
                           'start over instead of resuming.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'HOST:PORT of process 0, which every process of a many-process run connects to. '
    'Absent: from the SLURM, Open MPI or Cloud TPU environment, if any.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Processes of the run (absent: 1, or the cluster environment\'s).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process\'s index, 0 to --num_processes - 1; 0 writes the '
    'results (absent: the cluster environment\'s).')


def main(argv):
  del argv
  # Orbax and JAX log every checkpoint step at INFO; the run's own log is enough.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('mocosfl_jax').setLevel(logging.INFO)
  try:
    # Before anything touches a device.
    distributed.initialize(distributed.Flags(_COORDINATOR.value, _NUM_PROCESSES.value,
                                             _PROCESS_ID.value))
    if not distributed.is_primary():
      logging.getLogger('mocosfl_jax').setLevel(logging.ERROR)
    cli.check_output_dir(_WORKDIR.value, f'--workdir={_WORKDIR.value}')
    train.run(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value)
  except checkpoint.Interrupted as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)
  except (cli.OutputPathError, ConfigError, DataError, checkpoint.CheckpointError,
          FloatingPointError) as e:
    # User errors are one line, not a traceback.
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=functools.partial(cli.parse_flags, config_flag='config'))
