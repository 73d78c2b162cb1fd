"""What one client sends, receives, computes and holds in a MocoSFL run (spec 7.1, 9.25).

    python -m mocosfl_jax.overhead --config=configs/cifar10_1000.py --config.cut_layer=2

prints one table for the config (the data set is loaded to size the clients'
shares, nothing trains). A run says the same at its start and in
``summary.json`` under ``run`` (:func:`per_client`).

Two accountings side by side:

* explicit, per direction: each step a client is in the pool it uploads the
  smashed data of both views (the query and the EMA model's key) and
  downloads the query's gradient; at each FedAvg it uploads its model and
  downloads the average (and its EMA model both ways with
  ``fedavg.average_ema``). Frozen clients (TAResSFL, ``optim.client_lr`` 0)
  upload the smashed data only: no gradient comes back, no weights move.
* the reference's ``overhead_calculator.py`` (the paper's Table 1): weights
  counted once per sync, latent vectors as 2 smashed tensors per image, and
  with TAResSFL no weights and half the latent vectors (spec 9.25 on why that
  undercounts).

Client FLOPs per image come from XLA's cost analysis of the compiled client
forward and backward (2 FLOPs per multiply-add, padding taps skipped), beside
the reference's fvcore count (1 per multiply-add, GroupNorm 5 per element) in
its formula: 3 forwards per image, 1 for TAResSFL. Memory is the client's
parameters, optimiser state, gradients, images and smashed data counted, plus
the activations of the compiled forward and backward at the run's batch from
XLA's memory analysis.
Both use native convolutions, as a device runs the client, whatever
``model.client_impl`` the simulation uses. "MB" is 2^20 bytes and "M"/"G"
FLOPs 2^20/2^30, as in the reference.
"""
from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from jax.extend import core as jax_core
from ml_collections import config_flags

from mocosfl_jax import config as config_lib
from mocosfl_jax import config_checks
from mocosfl_jax.compilation import without_boundaries
from mocosfl_jax.data import partition, sources
from mocosfl_jax.models import group_norm, split
from mocosfl_jax.sfl import optim

BYTES_PER_FLOAT = 4
MB = 2 ** 20
# Programs that are analysed, never run: on CPU they compile 2-4x faster
# with the same FLOPs and buffers.
_CPU_ANALYSIS_OPTIONS = {'xla_backend_optimization_level': 0,
                         'xla_llvm_disable_expensive_passes': True}


def frozen_clients(config) -> bool:
  """The clients' learning rate is 0 (TAResSFL's frozen clients, spec 6.4)."""
  return optim.frozen_clients(config.optim)


def communication_per_client(*, rounds: int, pool_size: int, num_clients: int,
                             steps_per_round: int, batch_size: int, smashed_floats: int,
                             client_params: int, sync_every: int, frozen: bool = False,
                             average_ema: bool = False) -> dict:
  """Expected megabytes one client sends and receives, per step, per sync and per run.

  A client is in ``rounds * pool_size / num_clients`` rounds on average, each
  of ``steps_per_round`` steps and ``ceil(steps_per_round / sync_every)``
  FedAvgs. ``paper_formula`` is the reference's overhead_calculator with its
  epochs = the rounds a client is in, its data per client = a round's images.
  """
  rounds_in_pool = rounds * pool_size / num_clients
  steps = rounds_in_pool * steps_per_round
  syncs = rounds_in_pool * -(-steps_per_round // sync_every)
  smashed_mb = batch_size * smashed_floats * BYTES_PER_FLOAT / MB
  models = 0 if frozen else 2 if average_ema else 1
  weights_mb = models * client_params * BYTES_PER_FLOAT / MB
  per_step = {'smashed_up_mb': 2 * smashed_mb, 'gradients_down_mb': 0.0 if frozen else smashed_mb}
  per_sync = {'weights_up_mb': weights_mb, 'weights_down_mb': weights_mb}
  per_run = {'smashed_up_mb': steps * per_step['smashed_up_mb'],
             'gradients_down_mb': steps * per_step['gradients_down_mb'],
             'weights_up_mb': syncs * weights_mb, 'weights_down_mb': syncs * weights_mb}
  up = per_run['smashed_up_mb'] + per_run['weights_up_mb']
  down = per_run['gradients_down_mb'] + per_run['weights_down_mb']
  return {'upload_mb': up, 'download_mb': down, 'total_mb': up + down,
          'rounds_in_pool': rounds_in_pool, 'steps_in_pool': steps, 'syncs': syncs,
          'images_in_pool': steps * batch_size,
          'per_step': per_step, 'per_sync': per_sync, 'per_run': per_run,
          'paper_formula': paper_communication(
              images=steps * batch_size, syncs=syncs, smashed_floats=smashed_floats,
              client_params=client_params, frozen=frozen)}


def paper_communication(*, images: float, syncs: float, smashed_floats: int,
                        client_params: int, frozen: bool) -> dict:
  """overhead_calculator.py's megabytes: weights once per sync, 2 smashed tensors an image.

  With TAResSFL no weights and half the latent vectors (spec 7.1, 9.25).
  """
  weights = 0.0 if frozen else syncs * client_params * BYTES_PER_FLOAT / MB
  latent = (1 if frozen else 2) * images * smashed_floats * BYTES_PER_FLOAT / MB
  return {'weights_mb': weights, 'latent_mb': latent, 'total_mb': weights + latent}


# ---------------------------------------------------------------------------
# Compute and memory
# ---------------------------------------------------------------------------

def _native(client_net: split.ClientNet) -> split.ClientNet:
  return client_net.clone(as_matmul=False, parent=None)


def _abstract(client_net, batch: int, image_size: int):
  image = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  params = jax.eval_shape(client_net.init, jax.random.key(0), image)['params']
  return params, image


def _conv_macs(jaxpr) -> int:
  """Multiply-adds of every convolution in ``jaxpr`` and the jaxprs inside it."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      out, rhs = eqn.outvars[0].aval, eqn.invars[1].aval
      out_channels = rhs.shape[eqn.params['dimension_numbers'].rhs_spec[0]]
      total += out.size * rhs.size // out_channels
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          total += _conv_macs(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          total += _conv_macs(sub)
  return total


@functools.lru_cache(maxsize=16)
def reference_forward_flops(client_net: split.ClientNet, image_size: int) -> int:
  """The client forward of one image as the reference's fvcore counts it.

  One FLOP per convolution multiply-add (no bias) and 5 per GroupNorm
  element (fvcore's affine norm); ReLUs and additions are free. For cut 2
  with C4S2 that is 78,839,808 = 75.19 M, whose 10,000 images make the
  paper's 734 G (spec 7.1).
  """
  net = _native(client_net)
  params, image = _abstract(net, 1, image_size)
  with without_boundaries():
    jaxpr = jax.make_jaxpr(lambda p, x: net.apply({'params': p}, x))(params, image)
  is_norm = lambda module, _: isinstance(module, group_norm.GroupNorm)
  _, captured = jax.eval_shape(lambda p, x: net.apply(
      {'params': p}, x, capture_intermediates=is_norm, mutable=['intermediates']), params, image)
  norm_elements = sum(leaf.size for leaf in jax.tree.leaves(captured))
  return _conv_macs(jaxpr.jaxpr) + 5 * norm_elements


@functools.lru_cache(maxsize=16)
def _xla_analysis(client_net: split.ClientNet, batch: int, image_size: int,
                  frozen: bool) -> tuple[float, float | None, int]:
  """(forward FLOPs, backward FLOPs, activation bytes of a step's program) at ``batch``.

  The backward is the parameters' gradient from the smashed data's, as a
  client computes it (no gradient for the images). A frozen client has no
  backward (None): its program is the forward alone.
  """
  net = _native(client_net)
  params, image = _abstract(net, batch, image_size)
  forward = lambda p, x: net.apply({'params': p}, x)
  options = _CPU_ANALYSIS_OPTIONS if jax.default_backend() == 'cpu' else None
  compile_ = lambda f, *args: jax.jit(f).lower(*args).compile(options)
  fwd = compile_(forward, params, image)
  if frozen:
    return _flops(fwd), None, fwd.memory_analysis().temp_size_in_bytes

  def forward_backward(p, x, cotangent):
    _, vjp = jax.vjp(lambda q: forward(q, x), p)
    return vjp(cotangent)[0]

  both = compile_(forward_backward, params, image, jax.eval_shape(forward, params, image))
  return _flops(fwd), _flops(both) - _flops(fwd), both.memory_analysis().temp_size_in_bytes


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  # Older jaxlibs return one dict per device program.
  return float((analysis[0] if isinstance(analysis, list) else analysis)['flops'])


def _bytes(tree) -> int:
  return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def client_compute(client_net: split.ClientNet, client_tx, *, batch_size: int, image_size: int,
                   images_in_pool: float, frozen: bool = False) -> dict:
  """Client FLOPs (XLA's and the reference formula's) and memory at the run's batch.

  A step's client work per image: the online forward and backward of the
  query view and the EMA forward of the key view; frozen, two forwards. The
  SGD and EMA updates (a few FLOPs per parameter) are left out. The
  reference's formula counts 3 forwards, 1 for TAResSFL.
  """
  fwd, bwd, activations = _xla_analysis(client_net, batch_size, image_size, frozen)
  forward = fwd / batch_size
  backward = None if frozen else bwd / batch_size
  per_image = 2 * forward if frozen else 2 * forward + backward
  reference = reference_forward_flops(client_net, image_size)
  reference_per_image = (1 if frozen else 3) * reference

  params, image = _abstract(_native(client_net), batch_size, image_size)
  smashed = jax.eval_shape(lambda p, x: client_net.apply({'params': p}, x), params, image)
  models = 1 if frozen else 2   # online and EMA; a frozen client's EMA is its model
  memory = {
      'parameters_mb': models * _bytes(params) / MB,
      'optimizer_mb': 0.0 if frozen else _bytes(jax.eval_shape(client_tx.init, params)) / MB,
      'gradients_mb': 0.0 if frozen else _bytes(params) / MB,
      # Both views' images and smashed data.
      'inputs_outputs_mb': 2 * (_bytes(image) + _bytes(smashed)) / MB,
      'activations_mb': activations / MB,
  }
  memory['total_mb'] = sum(memory.values())
  program = 'forward' if frozen else 'forward and backward'
  return {
      'batch_size': batch_size,
      'xla_flops_per_image': {'forward': forward, 'backward': backward, 'step': per_image},
      'xla_flops_per_run': per_image * images_in_pool,
      'paper_formula': {'forward_flops_per_image': reference,
                        'flops_per_image': reference_per_image,
                        'flops_per_run': reference_per_image * images_in_pool},
      'memory_mb': memory,
      'memory_method': (f'parameters (online{"" if frozen else " and EMA"}), optimiser state, '
                        'gradients, images and smashed data counted; activations from XLA\'s '
                        f'memory analysis of the compiled client {program} at batch {batch_size}'),
  }


def per_client(config: ml_collections.ConfigDict, client_net: split.ClientNet, client_tx, *,
               pool_size: int, steps_per_round: int) -> dict:
  """The run's ``communication_per_client_mb`` and ``client_compute`` (describe, summary.json).

  For a client of ``batch_size`` images a step: data.hetero's rich clients
  send and compute their batch multiplier times as much.
  """
  c = config
  frozen = frozen_clients(c)
  params, image = _abstract(_native(client_net), 1, c.model.image_size)
  smashed = jax.eval_shape(lambda p, x: client_net.apply({'params': p}, x), params, image)
  comm = communication_per_client(
      rounds=c.num_rounds, pool_size=pool_size, num_clients=c.num_clients,
      steps_per_round=steps_per_round, batch_size=c.batch_size,
      smashed_floats=math.prod(smashed.shape[1:]),
      client_params=sum(x.size for x in jax.tree.leaves(params)), sync_every=c.sync_every,
      frozen=frozen, average_ema=c.fedavg.average_ema)
  compute = client_compute(client_net, client_tx, batch_size=c.batch_size,
                           image_size=c.model.image_size,
                           images_in_pool=comm['images_in_pool'], frozen=frozen)
  return {'communication_per_client_mb': comm, 'client_compute': compute}


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

def size(mb: float) -> str:
  """Megabytes (2^20 bytes) in the unit that reads best: '8.00 KB', '57.86 MB', '4.88 GB'."""
  if mb == 0:
    return '0'
  for unit, scale in (('GB', 1024), ('MB', 1), ('KB', 1 / 1024)):
    if mb >= scale:
      return f'{mb / scale:,.2f} {unit}'
  return f'{mb * MB:,.0f} B'


def flops(n: float) -> str:
  """FLOPs in the reference's binary units: '75.19 M', '734.25 G'."""
  for unit, scale in (('T', 2 ** 40), ('G', 2 ** 30), ('M', 2 ** 20), ('K', 2 ** 10)):
    if n >= scale:
      return f'{n / scale:,.2f} {unit}'
  return f'{n:,.0f}'


def compute_line(compute: dict) -> str:
  """One line for the start-of-run table: FLOPs an image a step and memory."""
  return (f'{flops(compute["xla_flops_per_image"]["step"])} FLOPs an image a step (XLA), '
          f'{size(compute["memory_mb"]["total_mb"])} memory')


def table(overheads: dict, title: str, shape: str) -> str:
  """:func:`per_client`'s numbers under a title and a line on the run's shape."""
  comm, compute = overheads['communication_per_client_mb'], overheads['client_compute']
  step, sync, run = comm['per_step'], comm['per_sync'], comm['per_run']
  paper = comm['paper_formula']
  cell = lambda v: '' if v is None else size(v)
  rows = [('up    smashed data (2 views)', step['smashed_up_mb'], None, run['smashed_up_mb']),
          ('down  gradients', step['gradients_down_mb'], None, run['gradients_down_mb']),
          ('up    weights', None, sync['weights_up_mb'], run['weights_up_mb']),
          ('down  weights', None, sync['weights_down_mb'], run['weights_down_mb']),
          ('total', None, None, comm['total_mb'])]
  lines = [title, '  ' + shape, '',
           f'  {"communication":<30}{"per step":>12}{"per sync":>12}{"per run":>12}']
  lines += [f'  {name:<30}{cell(a):>12}{cell(b):>12}{cell(c):>12}' for name, a, b, c in rows]
  lines.append(f'  paper\'s formula (Table 1): weights {paper["weights_mb"]:,.2f} MB + latent '
               f'vectors {paper["latent_mb"]:,.2f} MB = {paper["total_mb"]:,.2f} MB')

  x, ref = compute['xla_flops_per_image'], compute['paper_formula']
  frozen = x['backward'] is None
  rows = [('forward', flops(x['forward']), flops(ref['forward_flops_per_image'])),
          ('backward', 'none' if frozen else flops(x['backward']), ''),
          ('a step (2 forwards)' if frozen else 'a step (forward, backward, EMA forward)',
           flops(x['step']), f'{flops(ref["flops_per_image"])} ({1 if frozen else 3} forward'
           f'{"" if frozen else "s"})'),
          (f'the run ({comm["images_in_pool"]:,.0f} images)', flops(compute['xla_flops_per_run']),
           flops(ref['flops_per_run']))]
  lines += ['', f'  {"client FLOPs an image":<42}{"XLA cost analysis":>18}    '
                'paper\'s formula (fvcore)']
  lines += [f'  {name:<42}{a:>18}    {b}' for name, a, b in rows]

  m = compute['memory_mb']
  rows = [('parameters (online' + ('' if frozen else ' and EMA') + ')', m['parameters_mb'],
           'counted'),
          ('optimiser state', m['optimizer_mb'], 'counted'),
          ('gradients', m['gradients_mb'], 'counted'),
          ('images and smashed data (2 views)', m['inputs_outputs_mb'], 'counted'),
          ('activations', m['activations_mb'], 'XLA memory analysis of the compiled '
           + ('forward' if frozen else 'forward and backward')),
          ('total', m['total_mb'], '')]
  lines += ['', f'  client memory, batch {compute["batch_size"]}']
  lines += [f'  {name:<42}{size(v):>18}    {how}' for name, v, how in rows]
  return '\n'.join(line.rstrip() for line in lines)


def report(config: ml_collections.ConfigDict) -> str:
  """The table for a config: validated and resolved as a run resolves it, data loaded."""
  # Imported here: train imports this module for its start-of-run table.
  from mocosfl_jax import train  # pylint: disable=import-outside-toplevel

  config_checks.validate(config)
  c = config_lib.resolved(config)
  data = sources.load_split(c.data, 'train', c.model.image_size)
  part = partition.make_partition(data.labels, data.num_classes, c.num_clients, c.noniid_ratio,
                                  c.data, c.seed)
  _, counts = partition.padded(part.client_indices)
  steps = train.steps_per_round(c, counts, part.batch_multiplier)
  pool = train.pool_size(c)
  client_net, _ = split.build(c)
  info = per_client(c, client_net, optim.sgd(c.optim.momentum, c.optim.weight_decay),
                    pool_size=pool, steps_per_round=steps)
  comm = info['communication_per_client_mb']
  extras = [f'bottleneck {c.model.bottleneck}'] if c.model.bottleneck else []
  extras += ['frozen clients'] if frozen_clients(c) else []
  title = (f'MocoSFL overhead per client: cut {c.cut_layer} '
           f'({split.paper_name(c.cut_layer, c.model.depth)})'
           + ''.join(', ' + e for e in extras))
  shape = (f'{c.num_clients:,} clients, {pool:,} a round, batch {c.batch_size}; a client is in '
           f'{comm["rounds_in_pool"]:,.4g} of {c.num_rounds:,} rounds of {steps:,} steps '
           f'({comm["steps_in_pool"]:,.0f} steps'
           + ('' if frozen_clients(c) else f', {comm["syncs"]:,.0f} FedAvgs') + ')')
  return table(info, title, shape)


def main(config: ml_collections.ConfigDict) -> None:
  """Prints the table; a config or data error is one ``error:`` line and exit status 1."""
  # JAX logs its backend search at INFO; the table is the whole output.
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    print(report(config), flush=True)
  except (config_checks.ConfigError, sources.DataError) as e:
    sys.exit(f'error: {e}')


def define_flags(flag_values: flags.FlagValues | None = None, argv: list[str] | None = None):
  """``--config`` in ``flag_values`` (absl's global flags by default).

  config_flags finds the ``--config.field`` overrides in ``argv`` (sys.argv
  by default) when the flag is defined, so pass the same list to parse.
  """
  return config_flags.DEFINE_config_file(
      'config', None, 'Experiment config file.', lock_config=True,
      flag_values=flags.FLAGS if flag_values is None else flag_values, sys_argv=argv)


if __name__ == '__main__':
  # Defined only when run as a program: mocosfl_jax.main, which imports this
  # module through train, defines its own --config.
  _CONFIG = define_flags()
  flags.mark_flags_as_required(['config'])
  app.run(lambda argv: main(_CONFIG.value))
