"""TAResSFL (spec 6.4): auxiliary data, starting from an expert's workdir, frozen clients.

The expert is the session's tiny run (conftest.tiny_run); the auxiliary set
in these tests is the digits source again (its labels and ids kept apart from
the target's), which is enough to check counts and ids.
"""
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mocosfl_jax import config as config_lib
from mocosfl_jax import config_checks, init_from, overhead, train
from mocosfl_jax.data import partition, sources
from mocosfl_jax.export import workdir as workdir_lib
from mocosfl_jax.models import split
from mocosfl_jax.sfl import fedavg, optim, rounds, step as step_lib

import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config_file(relative: str, *args):
  spec = importlib.util.spec_from_file_location(pathlib.Path(relative).stem, ROOT / relative)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def leaves_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def expert(workdir, selection='latest'):
  return workdir_lib.load(workdir, selection)


# ---------------------------------------------------------------------------
# (b) init.from_workdir
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('load_server', [False, True])
def test_init_loads_the_expert_into_every_client_online_and_ema(tiny_run, load_server):
  workdir, _ = tiny_run
  c = tiny.config(**{'init.from_workdir': str(workdir), 'init.load_server': load_server})
  exp = train.build(c)
  fresh = exp.init_state(jax.random.key(7))
  server_before = jax.tree.map(np.asarray, fresh.server)
  state = init_from.load_into(fresh, c)
  loaded = expert(workdir)
  for clients in (state.clients.online, state.clients.ema):
    for i in range(c.num_clients):
      assert leaves_equal(jax.tree.map(lambda x: x[i], clients), loaded.online)
  if load_server:
    assert leaves_equal(state.server, loaded.server)
    assert leaves_equal(state.server_ema, loaded.server)
  else:
    assert leaves_equal(state.server, server_before)
    assert not leaves_equal(state.server, loaded.server)


def test_init_of_another_width_is_one_line_naming_the_workdir(tiny_run):
  workdir, _ = tiny_run
  c = tiny.config(**{'init.from_workdir': str(workdir), 'model.width': 0.125})
  state = jax.eval_shape(workdir_lib.init_state(c), jax.random.key(0))  # refused before use
  with pytest.raises(config_checks.ConfigError) as error:
    init_from.load_into(state, c)
  message = str(error.value)
  assert '\n' not in message and str(workdir) in message and 'model.width 0.0625 -> 0.125' in message


def test_shape_mismatch_names_the_leaf():
  loaded = {'conv': {'kernel': np.zeros((3, 3, 3, 4))}}
  expected = {'conv': {'kernel': jnp.zeros((3, 3, 3, 8))}}
  with pytest.raises(config_checks.ConfigError, match=r"'kernel'\] is \(3, 3, 3, 4\) there"):
    init_from._fitted(loaded, expected, 'client model', 'runs/expert')
  assert init_from._fitted(loaded, {'conv': {'kernel': jnp.ones((3, 3, 3, 4))}}, 'c', 'w')


def test_init_errors_name_the_field(tmp_path):
  c = tiny.config(**{'optim.client_lr': 0.0})
  with pytest.raises(config_checks.ConfigError, match="^config field init.from_workdir is ''"):
    init_from.check(c)
  c.init.from_workdir = str(tmp_path / 'missing')
  init_from.check(c)
  with pytest.raises(config_checks.ConfigError, match=r'^init.from_workdir .*missing'):
    init_from.load_into(None, c)
  with pytest.raises(config_checks.ConfigError, match='init.checkpoint'):
    config_checks.validate(tiny.config(**{'init.checkpoint': 'newest'}))


# ---------------------------------------------------------------------------
# (a) frozen clients
# ---------------------------------------------------------------------------

def test_frozen_clients_stay_bit_identical_while_the_server_trains(tiny_run, tmp_path,
                                                                   monkeypatch):
  workdir, _ = tiny_run

  def no_fedavg(*args):
    raise AssertionError('FedAvg ran with frozen clients')
  monkeypatch.setattr(fedavg, 'average_and_broadcast', no_fedavg)
  c = tiny.config(**{'optim.client_lr': 0.0, 'init.from_workdir': str(workdir),
                     'init.load_server': True, 'num_rounds': 2, 'eval.every': 2,
                     'checkpoint.every': 2})
  stage2 = tmp_path / 'stage2'
  summary = train.run(c, stage2)
  loaded = expert(workdir)
  path = (stage2 / 'checkpoints' / '2').absolute()
  state = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
      path, args=ocp.args.Composite(state=ocp.args.StandardRestore(
          workdir_lib.abstract_state(c)))).state
  for clients in (state.clients.online, state.clients.ema):
    for i in range(c.num_clients):
      assert leaves_equal(jax.tree.map(lambda x: x[i], clients), loaded.online)
  assert not leaves_equal(state.server['params'], loaded.server['params'])
  assert np.all(np.asarray(state.clients.steps) == 2 * tiny.OVERRIDES['steps_per_round'])
  comm = summary['run']['communication_per_client_mb']
  assert comm['download_mb'] == 0 and comm['per_run']['weights_up_mb'] == 0
  assert summary['run']['client_compute']['xla_flops_per_image']['backward'] is None


def _convolutions(frozen: bool) -> int:
  """Convolutions in a tiny step's traced program (before XLA removes unused ones)."""
  c = tiny.config()
  client_net, server_net = split.build(c)
  tx = optim.sgd(0.9, 5e-4)
  step = step_lib.make_train_step(
      client_net, server_net, tx, tx, lambda key, x: (x.astype(jnp.float32),) * 2,
      temperature=0.1, ema_decay=0.99, client_impl='vmap', server_lr=lambda r: 0.1,
      client_lr=lambda s, r: jnp.zeros(s.shape), frozen_clients=frozen)
  pooled = jax.eval_shape(lambda s: rounds.gather(s, jnp.arange(2)),
                          workdir_lib.abstract_state(c))
  images = jax.ShapeDtypeStruct((2, 2, 16, 16, 3), jnp.uint8)
  return str(jax.make_jaxpr(step)(pooled, images, jax.random.key(1))).count('conv_general_dilated')


def test_frozen_step_has_no_client_backward():
  # A client convolution's weight gradient is one more convolution (the
  # client's input needs no gradient): frozen, none is traced.
  client_net, _ = split.build(tiny.config())
  image = jnp.zeros((1, 16, 16, 3))
  params = jax.eval_shape(client_net.init, jax.random.key(0), image)['params']
  client_convs = str(jax.make_jaxpr(lambda p: client_net.apply({'params': p}, image))(
      params)).count('conv_general_dilated')
  assert client_convs >= 1
  assert _convolutions(frozen=False) - _convolutions(frozen=True) == client_convs


# ---------------------------------------------------------------------------
# (c) auxiliary data
# ---------------------------------------------------------------------------

def test_aux_partition_is_the_target_share_then_the_aux_share():
  labels = np.repeat(np.arange(10), 10)  # 100 target samples
  data = config_lib.default_config().data
  data.data_proportion, data.aux_balance = 0.1, False
  part = partition.make_partition_with_aux(labels, 10, 2, 1.0, data, 0, num_aux=50)
  for share in part.client_indices:
    assert np.sum(share < 100) == 5 and np.sum(share >= 100) == 25
  ids = np.concatenate(part.client_indices)
  assert len(set(ids[ids >= 100])) == 50 and ids.max() < 150
  data.aux_balance = True
  part = partition.make_partition_with_aux(labels, 10, 2, 1.0, data, 0, num_aux=50)
  for share in part.client_indices:
    assert np.sum(share < 100) == 25 and len(set(share[share < 100])) == 5
  data.data_proportion = 0.0
  part = partition.make_partition_with_aux(labels, 10, 2, 1.0, data, 0, num_aux=50)
  assert all(np.all(share >= 100) for share in part.client_indices)


def test_aux_training_table_and_the_target_bank():
  c = tiny.config(**{'num_clients': 1, 'data.data_proportion': 0.1, 'data.aux_source': 'digits',
                     'data.aux_name': 'digits', 'data.aux_balance': False, 'model.image_size': 16})
  config_checks.validate(c)
  exp = train.build(c)
  aux = sources.load_split(sources.aux_config(c.data), 'train', 16)
  data = exp.client_data()
  assert data.images.shape == (len(exp.train) + len(aux), 16, 16, 3)
  assert int(data.counts[0]) == int(0.1 * len(exp.train)) + len(aux)
  assert np.array_equal(exp.bank_images(data), exp.train.images)
  assert len(exp.table_labels()) == len(data.images)
  assert exp.table_labels()[len(exp.train):].min() >= exp.train.num_classes
  summary = exp.partition.summary(exp.table_labels())
  assert summary['assigned'] == int(data.counts[0])


def test_data_proportion_zero_needs_an_aux_set():
  c = tiny.config(**{'data.data_proportion': 0.0})
  with pytest.raises(config_checks.ConfigError, match=r'data.data_proportion .*\(0, 1\]'):
    config_checks.validate(c)
  c.data.aux_source, c.data.aux_name = 'digits', 'digits'
  config_checks.validate(c, num_train_samples=1437)
  c.data.aux_name = 'cifar100'
  with pytest.raises(config_checks.ConfigError, match='data.aux_name'):
    config_checks.validate(c)


# ---------------------------------------------------------------------------
# (d) overhead and (e) configs
# ---------------------------------------------------------------------------

def test_frozen_clients_upload_smashed_data_only_table_1():
  c = load_config_file('configs/taressfl_cifar10.py')
  c.cut_layer, c.num_clients, c.model.width = 2, 1000, 0.125  # width leaves C4S2's 4x16x16
  c = config_lib.resolved(c)
  steps = config_lib.AUTO_ADJUST_TRAIN_SAMPLES // c.num_clients // c.batch_size
  client_net, _ = split.build(c)
  info = overhead.per_client(c, client_net, optim.sgd(0.9, 5e-4), pool_size=train.pool_size(c),
                             steps_per_round=steps)
  comm = info['communication_per_client_mb']
  smashed_mb = 4 * 16 * 16 * 4 / 2 ** 20
  assert comm['images_in_pool'] == 200 * 50
  assert comm['per_step'] == {'smashed_up_mb': 2 * smashed_mb, 'gradients_down_mb': 0.0}
  assert comm['per_run']['weights_up_mb'] == comm['per_run']['weights_down_mb'] == 0
  assert comm['download_mb'] == 0 and math.isclose(comm['upload_mb'], 10_000 * 2 * smashed_mb)
  assert math.isclose(comm['paper_formula']['total_mb'], 39.0625)
  assert info['client_compute']['memory_mb']['gradients_mb'] == 0


def test_the_configs_resolve():
  stage2 = load_config_file('configs/taressfl_cifar10.py')
  with pytest.raises(config_checks.ConfigError, match='init.from_workdir'):
    init_from.check(stage2)
  stage2.init.from_workdir = 'runs/taressfl_expert'
  config_checks.validate(stage2)
  init_from.check(stage2)
  run = config_lib.resolved(stage2)
  assert (run.batch_size, run.sync_every, run.num_rounds) == (1, 50, 200)
  assert optim.frozen_clients(run.optim) and run.optim.lr == 0.001
  expert_config = load_config_file('configs/taressfl_expert.py')
  config_checks.validate(expert_config)
  assert (expert_config.num_clients, expert_config.model.bottleneck) == (1, 'C4S2')
  assert not optim.frozen_clients(expert_config.optim)
  for row in ('t4-expert-cut1-target0pct', 't4-expert-cut2-target0.5pct',
              't4-cifar10-n100-noniid-cut2-target1pct'):
    config = load_config_file('experiments/paper_tables.py', row)
    config_checks.validate(config)
  stage2_row = load_config_file('experiments/paper_tables.py', 't4-cifar10-n100-iid-cut1-target0pct')
  assert stage2_row.init.from_workdir == 'runs/t4-expert-cut1-target0pct'
