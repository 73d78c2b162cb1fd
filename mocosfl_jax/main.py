"""Command line: ``python -m mocosfl_jax.main --config=configs/quickstart.py --workdir=DIR``.

Fields are overridden with ``--config.field=value``. This module only parses
flags; the run lives in :mod:`mocosfl_jax.train`.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from mocosfl_jax import train
from mocosfl_jax.data.sources import DataError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Directory for metrics and checkpoints.')


def main(argv):
  del argv
  logging.getLogger('mocosfl_jax').setLevel(logging.INFO)
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except DataError as e:
    # User errors are one line, not a traceback.
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
