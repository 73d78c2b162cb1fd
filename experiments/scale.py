"""Step time and memory against the pool size and the population, as JSON (issue 17, section 3).

    python experiments/scale.py --out experiments/results/scale_cpu.json [--width 0.0625]

For each population N (--populations) and pool size P (--pools, those <= N):
setting (a)'s round (batch 1, cut 1, V2 head) of N clients, P of them a
step, --steps steps a round, with train.py's round formulation for the
backend ('loop' on the CPU, 'scan' elsewhere) and client formulation
('matmul'). Each record holds the step time (median over --rounds rounds
after the one that compiles), the bytes of the whole state and of one
client's share of it (online and EMA models, optimiser, step count and
queue), the data table's bytes (N clients x --samples-per-client ids, the
images besides), the device's peak bytes in use (None where the backend keeps
no statistics, as on the CPU) and the process's peak resident memory.

``per_client_bytes`` adds one client's share at every cut layer at full width
and at --width (from shapes alone: nothing runs), the figure that sets how
many clients a device holds.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402
import gpu_check  # noqa: E402
import results_file  # noqa: E402
from mocosfl_jax import train  # noqa: E402
from mocosfl_jax.sfl import rounds, state as state_lib  # noqa: E402


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def client_share_bytes(cut_layer: int, width: float, queue_size: int, clients: int = 2) -> int:
  """Bytes that each client adds to the state (its rows of every per-client field)."""
  client_net, server_net, tx, _ = benchmark.make_step(cut_layer, 'matmul', width=width)
  shapes = [jax.eval_shape(lambda key, n=n: state_lib.init_state(
      key, client_net, server_net, tx, tx, num_clients=n, image_size=32, queue_size=queue_size,
      feature_sharing=True), jax.random.key(0)) for n in (clients, 2 * clients)]
  return (tree_bytes(shapes[1]) - tree_bytes(shapes[0])) // clients


def per_client_bytes(width: float, queue_size: int) -> list[dict]:
  return [{'cut_layer': cut, 'width': w, 'bytes': client_share_bytes(cut, w, queue_size)}
          for cut in (1, 2, 3) for w in sorted({1.0, width})]


def scale_run(population: int, pool: int, args) -> dict:
  """The record of one (population, pool size)."""
  client_net, server_net, tx, train_step = benchmark.make_step(1, 'matmul', width=args.width)
  data = gpu_check.round_data(population, args.samples_per_client)
  round_impl = train.resolve_round_impl('auto')
  run_round = rounds.make_round(
      train_step, num_clients=population, pool_size=pool, steps=args.steps, batch_size=1,
      sync_every=args.steps, one_program=round_impl == 'scan',
      passes=rounds.passes_needed(np.full(population, args.samples_per_client),
                                  np.ones(population, int), args.steps))
  state = benchmark.init_state(client_net, server_net, tx, population, args.queue_size)
  state_bytes = tree_bytes(state)
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
      'state_bytes': state_bytes, 'client_state_bytes': tree_bytes(state.clients) // population,
      'table_bytes': int(data.table.nbytes + data.counts.nbytes),
      'images_bytes': int(data.images.nbytes), 'device_peak_bytes': gpu_check.device_peak_bytes(),
      'process_peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      'loss': float(np.asarray(metrics['loss'])[-1]),
  }


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='JSON file to write')
  parser.add_argument('--populations', default='1000,10000')
  parser.add_argument('--pools', default='10,100,1000')
  parser.add_argument('--width', type=float, default=0.0625)
  parser.add_argument('--steps', type=int, default=2, help='steps a round')
  parser.add_argument('--rounds', type=int, default=2, help='timed rounds after the first')
  parser.add_argument('--samples-per-client', type=int, default=5)
  parser.add_argument('--queue-size', type=int, default=6000)
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  results = results_file.new(backend=jax.default_backend(),
                             devices=[d.device_kind for d in jax.devices()],
                             jax_version=jax.__version__,
                             per_client_bytes=per_client_bytes(args.width, args.queue_size))
  for population in map(int, args.populations.split(',')):
    for pool in map(int, args.pools.split(',')):
      if pool <= population:
        results_file.add_run(results, scale_run(population, pool, args), args.out)
  return results


if __name__ == '__main__':
  main()
