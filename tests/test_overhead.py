"""Per-client communication, compute and memory (spec 7.1, 9.25): paper Table 1, hand
arithmetic, XLA's counts and the command line."""
import math
import os
import re

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from mocosfl_jax import config as config_lib
from mocosfl_jax import overhead, train
from mocosfl_jax.models import split
from mocosfl_jax.sfl import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(overhead.__file__)))
BYTES = 4 / 2 ** 20   # MB per float


def paper_scenario(cut_layer, bottleneck='', client_lr=-1.0):
  """overhead_calculator.py's SFL setting: 1,000 clients sampled 0.1, 200 epochs of 50 images."""
  c = config_lib.default_config()
  c.num_clients, c.num_rounds, c.auto_adjust, c.data.name = 1000, 200, True, 'cifar10'
  c.cut_layer, c.model.bottleneck, c.optim.client_lr = cut_layer, bottleneck, client_lr
  c = config_lib.resolved(c)
  client, _ = split.build(c)
  image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(client.init, jax.random.key(0), image)['params']
  smashed = jax.eval_shape(client.apply, {'params': params}, image)
  return overhead.communication_per_client(
      rounds=c.num_rounds, pool_size=train.pool_size(c), num_clients=c.num_clients,
      steps_per_round=50_000 // c.num_clients // c.batch_size, batch_size=c.batch_size,
      smashed_floats=math.prod(smashed.shape[1:]),
      client_params=sum(x.size for x in jax.tree.leaves(params)), sync_every=c.sync_every,
      frozen=overhead.frozen_clients(c), average_ema=c.fedavg.average_ema)


@pytest.mark.parametrize('cut_layer, bottleneck, client_lr, weights, latent', [
    (1, '', -1.0, 1.4, 5000.0),        # MocoSFL-1
    (2, '', -1.0, 57.9, 5000.0),       # MocoSFL-3
    (1, 'C4S2', 0.0, 0.0, 39.06),      # MocoSFL-1 + TAResSFL
    (2, 'C4S2', 0.0, 0.0, 39.06),      # MocoSFL-3 + TAResSFL
])
def test_paper_formula_reproduces_table_1(cut_layer, bottleneck, client_lr, weights, latent):
  comm = paper_scenario(cut_layer, bottleneck, client_lr)
  assert comm['rounds_in_pool'] == 200 and comm['images_in_pool'] == 10_000
  paper = comm['paper_formula']
  assert round(paper['weights_mb'], 1 if weights else 2) == weights
  assert round(paper['latent_mb'], 2) == latent
  assert round(paper['total_mb'], 2) == round(paper['weights_mb'] + latent, 2)


def test_explicit_accounting_of_table_1s_tarressfl_row():
  """Frozen clients still upload both views (2 x 39.06 MB) and nothing comes back (spec 9.25)."""
  comm = paper_scenario(2, 'C4S2', 0.0)
  assert comm['per_step'] == {'smashed_up_mb': 2 * 1024 * BYTES, 'gradients_down_mb': 0.0}
  assert comm['upload_mb'] == pytest.approx(78.125) and comm['download_mb'] == 0.0
  assert comm['per_run']['weights_up_mb'] == comm['per_run']['weights_down_mb'] == 0.0


def test_explicit_per_direction_numbers_by_hand():
  # 4 clients, 2 in each of 4 rounds: a client is in 2 rounds of 5 steps, FedAvg
  # after steps 2, 4 and 5 of a round: 10 steps, 6 syncs, 30 images.
  kwargs = dict(rounds=4, pool_size=2, num_clients=4, steps_per_round=5, batch_size=3,
                smashed_floats=10, client_params=100, sync_every=2)
  comm = overhead.communication_per_client(**kwargs)
  assert (comm['rounds_in_pool'], comm['steps_in_pool'], comm['syncs'],
          comm['images_in_pool']) == (2, 10, 6, 30)
  # A step: 3 images x 10 floats x 4 bytes per view; the query's gradient back.
  assert comm['per_step'] == {'smashed_up_mb': 240 * 2 ** -20, 'gradients_down_mb': 120 * 2 ** -20}
  assert comm['per_sync'] == {'weights_up_mb': 400 * 2 ** -20, 'weights_down_mb': 400 * 2 ** -20}
  assert comm['per_run'] == {'smashed_up_mb': 2400 * 2 ** -20, 'gradients_down_mb': 1200 * 2 ** -20,
                             'weights_up_mb': 2400 * 2 ** -20, 'weights_down_mb': 2400 * 2 ** -20}
  assert comm['upload_mb'] == 4800 * 2 ** -20 and comm['download_mb'] == 3600 * 2 ** -20
  assert comm['total_mb'] == 8400 * 2 ** -20
  # The reference: weights once per sync (6 x 400 B), 2 smashed tensors an image (2 x 30 x 40 B).
  assert comm['paper_formula'] == {'weights_mb': 2400 * 2 ** -20, 'latent_mb': 2400 * 2 ** -20,
                                   'total_mb': 4800 * 2 ** -20}

  ema = overhead.communication_per_client(**kwargs, average_ema=True)
  assert ema['per_sync']['weights_up_mb'] == 800 * 2 ** -20
  frozen = overhead.communication_per_client(**kwargs, frozen=True)
  assert frozen['upload_mb'] == 2400 * 2 ** -20 and frozen['download_mb'] == 0.0
  assert frozen['paper_formula'] == {'weights_mb': 0.0, 'latent_mb': 1200 * 2 ** -20,
                                     'total_mb': 1200 * 2 ** -20}


def test_frozen_means_a_client_learning_rate_of_zero():
  c = config_lib.default_config()
  assert not overhead.frozen_clients(c)
  c.optim.client_lr = 0.0
  assert overhead.frozen_clients(c)
  c.optim.client_lr, c.optim.lr = -1.0, 0.0     # clients follow a zero server rate
  assert overhead.frozen_clients(c)


def test_reference_flop_count_gives_the_papers_734_gflops():
  """Cut 2 + C4S2, one forward an image (TAResSFL), 200 epochs x 50 images (paper 5.3)."""
  per_image = overhead.reference_forward_flops(split.ClientNet(2, bottleneck='C4S2'), 32)
  convs = 27 * 64 * 1024 + 2 * 576 * 64 * 1024 + 576 * 4 * 256
  assert per_image == convs + 5 * 3 * 64 * 1024      # three 64x32x32 GroupNorms
  assert round(per_image * 10_000 / 2 ** 30) == 734


def test_client_compute_on_a_tiny_client():
  client = split.ClientNet(1, width=0.0625, as_matmul=True)
  tx = optim.sgd(0.9, 5e-4)
  compute = overhead.client_compute(client, tx, batch_size=2, image_size=8, images_in_pool=10)
  # A 3x3 conv 3 -> 4 channels on 8x8: 6,912 multiply-adds; GroupNorm on 256 elements.
  assert compute['paper_formula']['forward_flops_per_image'] == 6_912 + 5 * 256
  flops = compute['xla_flops_per_image']
  # XLA: 2 FLOPs a multiply-add less the padding taps (6,912 x 2 x (22/24)^2), plus the rest.
  assert 2 * 6_912 * (22 / 24) ** 2 < flops['forward'] < 2 * 6_912 + 40 * 256
  assert flops['backward'] > 0 and flops['step'] == 2 * flops['forward'] + flops['backward']
  assert compute['xla_flops_per_run'] == 10 * flops['step']
  memory = compute['memory_mb']
  params = (3 * 3 * 3 * 4 + 2 * 4) * 4 * 2 ** -20
  assert memory['parameters_mb'] == 2 * params and memory['gradients_mb'] == params
  assert memory['optimizer_mb'] >= params and memory['activations_mb'] > 0
  # Both views: 2 x (2 images of 8x8x3 + their 8x8x4 smashed data).
  assert memory['inputs_outputs_mb'] == 2 * 2 * (192 + 256) * 4 * 2 ** -20

  frozen = overhead.client_compute(client, tx, batch_size=2, image_size=8, images_in_pool=10,
                                   frozen=True)
  assert frozen['xla_flops_per_image']['backward'] is None
  assert frozen['xla_flops_per_image']['step'] == 2 * flops['forward']
  assert frozen['memory_mb']['parameters_mb'] == params
  assert frozen['memory_mb']['optimizer_mb'] == frozen['memory_mb']['gradients_mb'] == 0.0


def run_cli(*args):
  argv = ['overhead', f'--config={REPO}/configs/quickstart.py', *args]
  flag_values = flags.FlagValues()
  config = overhead.define_flags(flag_values, argv)
  flag_values(argv)
  overhead.main(config.value)


def test_command_line_prints_one_table(capsys):
  run_cli('--config.model.bottleneck=C2S2', '--config.sync_every=5')
  out = capsys.readouterr().out
  assert out.startswith('MocoSFL overhead per client: cut 1 (MocoSFL-1), bottleneck C2S2\n')
  # quickstart: 100 clients, all in each of 25 rounds of 14 steps; FedAvg after steps 5, 10, 14.
  assert 'a client is in 25 of 25 rounds of 14 steps (350 steps, 75 FedAvgs)' in out
  # Smashed data 2x16x16 an image: 2 KB a view; the query's gradient back.
  assert re.search(r'up    smashed data \(2 views\) +4\.00 KB +1\.37 MB', out)  # 1,400 KB
  assert re.search(r'down  gradients +2\.00 KB +700\.00 KB', out)
  assert "paper's formula (Table 1): weights " in out
  assert re.search(r'activations +[\d.]+ KB +XLA memory analysis', out)
  assert out.count('\n\n') == 3 and not any(line.endswith(' ') for line in out.splitlines())

  run_cli('--config.optim.client_lr=0')
  out = capsys.readouterr().out
  assert 'cut 1 (MocoSFL-1), frozen clients' in out and '(350 steps)' in out
  assert re.search(r'backward +none', out)
  assert "paper's formula (Table 1): weights 0.00 MB" in out


def test_command_line_errors_are_one_line():
  with pytest.raises(SystemExit) as info:
    run_cli('--config.model.bottleneck=C2X')
  assert str(info.value).startswith('error: config field model.bottleneck is \'C2X\'')


def test_start_of_run_table_shows_the_bottleneck_and_the_client_cost():
  c = config_lib.default_config()
  c.model.width, c.model.bottleneck = 0.0625, 'C4S2'
  client, _ = split.build(c, as_matmul=True)
  info = {'devices': ['TFRT_CPU_0'], 'num_clients': 100, 'pool_size': 100, 'batch_size': 1,
          'steps_per_round': 14, 'rounds': 25, 'total_steps': 350, 'cut_layer': 1,
          'paper_name': 'MocoSFL-1', 'client_params': 448, 'server_params': 174_834,
          'smashed_shape': [16, 16, 4], 'bottleneck': 'C4S2', 'train_samples': 1437,
          'test_samples': 360,
          **overhead.per_client(c, client, optim.sgd(0.9, 5e-4), pool_size=100,
                                steps_per_round=14)}
  table = train.describe_table(info)
  assert 'layer 1 (MocoSFL-1) + C4S2 bottleneck, smashed 16x16x4 an image' in table
  assert ' M FLOPs an image a step (XLA), ' in table and ' KB memory' in table
  assert all(len(line) <= 80 for line in table.splitlines())
