"""Several seeds of one config as one compiled program (issue 17, section 5).

    python -m experiments.sweep --config=configs/quickstart.py --seeds=4 [--rounds=N] \
        --out=experiments/results/sweep_cpu.json

What is swept is the whole seed: run s of a sweep of S runs is the single run
``python -m mocosfl_jax.main`` with ``--config.seed`` set to the config's seed
plus s, whose seed fixes the partition, the initialisation, the pool draws,
the data order and the augmentation (config.py). Every field of the SimState
gets a leading run axis, and the round is vmapped over (state, partition
table, round key); the images are one array that every run reads. The
programs are the single run's, vmapped: with ``round_impl`` 'scan' a round of
all runs is one program, with 'loop' (the CPU's default) each step of all
runs is.

The runs share one program, so their partitions must share one layout: table
width, steps per round, shuffles per round and batch multipliers. Every
partition here gives clients sizes that do not depend on the seed (IID,
shards and Dirichlet alike), so they do; a partition that did not would stop
the sweep with one line naming what differs.

Vmapped over runs, each server convolution becomes a grouped convolution
(``feature_group_count`` = S), XLA:CPU's slow path: on the CPU a sweep is
slower than its runs one after another (README, "Sweeps").

Only seeds: the learning rates are Python schedules that train.build closes
over, so a swept rate would need the engine to take a per-run scale as a
traced input (for example a factor in the SimState that the step multiplies
its schedules by).

The command times S separate runs (one after another, on the same compiled
programs) against the sweep, alternating them round by round so that both
run under the same load, and writes the gain, per-run final losses and kNN
accuracies to JSON. Errors a user can fix are one ``error:`` line.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import time
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from experiments import results_file
from mocosfl_jax import cli
from mocosfl_jax import config as config_lib
from mocosfl_jax import config_checks
from mocosfl_jax import train
from mocosfl_jax.config_checks import ConfigError
from mocosfl_jax.data import partition as partition_lib
from mocosfl_jax.data.sources import DataError
from mocosfl_jax.sfl import rounds

# The images are shared; each run has its own partition table.
DATA_AXES = rounds.ClientData(images=None, table=0, counts=0)


@dataclasses.dataclass
class Sweep:
  """A built sweep: the first seed's experiment, whose programs serve every run."""
  exp: train.Experiment
  seeds: tuple[int, ...]
  data: rounds.ClientData  # table and counts with a leading run axis
  run_round: Callable      # (states, data, keys) -> (states, metrics), all with a run axis

  def run_data(self, run: int) -> rounds.ClientData:
    """Run ``run``'s own ClientData, as its single run has it."""
    return self.data.replace(table=self.data.table[run], counts=self.data.counts[run])

  def init(self) -> tuple:
    """(states, round keys), each with a leading run axis, as train.run starts each seed.

    Each state is the single run's, from its own program (which a single run
    compiles too), stacked.
    """
    init_keys, round_keys = run_keys(self.seeds)
    states = [self.exp.init_state(key) for key in init_keys]
    return jax.tree.map(lambda *x: jnp.stack(x), *states), round_keys


def run_keys(seeds) -> tuple[jax.Array, jax.Array]:
  """(init keys, round keys) of each seed, split as train.run splits its seed."""
  keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s)))(jnp.asarray(seeds))
  return keys[:, 0], keys[:, 1]


def take(tree, run: int):
  """Run ``run``'s slice of a tree with a leading run axis."""
  return jax.tree.map(lambda x: x[run], tree)


def resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config that each run uses, checked as train.run checks it.

  A sweep runs on one device (``mesh.devices`` 0 becomes 1): its runs are
  vmapped in one program there, and on a mesh the training images would lie
  client by client in the first seed's partition (train.Experiment.client_data)
  rather than by sample id, as the other seeds' tables need them.

  Raises:
    ConfigError: a field that cannot work, an ``init.from_workdir``, or a
      ``mesh.devices`` above 1.
  """
  config_checks.validate(config)
  if config.init.from_workdir:
    raise ConfigError('init.from_workdir: a sweep starts each run from its own seed\'s '
                      'initialisation; leave init.from_workdir empty')
  if config.mesh.devices > 1:
    raise ConfigError(f'mesh.devices={config.mesh.devices}: a sweep runs on one device; '
                      'pass --config.mesh.devices=1')
  config = config_lib.resolved(config)  # a copy, which the next line may change
  config.mesh.devices = 1
  return config


def partition_for(exp: train.Experiment, seed: int) -> partition_lib.Partition:
  """The partition that train.build makes with ``seed``."""
  c, labels = exp.config, exp.train.labels
  if exp.aux is not None:
    return partition_lib.make_partition_with_aux(labels, exp.train.num_classes, c.num_clients,
                                                 c.noniid_ratio, c.data, seed, len(exp.aux))
  return partition_lib.make_partition(labels, exp.train.num_classes, c.num_clients,
                                      c.noniid_ratio, c.data, seed)


def layout(config, part: partition_lib.Partition) -> dict:
  """What the compiled round fixes of a partition: runs of one program must agree on it."""
  table, counts = partition_lib.padded(part.client_indices)
  steps = train.steps_per_round(config, counts, part.batch_multiplier)
  batches = config.batch_size * np.asarray(part.batch_multiplier)
  return {'table width': table.shape[1], 'steps per round': steps,
          'shuffles per round': rounds.passes_needed(counts, batches, steps),
          'batch multipliers': tuple(int(m) for m in part.batch_multiplier)}


def vmapped_round(exp: train.Experiment) -> Callable:
  """The single run's round over a leading run axis of the state, the data table and the key.

  Called outside a trace, the vmap batches each of the round's compiled
  programs, which keep their compiler options and donation: one program per
  round (scan) stays one, a round of steps dispatched from the host (loop)
  stays so.
  """
  return jax.vmap(exp.run_round, in_axes=(0, DATA_AXES, 0))


def build(config: ml_collections.ConfigDict, num_runs: int) -> Sweep:
  """The sweep of seeds ``config.seed`` to ``config.seed + num_runs - 1``.

  Raises:
    ConfigError: a field that cannot work, or seeds whose partitions differ in layout.
    DataError: missing or bad data.
  """
  config = resolved(config)
  seeds = tuple(config.seed + s for s in range(num_runs))
  exp = train.build(config)
  c = exp.config
  tables, counts = [], []
  for seed in seeds:
    part = exp.partition if seed == c.seed else partition_for(exp, seed)
    config_checks.validate(c, num_train_samples=len(exp.train),
                           samples_per_client=[len(ix) for ix in part.client_indices])
    first, this = layout(c, exp.partition), layout(c, part)
    differ = [name for name in first if first[name] != this[name]]
    if differ:
      raise ConfigError(
          f'seeds {seeds[0]} and {seed} partition the data with different '
          + ', '.join(f'{name} ({first[name]} and {this[name]})' for name in differ)
          + ': the runs of a sweep share one program; use a partition whose layout does not '
          'depend on the seed (data.partition, steps_per_round)')
    table, count = partition_lib.padded(part.client_indices)
    tables.append(table)
    counts.append(count)
  images = exp.client_data().images
  data = rounds.ClientData(images, jnp.asarray(np.stack(tables)), jnp.asarray(np.stack(counts)))
  return Sweep(exp, seeds, data, vmapped_round(exp))


# ---------------------------------------------------------------------------
# The command: S separate runs against one sweep
# ---------------------------------------------------------------------------

def _blocking(fun: Callable) -> Callable:
  @functools.wraps(fun)
  def wrapped(*args):
    out = fun(*args)
    jax.block_until_ready(out)
    return out
  return wrapped


def measure(sweep: Sweep, timed_rounds: int) -> dict:
  """Seconds per round of S separate runs and of the sweep, alternated round by round.

  Both start from the same states and take the same rounds, so run s of the
  sweep should hold what its separate run holds. The JSON records how far
  their losses are apart: float rounding (a vmapped program sums in another
  order) grows over the rounds of contrastive training to percents of the
  loss, as much as between the engine's own 'scan' and 'loop' rounds.
  """
  exp, num_runs = sweep.exp, len(sweep.seeds)
  states, keys = sweep.init()
  singles = [take(states, s) for s in range(num_runs)]
  single_data = [sweep.run_data(s) for s in range(num_runs)]
  single_losses, sweep_losses = [None] * num_runs, None
  one_round = _blocking(exp.run_round)
  many_rounds = _blocking(sweep.run_round)

  def separate(_):
    for s in range(num_runs):
      singles[s], metrics = one_round(singles[s], single_data[s], keys[s])
      single_losses[s] = metrics['loss']

  def together(_):
    nonlocal states, sweep_losses
    states, metrics = many_rounds(states, sweep.data, keys)
    sweep_losses = metrics['loss']

  # The first round of each compiles its programs.
  first = results_file.alternate({'separate': separate, 'sweep': together}, 1)
  times = results_file.alternate({'separate': separate, 'sweep': together}, timed_rounds)
  median = {name: statistics.median(t) for name, t in times.items()}
  steps = exp.steps_per_round * num_runs
  final_losses = np.asarray(sweep_losses).mean(axis=1)
  return {
      'first_round_seconds': {name: t[0] for name, t in first.items()},
      'round_seconds_median': median,
      'round_seconds_all': times,
      'run_steps_per_second': {name: steps / t for name, t in median.items()},
      'gain': median['separate'] / median['sweep'],
      'final_loss': [float(x) for x in final_losses],
      'max_loss_difference_to_separate_runs': float(np.max(np.abs(
          np.stack([np.asarray(l) for l in single_losses]) - np.asarray(sweep_losses)))),
      'knn_accuracy': knn_accuracies(sweep, states),
  }


def knn_accuracies(sweep: Sweep, states) -> list[float]:
  """Each run's kNN accuracy (%), as train.run monitors it."""
  exp = sweep.exp
  bank = exp.bank_images(sweep.data)
  test_images = jnp.asarray(exp.test.images)
  return [train.evaluate_knn(exp, take(states, s), bank, test_images)
          for s in range(len(sweep.seeds))]


def run(config: ml_collections.ConfigDict, num_runs: int, timed_rounds: int, out: str) -> dict:
  """Builds the sweep, times it against separate runs and writes ``out``."""
  load_before = os.getloadavg()
  tick = time.perf_counter()
  sweep = build(config, num_runs)
  c = sweep.exp.config
  results = results_file.new(backend=jax.default_backend(),
                             devices=[d.device_kind for d in jax.devices()],
                             jax_version=jax.__version__)
  measured = measure(sweep, timed_rounds)
  results_file.add_run(results, {
      'seeds': list(sweep.seeds), 'runs': num_runs, 'timed_rounds': timed_rounds,
      'steps_per_round': sweep.exp.steps_per_round, 'num_clients': c.num_clients,
      'pool_size': sweep.exp.pool_size, 'batch_size': c.batch_size, 'cut_layer': c.cut_layer,
      'width': c.model.width,
      'round_impl': train.resolve_round_impl(c.round_impl),
      'client_impl': sweep.exp.client_impl,
      **measured,
      'wall_seconds': time.perf_counter() - tick,
      # The machine may be shared: its load says how far to trust the times.
      'load_average_1_5_15_min': {'before': list(load_before), 'after': list(os.getloadavg())},
  }, out)
  return results


def define_flags(flag_values: flags.FlagValues, argv: list[str] | None = None) -> dict:
  """The command's flags in ``flag_values``; config_flags reads overrides from ``argv``."""
  return {
      'config': config_flags.DEFINE_config_file(
          'config', None, 'Experiment config file.', lock_config=True,
          flag_values=flag_values, sys_argv=argv),
      'seeds': flags.DEFINE_integer('seeds', 4, 'Runs in the sweep: seeds config.seed, '
                                    'config.seed + 1, ...', lower_bound=1,
                                    flag_values=flag_values),
      'rounds': flags.DEFINE_integer('rounds', 3, 'Timed rounds, after one that compiles.',
                                     lower_bound=1, flag_values=flag_values),
      'out': flags.DEFINE_string('out', None, 'JSON file to write.', flag_values=flag_values),
  }


def main(values: dict) -> None:
  """Runs the command; a mistake a user can fix is one ``error:`` line and exit status 1."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  out = values['out'].value
  try:
    cli.check_output_file(out, f'--out={out}')
    run(values['config'].value, values['seeds'].value, values['rounds'].value, out)
  except (cli.OutputPathError, ConfigError, DataError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  _FLAGS = define_flags(flags.FLAGS)
  flags.mark_flags_as_required(['config', 'out'])
  app.run(lambda argv: main(_FLAGS),
          flags_parser=functools.partial(cli.parse_flags, config_flag='config'))
