"""Plots the metrics of one or more training runs into a PNG file.

Usage::

  python -m mocosfl_jax.plot WORKDIR [WORKDIR ...] [--out FILE.png] \\
      [--x step|round]

Each run is one line, labelled by its workdir name, in panels for the loss,
the contrastive (InfoNCE top-1) accuracy and the kNN monitor accuracy, so runs
compare in the same axes. The default output is ``WORKDIR/metrics.png`` for
one run and ``./comparison.png`` for several.

Mistakes (a run without metrics, an output file that cannot be written, a
wrong argument) print one ``error:`` line and exit with status 1, as the other
commands do; Ctrl-C stops at once with one line and status 130.
"""
from __future__ import annotations

from mocosfl_jax import cli

if __name__ == '__main__':
  # Before the imports below (matplotlib): see mocosfl_jax.main.
  cli.stop_at_once_on_interrupt('stopped by SIGINT')

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import os
import sys
from typing import Any, NoReturn, Sequence

# The object-oriented Figure API renders through Agg without pyplot, so no
# display or global backend switch is needed.
from matplotlib.figure import Figure

from mocosfl_jax import metrics
# pylint: enable=g-import-not-at-top,wrong-import-position

# (record key, panel title, marker). kNN accuracy is only logged on evaluation
# rounds; markers show those few points as measurements, not a dense curve.
_PANELS = (
    ('loss', 'Training loss', None),
    ('contrastive_accuracy', 'Contrastive accuracy', None),
    ('knn_accuracy', 'kNN accuracy', 'o'),
)


def _run_labels(workdirs: Sequence[str]) -> list[str]:
  """Workdir names, or the paths as given where two runs share a name."""
  names = [os.path.basename(os.path.normpath(d)) for d in workdirs]
  if len(set(names)) == len(names):
    return names
  return [os.path.normpath(d) for d in workdirs]


def _series(records: Sequence[dict[str, Any]], x: str,
            key: str) -> tuple[list[float], list[float]]:
  """(x, y) of the records where both values are present numbers."""
  xs, ys = [], []
  for record in records:
    x_value, y_value = record.get(x), record.get(key)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool)
           for v in (x_value, y_value)):
      xs.append(x_value)
      ys.append(y_value)
  return xs, ys


def _load_runs(workdirs: Sequence[str]) -> list[list[dict[str, Any]]]:
  """Records of each workdir.

  Raises:
    FileNotFoundError: if a workdir has no metrics file.
    ValueError: if a metrics file holds no records.
  """
  runs = []
  for workdir in workdirs:
    records = metrics.read_metrics(workdir)
    if not records:
      raise ValueError(f'no metrics records in {workdir}')
    runs.append(records)
  return runs


def _render(workdirs: Sequence[str], runs: Sequence[list[dict[str, Any]]],
            out_path: str, x: str) -> str:
  """Draws the panels for already loaded runs and saves them to ``out_path``."""
  labels = _run_labels(workdirs)
  figure = Figure(figsize=(5 * len(_PANELS), 4.5), layout='constrained')
  axes = figure.subplots(1, len(_PANELS))
  handles = {}
  for ax, (key, title, marker) in zip(axes, _PANELS):
    for index, (label, records) in enumerate(zip(labels, runs)):
      xs, ys = _series(records, x, key)
      if not xs:
        continue
      (line,) = ax.plot(xs, ys, color=f'C{index}', marker=marker,
                        markersize=3, linewidth=1.2, label=label)
      handles.setdefault(label, line)
    if not ax.lines:
      ax.text(0.5, 0.5, f'no {key} logged', transform=ax.transAxes,
              ha='center', va='center', color='gray')
    ax.set_title(title)
    ax.set_xlabel(x)
    ax.set_ylabel(key)
    ax.grid(True, alpha=0.3)
  if len(runs) == 1:
    figure.suptitle(f'MocoSFL training: {labels[0]}')
  else:
    figure.suptitle(f'MocoSFL training: {len(runs)} runs')
  # One legend for all panels: every run keeps its colour across panels.
  ordered = [handles[label] for label in labels if label in handles]
  if ordered:
    figure.legend(handles=ordered, loc='outside lower center',
                  ncols=min(len(ordered), 4), frameon=False)
  figure.savefig(out_path, dpi=100)
  return out_path


def plot_runs(workdirs: Sequence[str], out_path: str, x: str = 'step') -> str:
  """Plots the metrics of ``workdirs`` into the PNG file ``out_path``.

  Args:
    workdirs: Training run directories, each with a ``metrics.jsonl``.
    out_path: PNG file to write.
    x: Record key for the horizontal axis, 'step' or 'round'.

  Returns:
    ``out_path``.

  Raises:
    FileNotFoundError: if a workdir has no metrics file.
    ValueError: if a metrics file holds no records.
  """
  return _render(workdirs, _load_runs(workdirs), out_path, x)


def _default_out_path(workdirs: Sequence[str]) -> str:
  if len(workdirs) == 1:
    return os.path.join(workdirs[0], 'metrics.png')
  return 'comparison.png'


class _Parser(argparse.ArgumentParser):
  """Usage mistakes as one ``error:`` line and status 1, not argparse's usage and 2."""

  def error(self, message: str) -> NoReturn:
    self.exit(1, f'error: {message} (--help shows the usage)\n')


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  parser = _Parser(
      prog='python -m mocosfl_jax.plot',
      description='Plot loss and accuracies of MocoSFL training runs.')
  parser.add_argument('workdirs', nargs='+', metavar='DIR',
                      help='training run directory with a metrics.jsonl')
  parser.add_argument('--out', metavar='FILE.png',
                      help='output PNG (default: DIR/metrics.png for one run, '
                      './comparison.png for several)')
  parser.add_argument('--x', choices=('step', 'round'), default='step',
                      help='horizontal axis (default: step)')
  args = parser.parse_args(argv)
  out_path = args.out or _default_out_path(args.workdirs)
  try:
    runs = _load_runs(args.workdirs)
    cli.check_output_file(out_path, f'--out={out_path}' if args.out else
                          f'the output {out_path} (pick another with --out)')
  except (cli.OutputPathError, FileNotFoundError, ValueError) as e:
    # A wrong directory is a usage error, not a crash: one line, no traceback.
    print(f'error: {e}', file=sys.stderr)
    return 1
  _render(args.workdirs, runs, out_path, args.x)
  print(out_path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
