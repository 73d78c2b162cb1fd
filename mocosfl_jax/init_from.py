"""A run that starts from another run's weights: TAResSFL's stage 2 (spec 6.4).

``init.from_workdir`` names the expert's workdir (stage 1,
configs/taressfl_expert.py): its client 0 goes into every client's online
and EMA model, and with ``init.load_server`` its online server into the
server and the EMA server. The reference copies its EMA models before
loading, so they start random and drift to the loaded weights at rate 0.99
(spec 9.18); here they start at the loaded weights. Read with the export's
loader (export/workdir.py), whose selection rules are ``evaluate``'s. Only a
run that starts at round 0 loads: a resumed one restores its own checkpoint.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from mocosfl_jax import checkpoint
from mocosfl_jax import config_checks
from mocosfl_jax.sfl import optim

log = logging.getLogger('mocosfl_jax')

# The fields that make a client (and with load_server, a server) of other
# shapes or another function: they must be the expert's.
CLIENT_FIELDS = ('cut_layer', 'model.width', 'model.bottleneck', 'model.weight_standardization')
SERVER_FIELDS = ('moco.version',)


def check(config) -> None:
  """What ``config_checks.validate`` leaves to a run: frozen clients need weights to freeze.

  Not a field check: ``python -m mocosfl_jax.overhead`` prices frozen clients
  of any config.

  Raises:
    config_checks.ConfigError: the clients are frozen but load nothing.
  """
  if optim.frozen_clients(config.optim) and not config.init.from_workdir:
    raise config_checks.ConfigError(
        "config field init.from_workdir is '': frozen clients (a client learning rate of 0) "
        'would keep their random initialisation: set --config.init.from_workdir to the '
        "expert's workdir (stage 1: configs/taressfl_expert.py)")


def _field(config, name: str):
  section, _, leaf = name.rpartition('.')
  return (config[section] if section else config)[leaf]


def _differences(expert, config, fields) -> list[str]:
  return [f'{name} {_field(expert, name)!r} -> {_field(config, name)!r}' for name in fields
          if _field(expert, name) != _field(config, name)]


def _shape_difference(loaded, expected) -> str | None:
  """The first leaf whose path or shape differs, or None when the trees fit."""
  flat_loaded = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  for path in sorted(set(flat_loaded) | set(flat_expected), key=str):
    name = jax.tree_util.keystr(path)
    if path not in flat_loaded or path not in flat_expected:
      return f'{name} is only in {"the expert" if path in flat_loaded else "this run"}'
    if np.shape(flat_loaded[path]) != np.shape(flat_expected[path]):
      return f'{name} is {np.shape(flat_loaded[path])} there, {np.shape(flat_expected[path])} here'
  return None


def _fitted(loaded, expected, what: str, where: str):
  """``loaded`` as arrays of ``expected``'s dtypes; ConfigError when its shapes differ."""
  problem = _shape_difference(loaded, expected)
  if problem:
    raise config_checks.ConfigError(f'init.from_workdir {where}: its {what} does not fit this '
                                    f'run\'s: {problem}')
  return jax.tree.map(lambda x, e: np.asarray(x, e.dtype), loaded, expected)


def load_into(state, config):
  """``state`` (a run's initial SimState) with the weights ``config.init`` names.

  Raises:
    config_checks.ConfigError: the workdir or checkpoint cannot be read, or
      its models differ from this run's (the message names the fields).
  """
  # Imported here: export.workdir imports train, which imports this module.
  from mocosfl_jax import evaluate  # pylint: disable=import-outside-toplevel
  from mocosfl_jax.export import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  where, selection = config.init.from_workdir, config.init.checkpoint
  try:
    expert = workdir_lib.load(where, selection)
  except (evaluate.EvaluationError, config_checks.ConfigError, checkpoint.CheckpointError) as e:
    raise config_checks.ConfigError(f'init.from_workdir {where} (init.checkpoint={selection}): '
                                    f'{e}') from None
  fields = CLIENT_FIELDS + (SERVER_FIELDS if config.init.load_server else ())
  differences = _differences(expert.config, config, fields)
  if differences:
    raise config_checks.ConfigError(
        f'init.from_workdir {where}: its models differ from this run\'s: '
        f'{"; ".join(differences)}: set them as the expert\'s')
  client0 = jax.tree.map(lambda x: x[0], state.clients.online)
  client = _fitted(expert.online, client0, 'client model', where)
  # Separate buffers for online and EMA: a round donates both.
  every = lambda like: jax.tree.map(
      lambda x, full: jnp.array(np.broadcast_to(x, full.shape), full.dtype), client, like)
  state = state.replace(clients=state.clients.replace(online=every(state.clients.online),
                                                      ema=every(state.clients.ema)))
  loaded = 'client'
  if config.init.load_server:
    server = _fitted(expert.server, state.server, 'server model', where)
    state = state.replace(server=jax.tree.map(jnp.asarray, server),
                          server_ema=jax.tree.map(jnp.array, server))
    loaded = 'client and server'
  log.info('initialised the %s from %s (%s, round %s)', loaded, where, selection,
           expert.source['round'])
  return state
