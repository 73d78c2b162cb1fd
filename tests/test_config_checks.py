"""Config validation: each rule rejects its bad value with one line naming the field."""
import importlib.util
import os
import subprocess
import sys

import ml_collections
import pytest

from mocosfl_jax import config as config_lib
from mocosfl_jax import config_checks
from mocosfl_jax.config_checks import ConfigError
from mocosfl_jax.models import resnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(config_lib.__file__)))


def with_fields(**fields):
  """The default config with dotted fields (given with '__' for '.') replaced."""
  c = config_lib.default_config()
  for name, value in fields.items():
    *sections, leaf = name.split('__')
    node = c
    for section in sections:
      node = node[section]
    with c.ignore_type():
      node[leaf] = value
  return c


def rejects(config, field, **data):
  with pytest.raises(ConfigError) as info:
    config_checks.validate(config, **data)
  message = str(info.value)
  assert field in message
  assert '\n' not in message
  return message


def shipped_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_defaults_and_shipped_configs_pass():
  config_checks.validate(config_lib.default_config())
  config_checks.validate(ml_collections.FrozenConfigDict(config_lib.default_config()))
  for name in ('quickstart', 'cifar10_1000', 'cifar10_5clients', 'cifar10_cpu'):
    config_checks.validate(shipped_config(name))


# Spec 3.2's table: N -> batch per client, sampling ratio, FedAvg period in
# steps, rounds (from the reference's 200 epochs).
AUTO_ADJUST_TABLE = {
    5: (20, 1.0, 50, 200), 20: (5, 1.0, 50, 200), 100: (1, 1.0, 50, 200),
    200: (1, 0.5, 50, 400), 500: (1, 0.2, 50, 1000), 1000: (1, 0.1, 50, 2000),
}


@pytest.mark.parametrize('num_clients', sorted(AUTO_ADJUST_TABLE))
def test_auto_adjust_follows_a_num_clients_override(num_clients):
  # As --config.num_clients=N does: the override lands after get_config.
  config = shipped_config('cifar10_1000')
  config.num_clients = num_clients
  config_checks.validate(config)
  run = config_lib.resolved(config)
  assert (run.batch_size, run.client_sample_ratio, run.sync_every,
          run.num_rounds) == AUTO_ADJUST_TABLE[num_clients]
  assert config.num_rounds == 200 and config.auto_adjust  # the given config is left alone
  assert not run.auto_adjust and config_lib.resolved(run).to_dict() == run.to_dict()


def test_shipped_paper_configs_resolve_to_the_paper_schedules():
  for name, clients in (('cifar10_1000', 1000), ('cifar10_5clients', 5)):
    run = config_lib.resolved(shipped_config(name))
    assert (run.num_clients, run.batch_size, run.client_sample_ratio, run.sync_every,
            run.num_rounds) == (clients,) + AUTO_ADJUST_TABLE[clients]
    assert (run.seed, run.optim.client_schedule) == (1234, 'per_client_step')


def test_a_frozen_config_resolves():
  run = config_lib.resolved(ml_collections.FrozenConfigDict(shipped_config('cifar10_1000')))
  assert (run.client_sample_ratio, run.num_rounds) == (0.1, 2000)


def test_auto_adjust_names_the_fields_it_overwrites():
  config = shipped_config('cifar10_1000')
  assert config_lib.replaced_by_auto_adjust(config) == []
  config.batch_size, config.sync_every = 4, 50
  assert config_lib.replaced_by_auto_adjust(config) == ['batch_size=4']
  config.auto_adjust = False
  assert config_lib.replaced_by_auto_adjust(config) == []


def test_auto_adjust_off_keeps_the_fields():
  config = shipped_config('cifar10_1000')
  config.auto_adjust = False
  config.batch_size = 3
  assert config_lib.resolved(config).to_dict() == config.to_dict()


def test_validation_judges_the_values_auto_adjust_derives():
  # 5,000 clients as set: a pool of all of them overflows the queue; derived: 100 per step.
  config = shipped_config('cifar10_1000')
  config.num_clients = 5000
  config_checks.validate(config)
  config.auto_adjust = False
  rejects(config, 'moco.queue_size')


def test_asymmetric_loss_halves_the_queue_a_step_needs():
  # 100 clients x batch 1: the symmetric loss writes 200 keys a step, V1's 100.
  rejects(with_fields(moco__queue_size=199), 'moco.queue_size')
  config_checks.validate(with_fields(moco__queue_size=100, moco__version='V1'))
  message = rejects(with_fields(moco__queue_size=99, moco__version='V1'), 'moco.queue_size')
  assert '1 x pool 100 x batch_size 1 = 100 keys' in message
  rejects(with_fields(moco__queue_size=100, moco__version='V1', moco__loss='symmetric'),
          'moco.queue_size')


def test_auto_adjust_refuses_a_dataset_it_has_no_schedule_for():
  message = rejects(with_fields(auto_adjust=True), 'auto_adjust')
  assert "data.name='digits'" in message and '--config.auto_adjust=False' in message


@pytest.mark.parametrize('field, value', [
    ('num_clients', 0),
    ('client_sample_ratio', 0.0),
    ('client_sample_ratio', 1.5),
    ('batch_size', 0),
    ('cut_layer', 0),
    ('cut_layer', 9),
    ('noniid_ratio', 0.0),
    ('noniid_ratio', 1.01),
    ('num_rounds', 0),
    ('steps_per_round', -1),
    ('sync_every', 0),
    ('log_every', 0),
    ('seed', -1),
    ('data.source', 'mnist_zip'),
    ('data.partition', 'random'),
    ('data.name', ''),
    ('data.dirichlet_alpha', 0.0),
    ('data.data_proportion', 0.0),
    ('data.data_proportion', 2.0),
    ('model.width', 0.0),
    ('model.width', -0.5),
    ('model.image_size', 4),
    ('model.client_impl', 'pmap'),
    ('model.depth', 50),
    ('moco.version', 'V3'),
    ('moco.augmentation', 'simclr'),
    ('moco.crop_scale_min', 0.0),
    ('moco.crop_scale_min', 1.5),
    ('moco.queue_size', 0),
    ('moco.temperature', 0.0),
    ('moco.ema_decay', -0.1),
    ('moco.ema_decay', 1.1),
    ('optim.lr', -0.1),
    ('optim.momentum', 1.0),
    ('optim.weight_decay', -1e-4),
    ('optim.client_schedule', 'per_step'),
    ('optim.schedule', 'step'),
    ('moco.loss', 'sym'),
    ('fedavg.weighting', 'by_size'),
    ('eval.every', 0),
    ('eval.knn_k', 0),
    ('eval.knn_temperature', 0.0),
    ('eval.batch_size', 0),
    ('eval.probe_epochs', 0),
    ('checkpoint.every', 0),
    ('checkpoint.keep', 0),
])
def test_out_of_range_or_unknown_value(field, value):
  message = rejects(with_fields(**{field.replace('.', '__'): value}), field)
  assert repr(value) in message


@pytest.mark.parametrize('field, value, expected', [
    ('num_clients', 2.5, 'an integer'),
    ('num_rounds', True, 'an integer'),
    ('model.width', '0.5', 'a number'),
    ('moco.temperature', float('nan'), 'finite'),
    ('moco.feature_sharing', 1, 'True or False'),
    ('data.source', 3, 'a string'),
    ('data.download', 'no', 'True or False'),
    ('moco', 'V2', 'section'),
])
def test_wrong_type(field, value, expected):
  assert expected in rejects(with_fields(**{field.replace('.', '__'): value}), field)


@pytest.mark.parametrize('depth, last_cut', [(10, 4), (18, 8), (34, 16)])
def test_the_cut_layer_range_follows_the_depth(depth, last_cut):
  config_checks.validate(with_fields(model__depth=depth, cut_layer=last_cut))
  message = rejects(with_fields(model__depth=depth, cut_layer=last_cut + 1), 'cut_layer')
  assert f'1..{last_cut} (the ResNet-{depth} backbone has {last_cut + 1} modules' in message


def test_ints_are_accepted_for_float_fields():
  config_checks.validate(with_fields(model__width=1, moco__ema_decay=1))


@pytest.mark.parametrize('width, channels', [
    (0.01, '0.64, 1.28, 2.56, 5.12'),   # was floored to 4 channels in every stage
    (0.05, '3.2, 6.4, 12.8, 25.6'),     # the stem was floored to 4
    (0.3, '19.2, 38.4, 76.8, 153.6'),   # groups of 4 do not divide 19 channels
    (0.21875, '14, 28, 56, 112'),
])
def test_width_must_give_every_stage_whole_groups_of_4_channels(width, channels):
  message = rejects(with_fields(model__width=width), 'model.width')
  assert f'is {width!r}' in message and channels in message
  assert 'multiple of 4' in message and '0.0625' in message
  with pytest.raises(ValueError, match='multiple of 4'):
    resnet.channels(width)


def test_widths_that_build_the_network_pass():
  for width in (0.0625, 0.125, 0.25, 0.5, 0.75, 1, 2):
    config_checks.validate(with_fields(model__width=width))
    assert all(c % 4 == 0 for c in resnet.channels(width))


def test_the_digits_name_goes_with_the_digits_source_only():
  message = rejects(with_fields(data__source='npz'), 'data.name')
  assert "'digits'" in message and "'npz'" in message and 'cifar10' in message
  rejects(with_fields(data__name='cifar10'), 'data.name')
  config_checks.validate(with_fields(data__source='npz', data__name='my_photos'))


def test_unknown_field_from_a_config_file_suggests_the_right_name():
  c = config_lib.default_config()
  c.moco.temprature = 0.2  # A config file can add fields; overrides cannot.
  assert 'did you mean moco.temperature' in rejects(c, 'moco.temprature')
  c = config_lib.default_config()
  c.extra = ml_collections.ConfigDict({'x': 1})
  rejects(c, 'extra')


def test_missing_field():
  c = config_lib.default_config().to_dict()
  del c['eval']['knn_k']
  rejects(c, 'eval.knn_k')


def test_hetero_string_is_checked_before_any_data():
  rejects(with_fields(data__hetero='0.2_0.8|16'), 'data.hetero')


def test_shared_queue_must_hold_a_steps_keys():
  # 10 clients x batch 5 x 2 views = 100 keys per step.
  ok = with_fields(num_clients=10, batch_size=5, moco__queue_size=100)
  config_checks.validate(ok)
  message = rejects(with_fields(num_clients=10, batch_size=5, moco__queue_size=99),
                    'moco.queue_size')
  assert '100' in message
  # Only the pool's clients write keys.
  config_checks.validate(with_fields(num_clients=10, client_sample_ratio=0.5, batch_size=5,
                                     moco__queue_size=50))


def test_per_client_queue_must_hold_a_clients_keys():
  base = dict(num_clients=10, batch_size=5, moco__feature_sharing=False)
  config_checks.validate(with_fields(moco__queue_size=100, **base))
  assert 'at least 100' in rejects(with_fields(moco__queue_size=99, **base), 'moco.queue_size')


def test_batch_larger_than_the_smallest_client():
  c = with_fields(batch_size=8)
  config_checks.validate(c, samples_per_client=[8, 9, 20])
  assert '7 samples' in rejects(c, 'batch_size', samples_per_client=[8, 7, 20])
  rejects(c, 'batch_size', samples_per_client=3)


def test_rules_that_need_the_training_set_size():
  c = with_fields(num_clients=100, data__data_proportion=0.1)
  config_checks.validate(c, num_train_samples=1000)
  rejects(c, 'num_clients', num_train_samples=999)
  rejects(with_fields(eval__knn_k=201), 'eval.knn_k', num_train_samples=200)


def test_command_line_prints_one_error_line_without_traceback(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  result = subprocess.run(
      [sys.executable, '-m', 'mocosfl_jax.main', '--config=configs/quickstart.py',
       '--config.moco.temperature=-1.0', f'--workdir={tmp_path}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  assert 'error: config field moco.temperature is -1.0: must be > 0' in result.stderr
