"""What bfloat16 storage of the clients' EMA models costs (moco.ema_dtype).

    python -m experiments.ema_dtype --out=experiments/results/ema_dtype_cpu.json

Trains the same short run with ``moco.ema_dtype`` float32 and bfloat16, one
seed after another (the two dtypes of a seed back to back, under the same
load), and records each run's kNN accuracy (initial, final, best), its wall
time, the load average at its start and its loss each round. Beside them: the bytes of one
client's state in each dtype (the run's model and full width at cuts 1-3),
and why the bfloat16 store rounds stochastically: the EMA of a weight whose
online value drifts steadily, kept 1,000 steps in bfloat16 with round to
nearest and with stochastic rounding, against float32.

``--source=digits`` (default: scikit-learn's digits, no download, 10 clients)
or ``--source=cifar10`` (the npz copy in ``--data``, configs/cifar10_cpu.py's
layout). kNN is taken at the start and the end only.
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import results_file
from mocosfl_jax import config as config_lib, config_checks, train
from mocosfl_jax.export import workdir as workdir_lib
from mocosfl_jax.sfl import state as state_lib

_OUT = flags.DEFINE_string('out', 'experiments/results/ema_dtype_cpu.json', 'JSON file to write.')
_SOURCE = flags.DEFINE_enum('source', 'digits', ['digits', 'cifar10'], 'Training data.')
_DATA = flags.DEFINE_string('data', '../shared/data/cifar10', 'Folder of CIFAR-10 npz files.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds 0 .. seeds - 1.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Training steps of each run.')
_WORKDIR_ROOT = flags.DEFINE_string('workdir_root', 'runs/ema_dtype', 'Run folders.')

STEPS_PER_ROUND = 50
DTYPES = ('float32', 'bfloat16')


def run_config(seed: int, ema_dtype: str):
  c = config_lib.default_config()
  fields = {'seed': seed, 'num_clients': 10, 'noniid_ratio': 0.2, 'batch_size': 10,
            'cut_layer': 1, 'steps_per_round': STEPS_PER_ROUND,
            'num_rounds': max(_STEPS.value // STEPS_PER_ROUND, 1), 'sync_every': 50,
            'model.width': 0.125, 'optim.lr': 0.03, 'moco.ema_dtype': ema_dtype,
            'eval.every': 10 ** 6, 'checkpoint.every': 10 ** 6}
  if _SOURCE.value == 'digits':
    fields.update({'data.source': 'digits', 'data.name': 'digits', 'moco.queue_size': 1024})
  else:
    fields.update({'data.source': 'npz', 'data.name': 'cifar10', 'data.path': _DATA.value,
                   'moco.queue_size': 4096})
  c.update_from_flattened_dict(fields)
  config_checks.validate(c)
  return c


def client_bytes(config) -> dict[str, int]:
  """One client's bytes in each per-client field of the SimState."""
  one = config.copy_and_resolve_references()
  one.num_clients = 1
  clients = jax.eval_shape(workdir_lib.init_state(one), jax.random.key(0)).clients
  size = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
  fields = {name: size(getattr(clients, name)) for name in ('online', 'ema', 'opt', 'steps')}
  return {**fields, 'total': sum(fields.values())}


def bytes_table(config) -> list[dict]:
  rows = []
  for cut, width in [(config.cut_layer, config.model.width), (1, 1.0), (2, 1.0), (3, 1.0)]:
    for dtype in DTYPES:
      c = config.copy_and_resolve_references()
      c.update_from_flattened_dict({'cut_layer': cut, 'model.width': width,
                                    'moco.ema_dtype': dtype})
      rows.append({'cut_layer': cut, 'width': width, 'ema_dtype': dtype, **client_bytes(c)})
  return rows


def drift_error(rate: float, steps: int = 1000, decay: float = 0.99) -> dict[str, float]:
  """Relative gap to the float32 EMA after ``steps`` steps of an online weight
  1 + rate * t (rate: its relative change a step), for each bfloat16 store."""
  online = 1.0 + rate * jnp.arange(1, steps + 1, dtype=jnp.float32)
  width = 4096  # stochastic rounding's result is a mean over independent weights

  def run(store):
    def body(ema, x):
      exact, stored = ema
      exact = decay * exact + (1 - decay) * x[0]
      stored = store(decay * stored.astype(jnp.float32) + (1 - decay) * x[0], x[1])
      return (exact, stored), None
    start = (jnp.ones(()), jnp.ones((width,), jnp.bfloat16))
    (exact, stored), _ = jax.lax.scan(body, start, (online, jax.random.split(
        jax.random.key(0), steps)))
    return float(jnp.mean(stored.astype(jnp.float32)) / exact - 1)

  return {'rate_per_step': rate,
          'nearest': run(lambda x, key: x.astype(jnp.bfloat16)),
          'stochastic': run(state_lib.stochastic_round_bf16)}


def round_losses(workdir: pathlib.Path) -> list[float]:
  """The run's loss each round (metrics.jsonl): kNN alone resolves little in a short run."""
  with open(workdir / 'metrics.jsonl') as f:
    return [r['loss'] for r in map(json.loads, f) if 'loss' in r]


def main(argv):
  del argv
  results = results_file.new(jax=jax.__version__, backend=jax.default_backend(),
                             source=_SOURCE.value, steps=_STEPS.value)
  base = run_config(0, 'float32')
  results['bytes_per_client'] = bytes_table(base)
  results['drift'] = [drift_error(rate) for rate in (1e-5, 1e-4, 1e-3)]
  results_file.write(results, _OUT.value)
  for seed in range(_SEEDS.value):
    for dtype in DTYPES:
      load = os.getloadavg()[0]
      tick = time.time()
      workdir = pathlib.Path(_WORKDIR_ROOT.value) / _SOURCE.value / f'{dtype}_seed{seed}'
      summary = train.run(run_config(seed, dtype), str(workdir), fresh=True)
      results_file.add_run(results, {
          'ema_dtype': dtype, 'seed': seed, 'load_average': load,
          'wall_seconds': time.time() - tick, 'round_losses': round_losses(workdir),
          **{k: summary[k] for k in ('initial_knn_accuracy', 'final_knn_accuracy',
                                     'best_knn_accuracy', 'steps')}}, _OUT.value)
    # After every seed: an interrupted script keeps the medians so far.
    results['median_final_knn'] = {
        dtype: statistics.median(r['final_knn_accuracy'] for r in results['runs']
                                 if r['ema_dtype'] == dtype) for dtype in DTYPES}
    results_file.write(results, _OUT.value)


if __name__ == '__main__':
  app.run(main)
