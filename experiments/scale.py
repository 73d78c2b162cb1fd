"""Step time and memory against the pool size and the population, as JSON and a plot
(issue 17, section 3).

    python experiments/scale.py --out experiments/results/scale_cpu.json [--width 0.0625]

For each population N (--populations) and pool size P (--pools, those <= N):
setting (a)'s round (batch 1, cut 1, V2 head) of N clients, P of them a
step, --steps steps a round, with train.py's round formulation for the
backend ('loop' on the CPU, 'scan' elsewhere) and client formulation
('matmul'); the N clients share --samples images (CIFAR-10's 50,000 by
default), iid. Each record holds the step time (the median over --rounds
rounds after the one that compiles, over --steps: the pool's gather and
scatter included), the load average, the bytes of the whole state and of one
client's share of it, the data table's bytes on the device (the (N, samples/N)
int32 id table and the counts; the images besides), the device's peak bytes in
use (None where the backend keeps no statistics, as on the CPU) and the
process's peak resident memory. --plot (default: --out with .png) draws the
step time against the pool size, one line per population.

Besides the runs:

* ``per_client_bytes``: one client's share of the state (online and EMA
  models, optimiser, step count; the MoCo queue is not per client) at every cut
  layer, at full width and at --width, field by field, from shapes alone;
  ``bytes_bfloat16_ema`` is the share with ``moco.ema_dtype=bfloat16``.
* ``host_table_bytes``: the host memory that the partition of --samples ids
  over N clients keeps while a run lasts (train.py holds it), measured with
  tracemalloc while it is built.
* ``round_memory``: XLA's memory analysis of the whole round as one program
  (the 'scan' formulation that accelerators run) at full width, at every cut,
  for the first population and pools 10 and 100 (--memory-pools), compiled
  for this backend, not run: its arguments (state and data), temporaries (the
  pool's rows and activations) and outputs. The temporaries' growth from one
  pool to the next is what one more active client costs.
* ``limits``: from those, per cut at full width, how many clients' state fit
  beside a pool of 10, 100 and 1,000, and how large a pool fits beside 1,000
  and 10,000 clients, in 24 GB (the 2-core CPU box), 80 GB and 141 GB.

--pools '' leaves out the timed runs, --memory-pools '' the compiled programs.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402
import gpu_check  # noqa: E402
import results_file  # noqa: E402
from mocosfl_jax import train  # noqa: E402
from mocosfl_jax.data import partition  # noqa: E402
from mocosfl_jax.sfl import rounds, state as state_lib  # noqa: E402

# Memory of the machines the issue asks about: the CPU box's RAM, the GPUs' HBM.
MACHINES = {'cpu_24gb': 24e9, 'gpu_80gb': 80e9, 'gpu_141gb': 141e9}
CUTS = (1, 2, 3)


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def state_shapes(cut_layer: int, width: float, clients: int, queue_size: int,
                 ema_dtype: str = 'float32'):
  """The SimState's shapes for ``clients`` clients (nothing is allocated)."""
  client_net, server_net, tx, _ = benchmark.make_step(cut_layer, 'matmul', width=width)
  return jax.eval_shape(lambda key: state_lib.init_state(
      key, client_net, server_net, tx, tx, num_clients=clients, image_size=32,
      queue_size=queue_size, feature_sharing=True, ema_dtype=ema_dtype), jax.random.key(0))


def client_share_bytes(cut_layer: int, width: float, queue_size: int, clients: int = 2,
                       ema_dtype: str = 'float32') -> int:
  """Bytes that each client adds to the state (its rows of every per-client field)."""
  shapes = [state_shapes(cut_layer, width, n, queue_size, ema_dtype)
            for n in (clients, 2 * clients)]
  return (tree_bytes(shapes[1]) - tree_bytes(shapes[0])) // clients


def client_fields_bytes(cut_layer: int, width: float) -> dict[str, int]:
  """One client's bytes in each per-client field (every such field has a leading client axis)."""
  clients = state_shapes(cut_layer, width, 1, queue_size=64).clients
  return {name: tree_bytes(getattr(clients, name)) for name in ('online', 'ema', 'opt', 'steps')}


def per_client_bytes(width: float, queue_size: int) -> list[dict]:
  return [{'cut_layer': cut, 'width': w, 'bytes': client_share_bytes(cut, w, queue_size),
           'bytes_bfloat16_ema': client_share_bytes(cut, w, queue_size, ema_dtype='bfloat16'),
           **client_fields_bytes(cut, w)}
          for cut in CUTS for w in sorted({1.0, width})]


def host_table_bytes(population: int, samples: int) -> int:
  """Host bytes that the partition of ``samples`` ids over ``population`` clients keeps."""
  labels = np.arange(samples) % 10
  data_config = ml_collections.ConfigDict({'partition': 'iid', 'data_proportion': 1.0,
                                           'hetero': '', 'dirichlet_alpha': 0.5})
  tracemalloc.start()
  try:
    # Held in a name, so that what it keeps is still allocated when counted.
    part = partition.make_partition(labels, 10, population, 1.0, data_config, seed=0)
    kept, _ = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert part.num_clients == population
  return kept


def round_data_shapes(population: int, samples: int) -> rounds.ClientData:
  per_client = samples // population
  shape = jax.ShapeDtypeStruct
  return rounds.ClientData(shape((population * per_client, 32, 32, 3), np.uint8),
                           shape((population, per_client), np.int32),
                           shape((population,), np.int32))


def round_memory(cut_layer: int, width: float, population: int, pool: int, steps: int,
                 samples: int, queue_size: int) -> dict:
  """XLA's memory analysis of the round as one program (compiled, not run)."""
  client_net, server_net, tx, train_step = benchmark.make_step(cut_layer, 'matmul', width=width)
  per_client = samples // population
  run_round = rounds.make_round(
      train_step, num_clients=population, pool_size=pool, steps=steps, batch_size=1,
      sync_every=steps, one_program=True,
      passes=rounds.passes_needed(np.full(population, per_client), np.ones(population, int),
                                  steps))
  state = state_shapes(cut_layer, width, population, queue_size)
  tick = time.perf_counter()
  analysis = run_round.lower(state, round_data_shapes(population, samples),
                             jax.random.key(0)).compile().memory_analysis()
  fields = ('argument', 'output', 'alias', 'temp')
  sizes = {f'{f}_bytes': int(getattr(analysis, f'{f}_size_in_bytes')) for f in fields}
  # The donated state's buffers are the outputs' (alias): what the program
  # holds at once is its arguments, its temporaries and its unaliased outputs.
  total = sizes['argument_bytes'] + sizes['temp_bytes'] + sizes['output_bytes'] \
      - sizes['alias_bytes']
  return {'cut_layer': cut_layer, 'width': width, 'population': population, 'pool': pool,
          **sizes, 'total_bytes': total, 'state_bytes': tree_bytes(state),
          'compile_seconds': time.perf_counter() - tick}


def per_active_client_bytes(memory: list[dict], cut_layer: int) -> float:
  """Temporaries' growth per pool client between the smallest and largest pool at a cut."""
  rows = sorted((m for m in memory if m['cut_layer'] == cut_layer), key=lambda m: m['pool'])
  first, last = rows[0], rows[-1]
  return (last['temp_bytes'] - first['temp_bytes']) / (last['pool'] - first['pool'])


def clients_that_fit(budget: float, fixed: float, share: float, active: float,
                     pool: int) -> int:
  """The most clients whose state fits in ``budget`` beside a pool of ``pool`` clients."""
  return max(int((budget - fixed - pool * active) // share), 0)


def pool_that_fits(budget: float, fixed: float, share: float, active: float,
                   population: int) -> int:
  """The largest pool whose rows and activations fit in ``budget`` beside ``population``."""
  return max(int((budget - fixed - population * share) // active), 0)


def limits(memory: list[dict], shares: list[dict], populations=(1_000, 10_000),
           pools=(10, 100, 1_000)) -> list[dict]:
  """Per cut at full width: fixed, per-client and per-active-client bytes, and what fits where.

  Fixed bytes are the smallest program's total less its clients' and pool's
  shares: the server models, the queue, the images and the program's own.
  """
  out = []
  for cut in CUTS:
    rows = [m for m in memory if m['cut_layer'] == cut]
    if len(rows) < 2:
      continue
    share = next(s['bytes'] for s in shares if s['cut_layer'] == cut and s['width'] == 1.0)
    active = per_active_client_bytes(memory, cut)
    smallest = min(rows, key=lambda m: m['pool'])
    fixed = smallest['total_bytes'] - smallest['population'] * share - smallest['pool'] * active
    out.append({
        'cut_layer': cut, 'width': 1.0, 'client_share_bytes': share,
        'per_active_client_bytes': active, 'fixed_bytes': fixed,
        'clients_that_fit': {name: {str(p): clients_that_fit(budget, fixed, share, active, p)
                                    for p in pools} for name, budget in MACHINES.items()},
        'pool_that_fits': {name: {str(n): pool_that_fits(budget, fixed, share, active, n)
                                  for n in populations} for name, budget in MACHINES.items()}})
  return out


def scale_run(population: int, pool: int, args) -> dict:
  """The record of one (population, pool size)."""
  client_net, server_net, tx, train_step = benchmark.make_step(1, 'matmul', width=args.width)
  per_client = args.samples // population
  data = gpu_check.round_data(population, per_client)
  round_impl = train.resolve_round_impl('auto')
  run_round = rounds.make_round(
      train_step, num_clients=population, pool_size=pool, steps=args.steps, batch_size=1,
      sync_every=args.steps, one_program=round_impl == 'scan',
      passes=rounds.passes_needed(np.full(population, per_client),
                                  np.ones(population, int), args.steps))
  state = benchmark.init_state(client_net, server_net, tx, population, args.queue_size)
  state_bytes = tree_bytes(state)
  load_before = os.getloadavg()
  times = []
  for r in range(1 + args.rounds):
    tick = time.perf_counter()
    state, metrics = run_round(state, data, jax.random.key(r))
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - tick)
  step_seconds = float(np.median(times[1:])) / args.steps
  return {
      'population': population, 'pool': pool, 'steps': args.steps, 'width': args.width,
      'round_impl': round_impl, 'step_seconds': step_seconds,
      'first_round_seconds': times[0], 'round_seconds_all': times[1:],
      'load_average_before': load_before, 'load_average_after': os.getloadavg(),
      'state_bytes': state_bytes, 'client_state_bytes': tree_bytes(state.clients) // population,
      'table_bytes': int(data.table.nbytes + data.counts.nbytes),
      'images_bytes': int(data.images.nbytes), 'device_peak_bytes': gpu_check.device_peak_bytes(),
      'process_peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      'loss': float(np.asarray(metrics['loss'])[-1]),
  }


def plot_figure(results: dict):
  """Step time against the pool size, one line per population."""
  # The object-oriented Figure API renders through Agg without pyplot (as mocosfl_jax.plot).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import NullFormatter  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(6, 4.5), layout='constrained')
  ax = figure.subplots()
  runs = results['runs']
  for index, population in enumerate(sorted({r['population'] for r in runs})):
    rows = sorted((r for r in runs if r['population'] == population), key=lambda r: r['pool'])
    ax.plot([r['pool'] for r in rows], [r['step_seconds'] for r in rows], color=f'C{index}',
            marker='o', label=f'{population:,} clients')
  ax.set_xscale('log')
  ax.set_yscale('log')
  pools = sorted({r['pool'] for r in runs})
  ax.set_xticks(pools, [f'{p:,}' for p in pools])
  ax.xaxis.set_minor_formatter(NullFormatter())
  ax.set_xlabel('active clients a step (pool size)')
  ax.set_ylabel('seconds a step')
  width = runs[0]['width'] if runs else None
  ax.set_title(f'Step time vs active clients ({results["backend"]}, width {width})')
  ax.grid(True, which='both', alpha=0.3)
  if runs:
    ax.legend(frameon=False)
  return figure


def write_plot(results: dict, path: str) -> str:
  """:func:`plot_figure` into the PNG ``path``."""
  plot_figure(results).savefig(path, dpi=100)
  return path


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='JSON file to write')
  parser.add_argument('--plot', help='PNG file to write (default: --out with .png)')
  parser.add_argument('--populations', default='1000,10000')
  parser.add_argument('--pools', default='10,100,1000', help='"" times nothing')
  parser.add_argument('--width', type=float, default=0.0625)
  parser.add_argument('--steps', type=int, default=2, help='steps a round')
  parser.add_argument('--rounds', type=int, default=2, help='timed rounds after the first')
  parser.add_argument('--samples', type=int, default=50_000,
                      help='images the population shares (CIFAR-10 has 50,000)')
  parser.add_argument('--queue-size', type=int, default=6000)
  parser.add_argument('--memory-pools', default='10,100',
                      help='pools of the full-width memory analysis ("" skips it)')
  return parser.parse_args(argv)


def round_memory_section(args, population: int, shares: list[dict]) -> dict:
  """round_memory and limits at full width; empty when --memory-pools is."""
  pools = [int(p) for p in args.memory_pools.split(',') if p]
  if not pools:
    return {}
  memory = [round_memory(cut, 1.0, population, pool, args.steps, args.samples, args.queue_size)
            for cut in CUTS for pool in pools]
  return {'round_memory': memory, 'limits': limits(memory, shares)}


def main(argv=None) -> dict:
  args = parse_args(argv)
  populations = [int(n) for n in args.populations.split(',')]
  results = results_file.new(
      backend=jax.default_backend(), devices=[d.device_kind for d in jax.devices()],
      jax_version=jax.__version__, load_average_at_start=os.getloadavg(),
      per_client_bytes=per_client_bytes(args.width, args.queue_size),
      host_table_bytes={str(n): host_table_bytes(n, args.samples) for n in populations})
  for population in populations:
    for pool in [int(p) for p in args.pools.split(',') if p]:
      if pool <= population:
        results_file.add_run(results, scale_run(population, pool, args), args.out)
  # After the timings: compiling at full width only adds to the run's length.
  results.update(round_memory_section(args, populations[0], results['per_client_bytes']))
  results_file.write(results, args.out)
  if results['runs']:
    write_plot(results, args.plot or os.path.splitext(args.out)[0] + '.png')
  return results


if __name__ == '__main__':
  main()
