"""Client 0 of a run, read from its workdir with the project's checkpoint code.

After a round's closing FedAvg every client holds the same online model, so
client 0's online model, EMA model, momentum and step count are the client
to export. The selection rules and error messages are ``evaluate``'s.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mocosfl_jax import checkpoint
from mocosfl_jax import config as config_lib
from mocosfl_jax import config_checks
from mocosfl_jax import evaluate
from mocosfl_jax import train
from mocosfl_jax.evaluation import final
from mocosfl_jax.export import client as client_lib
from mocosfl_jax.models import split
from mocosfl_jax.privacy import ressfl
from mocosfl_jax.sfl import optim, state as state_lib

SELECTIONS = "latest, best or a saved round"


@dataclasses.dataclass
class Client:
  """One client's weights and where they came from."""
  config: ml_collections.ConfigDict
  online: Any
  ema: Any
  momentum: Any
  step: int
  source: dict[str, Any]
  server: Any = None  # the online server variables (head included), for init.from_workdir


def init_state(config: ml_collections.ConfigDict):
  """key -> the run's initial SimState, as ``train.Experiment.init_state`` makes it.

  Built from the config alone: reading a checkpoint needs no training data.
  """
  client_net, server_net = split.build(config)
  tx = optim.sgd(config.optim.momentum, config.optim.weight_decay)
  init = functools.partial(
      state_lib.init_state, client_net=client_net, server_net=server_net, server_tx=tx,
      client_tx=tx, num_clients=config.num_clients, image_size=config.model.image_size,
      queue_size=config.moco.queue_size, feature_sharing=config.moco.feature_sharing,
      ema_dtype=config.moco.ema_dtype)
  return lambda key: ressfl.add_attackers(init(key), key, config, client_net)


def abstract_state(config: ml_collections.ConfigDict):
  """The SimState's shapes and dtypes on the first device, as orbax restores them."""
  return train.on_device(jax.eval_shape(init_state(config), jax.random.key(0)))


def _config(meta: dict[str, Any]) -> ml_collections.ConfigDict:
  # Fields added to the code after the run keep their defaults.
  config = config_lib.default_config()
  config.update(meta['config'])
  config_checks.validate(config)
  return config


def load(workdir: str | pathlib.Path, selection: str = 'latest') -> Client:
  """Client 0 of the checkpoint ``selection`` ('latest', 'best' or a round) of ``workdir``.

  The best-kNN model keeps the online client only: its EMA starts at the
  online weights and its momentum at zero (recorded in ``source``).

  Raises:
    evaluate.EvaluationError: no such workdir or checkpoint, or an unreadable one.
    config_checks.ConfigError: the recorded config fails today's checks.
    checkpoint.CheckpointError: the best-kNN model is unreadable.
  """
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise evaluate.EvaluationError(f'no directory {workdir}')
  if selection == 'all':
    raise evaluate.EvaluationError(f'--checkpoint=all: export one model; use {SELECTIONS}')
  round_ = evaluate.selected_round(workdir, selection)
  source = {'workdir': str(workdir.absolute()), 'checkpoint': selection}
  if round_ is None:
    return _load_best(workdir, source)
  path = (workdir / checkpoint.CHECKPOINT_DIR / str(round_)).absolute()
  read = evaluate.read_checkpoint
  config = _config(read(path, meta=ocp.args.JsonRestore()).meta)
  state = read(path, state=ocp.args.StandardRestore(abstract_state(config))).state
  first = lambda tree: jax.tree.map(lambda x: np.asarray(x[0]), tree)
  c = state.clients
  step = int(c.steps[0])
  # A device keeps its EMA model in float32, whatever moco.ema_dtype stored.
  ema = jax.tree.map(lambda x: x.astype(np.float32), first(c.ema))
  return Client(config, first(c.online), ema, first(client_lib.momentum_of(c.opt)),
                step, {**source, 'round': round_, 'client_steps': step},
                jax.tree.map(np.asarray, state.server))


def _load_best(workdir: pathlib.Path, source: dict[str, Any]) -> Client:
  best = final.BestKnnModel(workdir)
  meta = best.meta()
  if meta is None:
    raise evaluate.EvaluationError(f'{workdir} holds no best-kNN model (none in {best.directory})')
  config = _config(meta)
  abstract_model = train.on_device(jax.eval_shape(final.eval_model, abstract_state(config)))
  restored = best.restore(abstract_model, config)
  if restored is None:
    raise evaluate.EvaluationError(f'{workdir} holds no best-kNN model of its own config')
  model, meta = restored
  online = jax.tree.map(np.asarray, model['client'])
  return Client(config, online, online, jax.tree.map(np.zeros_like, online), 0,
                {**source, 'round': meta['round'], 'client_steps': None,
                 'note': 'the best-kNN model keeps no EMA or momentum: '
                         'EMA = online weights, momentum = 0, step count 0'},
                jax.tree.map(np.asarray, model['server']))
