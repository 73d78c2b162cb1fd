"""Command line: ``python -m mocosfl_jax.main --config=configs/quickstart.py --workdir=DIR``.

Fields are overridden with ``--config.field=value``. This module only parses
flags; the run lives in :mod:`mocosfl_jax.train`.

A workdir that holds checkpoints resumes from the newest readable one;
``--fresh`` deletes them and starts over. SIGINT (Ctrl-C) and SIGTERM stop
the run after the current round with a checkpoint; the exit status is then
128 + the signal number (130 and 143), as a shell reports a run killed by that
signal, so schedulers see an unfinished run. A second signal stops at once.
Errors the user can fix (config, data, an incompatible checkpoint, a diverged
run) print one ``error:`` line and exit with status 1.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mocosfl_jax import checkpoint
from mocosfl_jax import train
from mocosfl_jax.config_checks import ConfigError
from mocosfl_jax.data.sources import DataError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Directory for metrics and checkpoints.')
_FRESH = flags.DEFINE_bool('fresh', False,
                           'Delete the checkpoints in --workdir and start over instead of '
                           'resuming from them.')


def main(argv):
  del argv
  # Orbax and JAX log every checkpoint step at INFO; the run's own log is enough.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('mocosfl_jax').setLevel(logging.INFO)
  try:
    train.run(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value)
  except checkpoint.Interrupted as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)
  except (ConfigError, DataError, checkpoint.CheckpointError, FloatingPointError) as e:
    # User errors are one line, not a traceback.
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
