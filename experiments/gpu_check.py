"""The accelerator check: speed, compile times, memory, MFU and a short accuracy run, as JSON.

    experiments/gpu_check.sh OUT_DIR [FLAGS]        # installs carried wheels, then runs:
    python experiments/gpu_check.py --out-dir OUT_DIR [--tiny] [FLAGS]

Everything goes under OUT_DIR: ``gpu_check.json`` (the machine, the versions
and one record per measurement, rewritten after each so an interrupted check
keeps what it measured), ``accuracy/`` (the accuracy run's metrics.jsonl and
summary.json) and, from the shell wrapper, ``log.txt``. Sized for about 10
minutes on an H100-class GPU (an estimate: no GPU has run it yet). ``--tiny``
runs every section at toy sizes, a 1/16-width ResNet-10 (the test suite runs it
on the CPU), so the kit works the first time a GPU is there.

Sections (``--sections`` narrows them):

- ``benchmark``: experiments/benchmark.py's settings (a), (b), (c), each with
  every client formulation (vmap, map, matmul) in float32, and the settings
  of ``--bf16-settings`` again with model.dtype bfloat16: median step time,
  compile seconds, the program's device bytes (XLA's memory analysis), the
  device's peak bytes in use so far (None where the backend keeps no
  statistics, as on the CPU), FLOPs (XLA's cost analysis) and model FLOPs
  utilisation: the setting's vmap program's FLOPs (XLA counts a loop body
  once, which undercounts 'map') over the step time and the device's peak
  (PEAK_FLOPS: TF32 tensor-core peak for float32, which XLA uses for float32
  convolutions and dots on these GPUs by default; bfloat16 peak for bfloat16).
- ``rounds``: setting (a)'s round of train.py (1,000 clients, a pool of 100,
  50 steps) as one program (``scan``) and step by step (``loop``): the first
  round (compiling included) and the rounds after it.
- ``accuracy``: configs/cifar10_1000.py for ``--accuracy-steps`` server steps
  (50 a round) with the kNN monitor every ``--knn-every`` rounds; the record
  holds the kNN curve. The config reads CIFAR-10 through tfds, which the GPU
  image lacks: pass ``--data-source=cifar_python --data-path=DIR`` (or
  ``npz``) for a local copy. Without data the record says why and the other
  sections still run.

The accelerator programs carry none of the CPU workarounds: ``compilation.jit``
adds its XLA:CPU options and ``compilation.materialize`` its fusion boundaries
only when the backend is the CPU (the JSON's ``cpu_workarounds``).

Packages: jax, flax, optax, orbax-checkpoint, numpy, pillow and tqdm, which the
GPU image has, and ml-collections (the configs), which it lacks. Carry it as a
wheel: here, in the repository's root, ``pip download ml-collections --no-deps
-d .whl/`` (pure Python; its needs, absl-py and PyYAML, are in the image) and
carry ``.whl/`` (git ignores it); gpu_check.sh installs every ``.whl/*.whl``
into a temporary folder before it starts.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

REQUIRED = {'jax': 'jax', 'flax': 'flax', 'optax': 'optax', 'orbax': 'orbax-checkpoint',
            'ml_collections': 'ml-collections', 'numpy': 'numpy', 'PIL': 'pillow',
            'tqdm': 'tqdm'}

# Dense peak FLOP/s per device, by the first key that device_kind contains
# (NVIDIA's H100, H200 and A100 datasheets, the sparsity figures halved).
PEAK_FLOPS = {
    'H200 NVL': {'bfloat16': 835e12, 'float32': 418e12},
    'H200': {'bfloat16': 989e12, 'float32': 495e12},
    'H100 NVL': {'bfloat16': 835e12, 'float32': 418e12},
    'H100 PCIe': {'bfloat16': 756e12, 'float32': 378e12},
    'H100': {'bfloat16': 989e12, 'float32': 495e12},  # SXM
    'A100': {'bfloat16': 312e12, 'float32': 156e12},
}

# (clients, batch per client, cut layer) of benchmark.SETTINGS, shrunk for --tiny.
TINY_SETTINGS = {'a': dict(clients=4, batch=1, cut_layer=1),
                 'b': dict(clients=4, batch=1, cut_layer=2),
                 'c': dict(clients=2, batch=4, cut_layer=1)}
SIZES = {
    'full': dict(width=1.0, depth=18, queue_size=6000, repeats=20, round_clients=1000,
                 round_pool=100, round_steps=50, round_repeats=2, samples_per_client=50),
    'tiny': dict(width=0.0625, depth=10, queue_size=64, repeats=2, round_clients=8,
                 round_pool=4, round_steps=2, round_repeats=1, samples_per_client=4),
}
# The accuracy run at toy size: the test suite's tiny data and model.
TINY_ACCURACY = {
    'num_clients': 10, 'client_sample_ratio': 1.0, 'noniid_ratio': 0.2, 'batch_size': 2,
    'sync_every': 2, 'data.source': 'digits', 'data.name': 'digits', 'model.width': 0.0625,
    'model.depth': 10,
    'moco.version': 'smallV2', 'moco.queue_size': 64, 'eval.knn_k': 10,
}


def missing_packages() -> list[str]:
  return [pip_name for module, pip_name in REQUIRED.items()
          if importlib.util.find_spec(module) is None]


if __name__ == '__main__' and missing_packages():
  sys.exit(f'error: gpu_check needs {", ".join(missing_packages())}: carry the wheels '
           '(pip download NAME --no-deps -d .whl/) and run experiments/gpu_check.sh')

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402
import results_file  # noqa: E402
from mocosfl_jax import compilation, metrics as metrics_lib, train  # noqa: E402
from mocosfl_jax import config as config_lib  # noqa: E402
from mocosfl_jax.data import sources  # noqa: E402
from mocosfl_jax.sfl import rounds  # noqa: E402

SECTIONS = ('benchmark', 'rounds', 'accuracy')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The device's dense peak FLOP/s at ``dtype`` (PEAK_FLOPS), None if unknown."""
  for name, peaks in PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return peaks[dtype]
  return None


def device_peak_bytes() -> int | None:
  """Peak device bytes in use since the process started; None where unreported (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats['peak_bytes_in_use']) if 'peak_bytes_in_use' in stats else None


def utilisation(flops: float | None, seconds: float, dtype: str) -> float | None:
  """Model FLOPs utilisation: ``flops`` per ``seconds`` over the device's peak."""
  peak = peak_flops(jax.devices()[0].device_kind, dtype)
  if not flops or not peak:
    return None
  return flops / seconds / peak


def benchmark_runs(args, sizes: dict):
  """Yields one record per (setting, client formulation, dtype)."""
  settings = TINY_SETTINGS if args.tiny else benchmark.SETTINGS
  combos = [(s, i, 'float32') for s in args.settings.split(',') for i in args.impls.split(',')]
  combos += [(s, i, 'bfloat16') for s in args.bf16_settings.split(',') if s
             for i in args.impls.split(',')]
  model_flops = {}
  for name, impl, dtype in combos:
    run = benchmark.time_setting(**settings[name], impl=impl, width=sizes['width'],
                                 repeats=sizes['repeats'], queue_size=sizes['queue_size'],
                                 dtype=dtype, depth=sizes['depth'])
    if impl == 'vmap' or (name, dtype) not in model_flops:
      model_flops[name, dtype] = run['program_flops']
    flops = model_flops[name, dtype]
    yield {'section': 'benchmark', 'setting': name, **run, 'model_flops': flops,
           'mfu': utilisation(flops, run['step_seconds_median'], dtype),
           'device_peak_bytes': device_peak_bytes()}


def round_data(num_clients: int, per_client: int) -> rounds.ClientData:
  """Random images, ``per_client`` of them each client's own."""
  images = jax.random.randint(jax.random.key(1), (num_clients * per_client, 32, 32, 3), 0, 256,
                              jax.numpy.int32).astype(jax.numpy.uint8)
  table = np.arange(num_clients * per_client, dtype=np.int32).reshape(num_clients, per_client)
  return rounds.ClientData(images, jax.numpy.asarray(table),
                           jax.numpy.full((num_clients,), per_client, jax.numpy.int32))


def round_runs(args, sizes: dict):
  """Yields the record of setting (a)'s round as one program and as steps."""
  n, pool, steps = sizes['round_clients'], sizes['round_pool'], sizes['round_steps']
  data = round_data(n, sizes['samples_per_client'])
  client_net, server_net, tx, train_step = benchmark.make_step(1, args.round_client_impl,
                                                               width=sizes['width'],
                                                               depth=sizes['depth'])
  for impl in ('scan', 'loop'):
    run_round = rounds.make_round(
        train_step, num_clients=n, pool_size=pool, steps=steps, batch_size=1,
        sync_every=steps, one_program=impl == 'scan',
        passes=rounds.passes_needed(np.full(n, sizes['samples_per_client']), np.ones(n, int),
                                    steps))
    state = benchmark.init_state(client_net, server_net, tx, n, sizes['queue_size'])
    times = []
    for r in range(1 + sizes['round_repeats']):
      tick = time.perf_counter()
      state, metrics = run_round(state, data, jax.random.key(r))
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - tick)
    later = float(np.median(times[1:]))
    yield {'section': 'rounds', 'round_impl': impl, 'client_impl': args.round_client_impl,
           'clients': n, 'pool': pool, 'steps': steps, 'width': sizes['width'],
           'depth': sizes['depth'],
           'first_round_seconds': times[0], 'round_seconds_median': later,
           'step_seconds': later / steps, 'round_seconds_all': times[1:],
           'loss': float(np.asarray(metrics['loss'])[-1]), 'device_peak_bytes': device_peak_bytes()}


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('gpu_check_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def accuracy_config(args):
  """configs/cifar10_1000.py, resolved, cut to ``--accuracy-steps`` server steps."""
  c = config_lib.resolved(load_config(os.path.join(REPO, 'configs', 'cifar10_1000.py')))
  changes = dict(TINY_ACCURACY) if args.tiny else {}
  steps_per_round = 2 if args.tiny else 50
  if args.data_source:
    changes['data.source'] = args.data_source
  if args.data_path:
    changes['data.path'] = args.data_path
  changes.update({
      'steps_per_round': steps_per_round,
      'num_rounds': max(args.accuracy_steps // steps_per_round, 1),
      'eval.every': args.knn_every, 'eval.final_probes': False,
      'checkpoint.every': 10 ** 6, 'model.dtype': args.accuracy_dtype})
  c.update_from_flattened_dict(changes)
  return c


def data_problem(source: str) -> str:
  """Why ``source`` cannot load here ('' when it may): the GPU image has no tfds."""
  if source == 'tfds' and importlib.util.find_spec('tensorflow_datasets') is None:
    return ('tfds is not installed: pass --data-source=cifar_python --data-path=DIR '
            '(or npz) for a local copy of CIFAR-10')
  return ''


def accuracy_run(args, out_dir: str) -> dict:
  """The accuracy run's record: its kNN curve and throughput, or why it could not run."""
  config = accuracy_config(args)
  workdir = os.path.join(out_dir, 'accuracy')
  record = {'section': 'accuracy', 'config': 'configs/cifar10_1000.py',
            'data_source': config.data.source, 'dtype': config.model.dtype,
            'steps': config.num_rounds * config.steps_per_round, 'workdir': workdir}
  if data_problem(config.data.source):
    return {**record, 'error': data_problem(config.data.source)}
  try:
    summary = train.run(config, workdir, fresh=True)
  except sources.DataError as e:
    return {**record, 'error': str(e)}
  curve = [(r['step'], r['knn_accuracy']) for r in metrics_lib.read_metrics(workdir)
           if 'knn_accuracy' in r]
  keys = ('final_knn_accuracy', 'best_knn_accuracy', 'wall_seconds', 'steps_per_second',
          'images_per_second')
  return {**record, 'knn_curve': curve, **{k: summary.get(k) for k in keys},
          'device_peak_bytes': device_peak_bytes()}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out-dir', required=True, help='folder for every result')
  parser.add_argument('--tiny', action='store_true', help='toy sizes: seconds on a CPU')
  parser.add_argument('--sections', default=','.join(SECTIONS))
  parser.add_argument('--settings', default='a,b,c', help="benchmark settings in float32")
  parser.add_argument('--bf16-settings', default='a', help="settings again in bfloat16 ('' none)")
  parser.add_argument('--impls', default='vmap,map,matmul', help='client formulations')
  parser.add_argument('--round-client-impl', default='matmul',
                      help="the rounds' client formulation (train.py's 'auto')")
  parser.add_argument('--accuracy-steps', type=int, default=2000)
  parser.add_argument('--knn-every', type=int, default=4, help='rounds between kNN evaluations')
  parser.add_argument('--accuracy-dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--data-source', default='', help='overrides the config (tfds)')
  parser.add_argument('--data-path', default='')
  return parser.parse_args(argv)


def main(argv=None) -> str:
  """Runs the check; returns the JSON file's path."""
  args = parse_args(argv)
  unknown = set(args.sections.split(',')) - set(SECTIONS)
  if unknown:
    sys.exit(f'error: --sections: no section {", ".join(sorted(unknown))}; '
             f'choose from {", ".join(SECTIONS)}')
  sizes = SIZES['tiny' if args.tiny else 'full']
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir, 'gpu_check.json')
  device = jax.devices()[0]
  results = results_file.new(
      mode='tiny' if args.tiny else 'full', backend=jax.default_backend(),
      devices=[d.device_kind for d in jax.devices()], jax_version=jax.__version__,
      peak_flops=PEAK_FLOPS.get(next((k for k in PEAK_FLOPS if k.lower() in
                                      device.device_kind.lower()), ''), None),
      cpu_workarounds=compilation.compiler_options() is not None, sizes=sizes)
  sections = args.sections.split(',')
  if 'benchmark' in sections:
    for run in benchmark_runs(args, sizes):
      results_file.add_run(results, run, path)
  if 'rounds' in sections:
    for run in round_runs(args, sizes):
      results_file.add_run(results, run, path)
  if 'accuracy' in sections:
    results_file.add_run(results, accuracy_run(args, args.out_dir), path)
  results['device_peak_bytes'] = device_peak_bytes()
  with open(path, 'w') as f:
    json.dump(results, f, indent=2)
  return path


if __name__ == '__main__':
  main()
