"""Times the JAX step and the PyTorch reference-shaped step in one process, alternating, and writes JSON.

    pip install torch --index-url https://download.pytorch.org/whl/cpu   # not a dependency
    python experiments/torch_ab.py --out experiments/results/torch_ab_cpu.json

On these shared machines a whole process runs 10-25% faster or slower than
the one before it (the same PyTorch step measured 6.0 s and 7.2 s within a
quarter of an hour), more than the difference between the two frameworks. So both
steps are built in one process and their steps alternate, each timed under the
same load: the JAX step as ``benchmark.py`` builds it (client formulation
'matmul', what ``auto`` picks, on-device augmentation included) and the
PyTorch step of ``torch_reference_step.py`` (no augmentation). Each framework
keeps its own two-thread pool; only one of them runs at a time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmark  # noqa: E402
import results_file  # noqa: E402
import torch_reference_step  # noqa: E402


def compare(setting: str, repeats: int) -> dict:
  shape = benchmark.SETTINGS[setting]
  compiled, state, images, compile_s = benchmark.build(**shape, impl='matmul', width=1.0,
                                                       queue_size=6000)
  torch_step = torch_reference_step.build_step(shape['clients'], shape['batch'],
                                               shape['cut_layer'])

  def jax_step(i):
    nonlocal state
    state, metrics = compiled(state, images, jax.random.key(3 + i))
    jax.block_until_ready((state, metrics))

  steps = {'jax': jax_step, 'torch': lambda i: torch_step()}
  for step in steps.values():
    step(-1)  # warm-up
  times = results_file.alternate(steps, repeats)
  medians = {name: statistics.median(t) for name, t in times.items()}
  ratios = [t / j for j, t in zip(times['jax'], times['torch'])]
  return {'setting': setting, **shape, 'impl': 'matmul', 'jax_compile_seconds': compile_s,
          'step_seconds_median': medians, 'step_seconds_all': times,
          'torch_over_jax_median': statistics.median(ratios),
          'torch_over_jax_all': ratios}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='JSON file to write')
  parser.add_argument('--settings', default='a,b,c', help='comma-separated subset of a,b,c')
  parser.add_argument('--repeats', type=int, default=8, help='timed steps per framework')
  args = parser.parse_args()
  results = results_file.new(backend=jax.default_backend(), jax_version=jax.__version__,
                             torch_version=torch.__version__,
                             torch_threads=torch.get_num_threads())
  for setting in args.settings.split(','):
    results_file.add_run(results, compare(setting, args.repeats), args.out)

if __name__ == '__main__':
  main()
