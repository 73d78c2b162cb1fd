"""What the experiment scripts share: the JSON results file (machine facts and
runs so far) and alternating step timings.

Imports nothing but the standard library, so the PyTorch reference script can
use it without JAX.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from typing import Callable


def cpu_model() -> str:
  """The processor's name (these shared machines come as more than one kind)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def new(**facts) -> dict:
  """Results with the date, machine and command, plus ``facts`` (versions, backend)."""
  return {'date': datetime.date.today().isoformat(), 'cpu_count': os.cpu_count(),
          'cpu': cpu_model(), 'machine': platform.platform(), 'command': ' '.join(sys.argv),
          **facts, 'runs': []}


def add_run(results: dict, run: dict, path: str) -> None:
  """Appends ``run``, prints it without per-step times, and rewrites ``path``.

  Written after every run, so an interrupted sweep keeps what it measured.
  """
  results['runs'].append(run)
  print(json.dumps({k: v for k, v in run.items() if k != 'step_seconds_all'}), flush=True)
  write(results, path)


def write(results: dict, path: str) -> None:
  """Writes ``results`` to ``path``, making its folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(results, f, indent=2)


def alternate(steps: dict[str, Callable[[int], None]], repeats: int) -> dict[str, list[float]]:
  """Seconds of ``repeats`` calls of each step, called in turn (``step(i)`` in round i).

  Whole processes on these shared machines drift by more than the differences
  the A/B scripts measure; steps that alternate are timed under the same load.
  Each step must block until its work is done.
  """
  times = {name: [] for name in steps}
  for i in range(repeats):
    for name, step in steps.items():
      tick = time.perf_counter()
      step(i)
      times[name].append(time.perf_counter() - tick)
  return times
