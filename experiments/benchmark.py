"""Times the compiled MocoSFL training step and writes JSON.

    python experiments/benchmark.py --out experiments/results/benchmark_cpu.json

Settings (issue 2, section 8): (a) the paper's 100 clients x batch 1 at cut 1,
(b) the same at cut 2, (c) 5 clients x batch 20 at cut 1; full-width ResNet-18,
V2 head, queue 6000. Every setting is timed with each client formulation
('vmap': grouped convs, 'map': a native conv per client in a device loop,
'matmul': convs as patches x per-client matrices under vmap) unless --impls
narrows it. Reports the median of --repeats timed steps after compilation;
one step includes the on-device augmentation of 2 x n x B images.
"""
from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import results_file  # noqa: E402
from mocosfl_jax import compilation  # noqa: E402
from mocosfl_jax.data import augment, sources  # noqa: E402
from mocosfl_jax.models import split  # noqa: E402
from mocosfl_jax.sfl import optim, state as state_lib, step as step_lib  # noqa: E402

SETTINGS = {
    'a': dict(clients=100, batch=1, cut_layer=1),
    'b': dict(clients=100, batch=1, cut_layer=2),
    'c': dict(clients=5, batch=20, cut_layer=1),
}


def peak_memory_bytes() -> int | None:
  """Accelerator peak if the backend reports it, else the process's peak RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use'])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_flops(compiled) -> float | None:
  """FLOPs of one run of a compiled program by XLA's cost analysis, None if it gives none.

  XLA counts a loop's body once, so a program that loops over clients ('map')
  reports one client's convolutions; the others give the whole step.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # not every backend implements it  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops is not None and flops > 0 else None


def program_memory_bytes(compiled) -> int | None:
  """Device bytes of one compiled program: arguments, outputs and temporaries."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def make_step(cut_layer: int, impl: str, *, width: float, dtype: str = 'float32',
              depth: int = 18):
  """(client net, server net, optimiser, uncompiled train step) of a setting."""
  client_net = split.ClientNet(cut_layer, width, as_matmul=impl == 'matmul', dtype=dtype,
                               depth=depth)
  server_net = split.ServerNet(cut_layer, width, 'V2', dtype=dtype, depth=depth)
  tx = optim.sgd(0.9, 5e-4)
  mean, std = sources.normalization('cifar10')
  train_step = step_lib.make_train_step(
      client_net, server_net, tx, tx, augment.make_pair_augment('mocov2', mean, std, 32),
      temperature=0.1, ema_decay=0.99, client_impl='map' if impl == 'map' else 'vmap',
      server_lr=optim.cosine_per_epoch(0.06, 200),
      client_lr=lambda steps, rnd: optim.reference_client_cosine(0.06, 200)(steps))
  return client_net, server_net, tx, train_step


def init_state(client_net, server_net, tx, clients: int, queue_size: int):
  """The first state, compiled: op by op, initialisation takes longer than compiling it."""
  init = functools.partial(state_lib.init_state, client_net=client_net, server_net=server_net,
                           server_tx=tx, client_tx=tx, num_clients=clients, image_size=32,
                           queue_size=queue_size, feature_sharing=True)
  return jax.jit(init)(jax.random.key(0))


def build(clients: int, batch: int, cut_layer: int, impl: str, *, width: float,
          queue_size: int, dtype: str = 'float32', depth: int = 18):
  """The compiled step of a setting, its first state and images, and the compile seconds."""
  client_net, server_net, tx, train_step = make_step(cut_layer, impl, width=width, dtype=dtype,
                                                     depth=depth)
  state = init_state(client_net, server_net, tx, clients, queue_size)
  images = jax.random.randint(jax.random.key(1), (clients, batch, 32, 32, 3), 0, 256,
                              jnp.int32).astype(jnp.uint8)
  step = compilation.jit(train_step, donate_argnums=0)
  tick = time.perf_counter()
  compiled = step.lower(state, images, jax.random.key(2)).compile()
  compile_s = time.perf_counter() - tick
  return compiled, state, images, compile_s


def time_setting(clients: int, batch: int, cut_layer: int, impl: str, *, width: float,
                 repeats: int, queue_size: int, dtype: str = 'float32', depth: int = 18) -> dict:
  compiled, state, images, compile_s = build(clients, batch, cut_layer, impl, width=width,
                                             queue_size=queue_size, dtype=dtype, depth=depth)
  state, metrics = compiled(state, images, jax.random.key(2))  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for i in range(repeats):
    tick = time.perf_counter()
    state, metrics = compiled(state, images, jax.random.key(3 + i))
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - tick)
  median = statistics.median(times)
  images_per_step = 2 * clients * batch
  return {
      'clients': clients, 'batch_per_client': batch, 'cut_layer': cut_layer, 'impl': impl,
      'width': width, 'depth': depth, 'dtype': dtype, 'step_seconds_median': median,
      'step_seconds_all': times,
      'steps_per_second': 1.0 / median, 'images_per_second': images_per_step / median,
      'images_per_step': images_per_step, 'compile_seconds': compile_s,
      'peak_memory_bytes': peak_memory_bytes(), 'loss': float(metrics['loss']),
      'program_flops': step_flops(compiled),
      'program_memory_bytes': program_memory_bytes(compiled),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='JSON file to write')
  parser.add_argument('--settings', default='a,b,c', help='comma-separated subset of a,b,c')
  parser.add_argument('--impls', default='vmap,map,matmul', help='client formulations to time')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--queue-size', type=int, default=6000)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='of activations and convolutions (model.dtype)')
  args = parser.parse_args()
  results = results_file.new(backend=jax.default_backend(),
                             devices=[d.device_kind for d in jax.devices()],
                             jax_version=jax.__version__)
  for name in args.settings.split(','):
    for impl in args.impls.split(','):
      run = time_setting(**SETTINGS[name], impl=impl, width=args.width, repeats=args.repeats,
                         queue_size=args.queue_size, dtype=args.dtype)
      results_file.add_run(results, {**run, 'setting': name}, args.out)

if __name__ == '__main__':
  main()
