"""Command line: ``python -m mocosfl_jax.export --workdir=DIR``.

Exports client 0 of a run (online model, EMA model, momentum, step count) to
``DIR/export/client_c{cut}_b{batch}[_{quantize}].tflite`` (or ``--out``) and
writes the JSON sidecar beside it. ``--checkpoint`` picks the models as
``evaluate`` does: ``latest`` (the default), ``best`` or a round number.
``--batch`` fixes the batch of every signature (default: the run's
``batch_size``). ``--quantize=float16|int8`` and ``--infer_only`` export the
weights-folded ``infer`` signature alone; a frozen client (``optim.client_lr``
0) always does. Needs the ``export`` extra. Errors the user can fix print one
``error:`` line and exit with status 1.
"""
from __future__ import annotations

import logging
import pathlib
import sys
from typing import Any

from absl import app, flags
from absl import logging as absl_logging

from mocosfl_jax import checkpoint
from mocosfl_jax import evaluate
from mocosfl_jax.config_checks import ConfigError
from mocosfl_jax.export import exporter, litert
from mocosfl_jax.export import workdir as workdir_lib

EXPORT_DIR = 'export'


def run(workdir: str | pathlib.Path, selection: str = 'latest', out: str | None = None,
        quantize: str = 'none', batch: int | None = None,
        infer_only: bool = False) -> tuple[pathlib.Path, dict[str, Any]]:
  """Exports client 0 of ``workdir``'s selected checkpoint; returns (model path, sidecar)."""
  client = workdir_lib.load(workdir, selection)
  batch = client.config.batch_size if batch is None else batch
  if out is None:
    out = (pathlib.Path(workdir) / EXPORT_DIR
           / exporter.default_filename(client.config, batch, quantize))
  trainable = None if not infer_only else False
  described = exporter.export_client(
      client.config, client.online, client.ema, client.momentum, out, batch=batch,
      quantize=quantize, trainable=trainable, step=client.step, source=client.source)
  return pathlib.Path(out), described


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('mocosfl_jax').setLevel(logging.INFO)
  f = flags.FLAGS
  try:
    path, described = run(f.workdir, f.checkpoint, f.out, f.quantize, f.batch, f.infer_only)
  except (evaluate.EvaluationError, ConfigError, checkpoint.CheckpointError,
          litert.ExportError) as e:
    sys.exit(f'error: {e}')
  kind = 'trainable' if described['trainable'] else 'inference-only'
  print(f'{path}: {kind} client, cut {described["cut_layer"]}, batch {described["batch"]}, '
        f'{described["size_bytes"]} bytes, signatures {", ".join(described["signatures"])}')
  print(f'sidecar: {exporter.sidecar_path(path)}')


if __name__ == '__main__':
  # Defined here, not at import, as in ``evaluate``: importing this module
  # next to mocosfl_jax.main (which has its own --workdir) defines no flag twice.
  flags.DEFINE_string('workdir', None, 'Directory of the run to export.')
  flags.DEFINE_string('checkpoint', 'latest', 'latest, best or a saved round.')
  flags.DEFINE_string('out', None, 'The .tflite file; default DIR/export/client_c{cut}_b{batch}'
                      '[_{quantize}].tflite. The sidecar gets .json for .tflite.')
  flags.DEFINE_enum('quantize', 'none', litert.QUANTIZE,
                    'Weights: none (float32), float16 or dynamic-range int8 (inference only).')
  flags.DEFINE_integer('batch', None, "Batch of every signature; default: the run's batch_size.")
  flags.DEFINE_bool('infer_only', False, 'Export only the weights-folded infer signature.')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
