"""Times the training step with flax's GroupNorm and with ours, alternating, and writes JSON.

    python experiments/groupnorm_ab.py --out experiments/results/groupnorm_ab_cpu.json

Whole-process timings on a shared machine drift by 5-10% between runs, more
than the difference measured here. So both programs are compiled in one process
and their steps alternate, each timed under the same load. 'flax' is
``flax.linen.GroupNorm(use_fast_variance=False)``, the model's norm before
``mocosfl_jax/models/group_norm.py``; 'ours' is the package as it is.
Settings and formulation as ``benchmark.py`` (client formulation 'matmul').
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import flax.linen as nn
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmark  # noqa: E402
import results_file  # noqa: E402
from mocosfl_jax.models import resnet  # noqa: E402

VARIANTS = {
    'flax': lambda channels: nn.GroupNorm(num_groups=max(channels // 4, 1), epsilon=1e-5,
                                          use_fast_variance=False),
    'ours': resnet.group_norm,
}


def compare(setting: str, repeats: int) -> dict:
  programs = {}
  for name, norm in VARIANTS.items():
    resnet.group_norm = norm  # read when the model is traced, inside build()
    try:
      compiled, state, images, _ = benchmark.build(**benchmark.SETTINGS[setting], impl='matmul',
                                                   width=1.0, queue_size=6000)
    finally:
      resnet.group_norm = VARIANTS['ours']
    state, metrics = compiled(state, images, jax.random.key(2))  # warm-up
    jax.block_until_ready(metrics)
    programs[name] = [compiled, state, images]

  def step(program, i):
    compiled, state, images = program
    program[1], metrics = compiled(state, images, jax.random.key(3 + i))
    jax.block_until_ready((program[1], metrics))
  times = results_file.alternate(
      {name: functools.partial(step, program) for name, program in programs.items()}, repeats)
  medians = {name: statistics.median(t) for name, t in times.items()}
  return {'setting': setting, **benchmark.SETTINGS[setting], 'impl': 'matmul',
          'step_seconds_median': medians, 'step_seconds_all': times,
          'speedup': medians['flax'] / medians['ours']}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='JSON file to write')
  parser.add_argument('--settings', default='a,b', help='comma-separated subset of a,b,c')
  parser.add_argument('--repeats', type=int, default=4, help='timed steps per variant')
  args = parser.parse_args()
  results = results_file.new(backend=jax.default_backend(), jax_version=jax.__version__)
  for setting in args.settings.split(','):
    results_file.add_run(results, compare(setting, args.repeats), args.out)

if __name__ == '__main__':
  main()
