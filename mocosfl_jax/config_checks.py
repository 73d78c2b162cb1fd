"""Config validation: every mistake becomes one line before anything compiles.

:func:`validate` runs at the start of a run, and again once the data is
partitioned for the rules that depend on the data. A config that fails raises
:class:`ConfigError` whose message names the field, its value and what is
allowed; the command line prints it as ``error: <message>``.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

from mocosfl_jax import config as config_lib
from mocosfl_jax.data import augment, partition, sources
from mocosfl_jax.models import bottleneck, heads, resnet, split
from mocosfl_jax.privacy import decoders
from mocosfl_jax.sfl import moco, optim, rounds


class ConfigError(ValueError):
  """A config field that cannot work; the message is one line."""


# Allowed values of the enumerated fields.
ENUMS = {
    'round_impl': ('auto', 'scan', 'loop'),
    'data.source': sources.SOURCES,
    'data.partition': partition.PARTITIONS,
    'model.client_impl': ('auto', 'vmap', 'map', 'matmul'),
    'model.depth': resnet.DEPTHS,
    'model.dtype': ('float32', 'bfloat16'),
    'moco.ema_dtype': ('float32', 'bfloat16'),
    'moco.version': tuple(heads.HEADS),
    'moco.augmentation': ('auto',) + augment.VERSIONS + (augment.FIXED,),
    'moco.loss': moco.LOSSES,
    'optim.schedule': optim.SCHEDULES,
    'optim.client_schedule': ('per_client_step', 'per_round'),
    'fedavg.weighting': ('uniform', 'data_size'),
    'privacy.attacker': decoders.ATTACKERS,
}

# The backbone halves the resolution three times.
MIN_IMAGE_SIZE = 8


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; nested dicts stay visible as their own keys."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    flat[name] = value
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name + '.'))
  return flat


def _as_dict(config) -> dict[str, Any]:
  if isinstance(config, ml_collections.FrozenConfigDict):
    config = config.as_configdict()
  if isinstance(config, ml_collections.ConfigDict):
    return config.to_dict()
  return dict(config)


def _type_name(value: Any) -> str:
  return 'a section' if isinstance(value, Mapping) else type(value).__name__


def _check_structure(given: dict[str, Any], default: dict[str, Any]) -> None:
  """Unknown, missing and wrongly typed fields, judged against the defaults."""
  for name, value in given.items():
    if name not in default:
      close = difflib.get_close_matches(name, list(default), n=1)
      hint = f': did you mean {close[0]}?' if close else ': remove it'
      raise ConfigError(f'unknown config field {name} = {value!r}{hint}')
  for name, expected in default.items():
    if name not in given:
      raise ConfigError(f'config field {name} is missing: start the config from '
                        'mocosfl_jax.config.default_config()')
    value = given[name]
    if isinstance(expected, Mapping) != isinstance(value, Mapping):
      raise ConfigError(f'config field {name} is {_type_name(value)} but must be '
                        f'{_type_name(expected)}')
    if isinstance(expected, bool):
      ok = isinstance(value, bool)
      want = 'True or False'
    elif isinstance(expected, int):
      ok = isinstance(value, int) and not isinstance(value, bool)
      want = 'an integer'
    elif isinstance(expected, float):
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
      want = 'a number'
      if ok and not math.isfinite(value):
        raise ConfigError(f'config field {name} is {value!r}: must be a finite number')
    elif isinstance(expected, str):
      ok = isinstance(value, str)
      want = 'a string'
    else:
      ok = True
    if not ok:
      raise ConfigError(f'config field {name} is {value!r} ({type(value).__name__}): '
                        f'must be {want}')


def _rule(name: str, value: Any, ok: bool, allowed: str) -> None:
  if not ok:
    raise ConfigError(f'config field {name} is {value!r}: {allowed}')


def _check_values(c: dict[str, Any]) -> None:
  """Ranges and enums of single fields, then rules that tie fields together."""
  for name, allowed in ENUMS.items():
    _rule(name, c[name], c[name] in allowed, f'use one of {list(allowed)}')

  at_least = lambda low: (lambda v: v >= low, f'must be >= {low}')
  positive = (lambda v: v > 0, 'must be > 0')
  # The backbone is a flat list of modules; the client keeps [0, cut_layer) and
  # the server needs at least one module of its own.
  depth = c['model.depth']
  max_cut = resnet.num_modules(depth) - 1
  unit = (lambda v: 0 < v <= 1, 'must be in (0, 1]')
  ranges: dict[str, tuple[Callable[[Any], bool], str]] = {
      'seed': at_least(0),
      'num_clients': at_least(1),
      'client_sample_ratio': unit,
      'batch_size': at_least(1),
      'cut_layer': (lambda v: 1 <= v <= max_cut,
                    f'must be in 1..{max_cut} (the ResNet-{depth} backbone has '
                    f'{max_cut + 1} modules and the server needs at least one)'),
      'noniid_ratio': unit,
      'num_rounds': at_least(1),
      'steps_per_round': (lambda v: v >= 0, 'must be >= 0 (0 = one pass over a client\'s data)'),
      'sync_every': at_least(1),
      'log_every': at_least(1),
      'data.name': (bool, 'must name the dataset'),
      'data.dirichlet_alpha': positive,
      'data.data_proportion': ((lambda v: 0 <= v <= 1, 'must be in [0, 1] with data.aux_source '
                                '(0 = auxiliary data only)') if c['data.aux_source'] else unit),
      'model.width': positive,
      'model.image_size': at_least(MIN_IMAGE_SIZE),
      'moco.crop_scale_min': unit,
      'moco.queue_size': at_least(1),
      'moco.temperature': positive,
      'moco.ema_decay': (lambda v: 0 <= v <= 1, 'must be in [0, 1]'),
      'optim.lr': (lambda v: v >= 0, 'must be >= 0'),
      'optim.momentum': (lambda v: 0 <= v < 1, 'must be in [0, 1)'),
      'optim.weight_decay': (lambda v: v >= 0, 'must be >= 0'),
      'eval.every': at_least(1),
      'eval.knn_k': at_least(1),
      'eval.knn_temperature': positive,
      'eval.batch_size': at_least(1),
      'eval.probe_epochs': at_least(1),
      'checkpoint.every': at_least(1),
      'checkpoint.keep': at_least(1),
      'mesh.devices': (lambda v: v >= 0, 'must be >= 0 (0 = every local device)'),
      'privacy.attack_data_fraction': unit,
      'privacy.attack_val_fraction': (lambda v: 0 < v < 1, 'must be in (0, 1)'),
      'privacy.attack_epochs': at_least(1),
      'privacy.attack_batch_size': at_least(1),
      'privacy.attack_lr': positive,
      'privacy.attack_channels': at_least(1),
      'privacy.attack_test_images': at_least(1),
      'privacy.attack_seed': at_least(0),
      'privacy.ressfl_alpha': (lambda v: v >= 0, 'must be >= 0 (0 = ResSFL off)'),
      'privacy.target_ssim': (lambda v: v < 1, 'must be < 1 (SSIM is at most 1; <= 0 penalises '
                              'all of it)'),
      'privacy.attacker_channels': at_least(1),
      'privacy.attacker_lr': positive,
  }
  for name, (ok, allowed) in ranges.items():
    _rule(name, c[name], ok(c[name]), allowed)
  width_problem = resnet.width_problem(c['model.width'])
  _rule('model.width', c['model.width'], not width_problem, width_problem)
  option = c['model.bottleneck']
  _rule('model.bottleneck', option, not bottleneck.problem(option), bottleneck.problem(option))
  if option:
    hw = split.smashed_hw(c['cut_layer'], c['model.width'], c['model.image_size'],
                          c['model.depth'])
    shape_problem = bottleneck.shape_problem(option, hw)
    _rule('model.bottleneck', option, not shape_problem, shape_problem)
  # The name picks the normalisation statistics, so digits' must not reach
  # other images unnoticed, nor another dataset's reach the digits.
  if c['data.source'] == 'digits':
    _rule('data.name', c['data.name'], c['data.name'] == 'digits',
          "data.source 'digits' is scikit-learn's digits: set data.name=digits")
  else:
    _rule('data.name', c['data.name'], c['data.name'] != 'digits',
          f"that is the digits source's name, but data.source is {c['data.source']!r}: name "
          f"the dataset ({_known_names()} use the reference's normalisation statistics, any "
          "other name the training set's own)")

  if c['data.aux_source']:
    _check_aux(c)
  selection = c['init.checkpoint']
  _rule('init.checkpoint', selection, selection in ('latest', 'best') or selection.isdigit(),
        'use latest, best or a saved round')

  if c['privacy.ressfl_alpha'] > 0:
    _check_ressfl(c)

  try:
    partition.parse_hetero(c['data.hetero'], c['num_clients'])
  except sources.DataError as e:
    raise ConfigError(str(e)) from None

  # Every step writes 2 keys per valid row (1 with the asymmetric loss) into
  # the ring buffer; more keys than rows would overwrite rows written in the same step.
  pool = max(int(c['client_sample_ratio'] * c['num_clients']), 1)
  batch = c['batch_size']
  batches = _client_batches(c)
  k = 2 if moco.is_symmetric(c['moco.loss'], c['moco.version']) else 1
  if c['moco.feature_sharing']:
    need = k * rounds.most_rows(batches, pool)
    if batches.max() == batches.min():
      what = f'{k} x pool {pool} x batch_size {batch} = {need} keys: raise it or lower batch_size'
    else:
      what = (f'up to {need} keys ({k} x the batches of the pool\'s {pool} clients with the '
              'largest ones, data.hetero counted): raise it or lower batch_size')
    _rule('moco.queue_size', c['moco.queue_size'], c['moco.queue_size'] >= need,
          f'the shared queue must hold a step\'s {what}')
  else:
    per_client = c['moco.queue_size'] // c['num_clients']
    largest = int(batches.max())
    _rule('moco.queue_size', c['moco.queue_size'], per_client >= k * largest,
          f'without feature sharing each of {c["num_clients"]} clients gets {per_client} keys '
          f'but a step writes {k} x its batch, up to {k} x {largest} = {k * largest}: use at '
          f'least {k * largest * c["num_clients"]}')


def _check_aux(c: dict[str, Any]) -> None:
  """The auxiliary set's fields, as data.source's and data.name's."""
  source, name = c['data.aux_source'], c['data.aux_name']
  _rule('data.aux_source', source, source in sources.SOURCES,
        f"use '' (none) or one of {list(sources.SOURCES)}")
  _rule('data.aux_name', name, bool(name), 'must name the auxiliary dataset')
  _rule('data.aux_name', name, (name == 'digits') == (source == 'digits'),
        "the digits source goes with the name digits, and only it")


def _check_ressfl(c: dict[str, Any]) -> None:
  """ResSFL's attackers need clients that learn and smashed data they can upsample."""
  client_lr = c['optim.lr'] if c['optim.client_lr'] < 0 else c['optim.client_lr']
  _rule('privacy.ressfl_alpha', c['privacy.ressfl_alpha'], client_lr > 0,
        'ResSFL regularises the clients\' training, but their learning rate is 0 (frozen '
        'clients): set privacy.ressfl_alpha=0')
  h, w = split.smashed_hw(c['cut_layer'], c['model.width'], c['model.image_size'],
                          c['model.depth'])
  spec = bottleneck.parse(c['model.bottleneck'])
  if spec is not None:
    h, w = h // spec.stride, w // spec.stride
  try:
    decoders.upsampling_stages(h, c['model.image_size'], c['privacy.attacker'])
  except ValueError as e:
    _rule('privacy.attacker', c['privacy.attacker'], False, f'{e} (cut_layer and bottleneck)')


def _known_names() -> str:
  names = [name for name in sources.NORMALIZATION if name != 'digits']
  return ', '.join(names[:-1]) + ' and ' + names[-1]


def _client_batches(c: dict[str, Any]) -> np.ndarray:
  """Each client's batch: batch_size, times data.hetero's multiplier for the rich clients."""
  batches = np.full(c['num_clients'], c['batch_size'])
  hetero = partition.parse_hetero(c['data.hetero'], c['num_clients'])
  if hetero is not None:
    batches[:hetero.num_rich] *= hetero.batch_multiplier
  return batches


def _check_data(c: dict[str, Any], num_train_samples: int | None,
                samples_per_client: int | Sequence[int] | None) -> None:
  """Rules that need the size of the training set or of the clients' shares."""
  if num_train_samples is not None:
    kept = int(c['data.data_proportion'] * num_train_samples + 1e-9)
    # With an auxiliary set every client holds some of it (the partition checks that).
    _rule('num_clients', c['num_clients'], c['num_clients'] <= kept or c['data.aux_source'],
          f'only {kept} training samples are kept (data.data_proportion '
          f'{c["data.data_proportion"]} of {num_train_samples}): at most one client per sample')
    _rule('eval.knn_k', c['eval.knn_k'], c['eval.knn_k'] <= num_train_samples,
          f'must be at most the {num_train_samples} training samples in the kNN bank')
  if samples_per_client is not None:
    if isinstance(samples_per_client, int):
      # Only the smallest client's count is known; every client has at least batch_size.
      counts, batches = np.array([samples_per_client]), np.array([c['batch_size']])
    else:
      counts = np.asarray(samples_per_client, int)
      batches = (_client_batches(c) if c['data.hetero']
                 else np.full(counts.shape, c['batch_size']))
    short = np.flatnonzero(counts < batches)
    if short.size:
      i = short[np.argmin(counts[short])]
      who = 'the smallest client' if isinstance(samples_per_client, int) else f'client {i}'
      rich = ' (batch_size x data.hetero\'s C)' if batches[i] != c['batch_size'] else ''
      _rule('batch_size', c['batch_size'], False,
            f'{who} holds {counts[i]} samples, fewer than its batch of {batches[i]}{rich}: '
            'lower batch_size or num_clients, or raise data.data_proportion')


def _check_auto_adjust(c: dict[str, Any]) -> None:
  """What :func:`config.auto_adjust` needs before it can derive the other fields."""
  _rule('num_clients', c['num_clients'], c['num_clients'] >= 1, 'must be >= 1')
  _rule('data.data_proportion', c['data.data_proportion'], 0 < c['data.data_proportion'] <= 1,
        'must be in (0, 1]')
  _rule('auto_adjust', True, c['data.name'] in config_lib.AUTO_ADJUST_DATASETS,
        f"its rules give the reference's schedules for the 50,000-image training sets of "
        f'{" and ".join(config_lib.AUTO_ADJUST_DATASETS)}; with data.name={c["data.name"]!r} '
        'pass --config.auto_adjust=False and set batch_size, client_sample_ratio, sync_every '
        'and num_rounds')


def validate(config, *, num_train_samples: int | None = None,
             samples_per_client: int | Sequence[int] | None = None) -> None:
  """Raises :class:`ConfigError` for the first field that cannot work.

  With ``auto_adjust`` on, the values checked are those it derives
  (:func:`config.resolved`).

  Args:
    config: the run's ConfigDict (or a plain nested dict of the same fields).
    num_train_samples: size of the full training split, once it is loaded.
    samples_per_client: each client's sample count in client order (or the
      smallest one), once the data is partitioned; with data.hetero, each is
      checked against that client's own batch.

  Raises:
    ConfigError: an unknown, missing or mistyped field, a value out of range,
      an unknown enum value or a combination of fields that cannot run. The
      message names the field, its value and what is allowed, on one line.
  """
  given = _flatten(_as_dict(config))
  _check_structure(given, _flatten(config_lib.default_config().to_dict()))
  if given['auto_adjust']:
    _check_auto_adjust(given)
    given = _flatten(config_lib.resolved(ml_collections.ConfigDict(_as_dict(config))).to_dict())
  _check_values(given)
  _check_data(given, num_train_samples, samples_per_client)
