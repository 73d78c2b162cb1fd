"""The server of a run with real clients: ``python -m mocosfl_jax.serve --config=...
--workdir=DIR --listen=HOST:PORT --edge_clients=ID,ID,... --token_file=F``.

It runs the normal training loop (mocosfl_jax/train.py) with some clients
played by edge-client processes (``python -m mocosfl_jax.edge.client``) that
connect to ``--listen`` (mocosfl_jax/edge_hub.py). Client ids are the
simulation's indices, 0 to num_clients - 1. Whenever an edge client is in a
step's pool the server sends it the batch's sample ids (positions in its own
share of the partition, which ``python -m mocosfl_jax.edge.demo`` writes), takes
its smashed data instead of the simulated forward and sends its gradient
slice back; at a sync it collects its online weights, averages the clients
that reported and sends the average down. The simulated clients stay
vmapped. A client that does not answer is absent for that step (or sync),
and each round's drop-outs go into metrics.jsonl.

Restarted, the server resumes from its checkpoint, and the server's checkpoint
decides the shared model: a client that connects while the server restores its
state waits for its Welcome, and every (re)joining client loads the latest
average from it (after a restart, the checkpoint's), whatever its own
checkpoint holds. What only the client holds, its EMA model, its momentum and
its step count, comes from its own local checkpoint (or, still running, from
its memory): the steps since the server's checkpoint are trained again, and
the clients' EMA models and momenta take them twice.
Errors the user can fix print one ``error:`` line and exit with status 1.
"""
from __future__ import annotations

from mocosfl_jax import cli

if __name__ == '__main__':
  cli.stop_at_once_on_interrupt('stopped by SIGINT; run the same command again to resume '
                                'from the newest checkpoint, if any')

# pylint: disable=g-import-not-at-top,wrong-import-position
import functools
import logging
import sys
from typing import Mapping, Sequence

import jax
import numpy as np

from mocosfl_jax import checkpoint
from mocosfl_jax import train
from mocosfl_jax.config_checks import ConfigError
from mocosfl_jax.data.sources import DataError
from mocosfl_jax.export import client as client_lib
from mocosfl_jax.sfl import optim
# pylint: enable=g-import-not-at-top,wrong-import-position

log = logging.getLogger('mocosfl_jax')
ONLINE = 'online' + client_lib.SEPARATOR


def parse_ids(text: str, num_clients: int) -> list[int]:
  """``--edge_clients``'s comma-separated client indices; ConfigError when one cannot be."""
  try:
    ids = [int(part) for part in text.split(',') if part.strip()]
  except ValueError:
    raise ConfigError(f'--edge_clients={text}: give client indices such as 0,5') from None
  bad = [i for i in ids if not 0 <= i < num_clients]
  if bad or not ids or len(set(ids)) != len(ids):
    raise ConfigError(f'--edge_clients={text}: give distinct client indices from 0 to '
                      f'{num_clients - 1}')
  return sorted(ids)


def online_flat(params) -> dict[str, np.ndarray]:
  """One client's parameters as the edge clients name them (``online__stem__...``)."""
  return {ONLINE + name: np.asarray(value, np.float32)
          for name, value in client_lib.flatten(jax.device_get(params)).items()}


class EdgeRuntime:
  """The exchange of ``rounds.make_round`` for clients played through a hub.

  ``hub`` has EdgeHub's synchronous interface (mocosfl_jax/edge_hub.py);
  ``client_ids`` are the simulation's indices of the clients it plays.
  """

  def __init__(self, hub, client_ids: Sequence[int], wait_s: float = 0.0):
    self.hub = hub
    self.ids = sorted(int(i) for i in client_ids)
    self.wait_s = wait_s
    self._latest: dict[str, np.ndarray] | None = None
    self.exp = None

  def attach(self, exp) -> None:
    """Learns the run's partition, model and optimiser (train.build's experiment)."""
    c = exp.config
    multipliers = np.asarray(exp.partition.batch_multiplier)
    if multipliers.min() != multipliers.max():
      raise ConfigError('edge clients need equal client batches: turn data.hetero off')
    if c.fedavg.average_ema:
      raise ConfigError('edge clients keep their EMA models: set fedavg.average_ema=False')
    if exp.layout is not None:
      raise ConfigError('a server with edge clients runs on one device: set mesh.devices=1')
    self.exp = exp
    self.frozen = optim.frozen_clients(c.optim)
    steps = exp.steps_per_round
    self.syncs_per_round = sum((i + 1) % c.sync_every == 0 or i == steps - 1 for i in range(steps))
    # Each edge client's data is its share in partition order: global id -> position.
    self._positions = {}
    for cid in self.ids:
      share = np.asarray(exp.partition.client_indices[cid])
      positions = np.full(int(share.max()) + 1, -1, np.int64)
      positions[share[::-1]] = np.arange(len(share))[::-1]
      self._positions[cid] = positions
    image = jax.ShapeDtypeStruct((1, c.model.image_size, c.model.image_size, 3), np.float32)
    params = jax.eval_shape(exp.client_net.init, jax.random.key(0), image)['params']
    self._template = jax.eval_shape(lambda p: p, params)
    smashed = jax.eval_shape(exp.client_net.apply, {'params': params}, image)
    self.smashed_shape = (c.batch_size,) + tuple(smashed.shape[1:])

  def start(self, state) -> None:
    """Before the first round: a joining client loads the state's model (a resumed run's).

    Waits up to ``wait_s`` for every edge client to connect: one that is not
    there when asked is absent from the step, so the run would not be the
    simulation's.
    """
    self._latest = online_flat(jax.tree.map(lambda x: x[self.ids[0]], state.clients.online))
    # Every client holds the average of the state's last round (the initial
    # model before round 0): a resumed server's checkpoint decides the online
    # model of every client that (re)joins, whatever the client's own checkpoint holds.
    self.hub.set_welcome(self.welcome, round=int(state.round) - 1)
    names = [str(i) for i in self.ids]
    missing = sorted(set(names) - self.hub.wait_connected(names, self.wait_s), key=int)
    if missing:
      log.warning('edge: clients %s not connected after %g s; starting without them',
                  ', '.join(missing), self.wait_s)

  def welcome(self, client_id: str) -> Mapping[str, np.ndarray] | None:
    del client_id  # every client holds the latest average
    return self._latest

  def round(self, round_index: int, pool: np.ndarray, state) -> '_Round':
    del state
    return _Round(self, round_index, [int(i) for i in pool])

  def round_record(self) -> dict:
    """The round's drop-outs for metrics.jsonl."""
    drops = self.hub.drain_drops()
    return {'edge_drops': len(drops), 'edge_dropped': [dict(d) for d in drops]}


class _Round:
  """One round's exchanges; rows follow ``EdgeRuntime.ids``, absent clients padded."""

  def __init__(self, runtime: EdgeRuntime, round_index: int, pool: list[int]):
    self.rt = runtime
    self.round = round_index
    self.index = np.array([pool.index(cid) if cid in pool else len(pool)
                           for cid in runtime.ids], np.int32)
    self.present = self.index < len(pool)
    self.syncs_left = runtime.syncs_per_round

  def _pooled(self) -> list[tuple[int, str]]:
    return [(k, str(cid)) for k, cid in enumerate(self.rt.ids) if self.present[k]]

  def smashed(self, step: int, sample_ids: np.ndarray):
    shape = self.rt.smashed_shape
    requests = {name: self.rt._positions[self.rt.ids[k]][sample_ids[k]]
                for k, name in self._pooled()}
    replies = self.rt.hub.smashed(self.round, step, requests, shape, frozen=self.rt.frozen) \
        if requests else {}
    online = np.zeros((len(self.rt.ids),) + shape, np.float32)
    ema = np.zeros_like(online)
    answered = np.zeros(len(self.rt.ids), bool)
    for k, name in self._pooled():
      if name in replies:
        online[k], ema[k] = replies[name]
        answered[k] = True
    return online, ema, answered

  def gradients(self, step: int, grads: np.ndarray, answered: np.ndarray) -> None:
    sent = {name: grads[k] for k, name in self._pooled() if answered[k]}
    if sent:
      self.rt.hub.gradients(self.round, step, sent)

  def weights(self):
    names = [name for _, name in self._pooled()]
    template = {ONLINE + n: v.shape for n, v in client_lib.flatten(self.rt._template).items()}
    replies = self.rt.hub.weights(self.round, names) if names else {}
    rows = [jax.tree.map(lambda x: np.zeros(x.shape, np.float32), self.rt._template)
            for _ in self.rt.ids]
    reported = np.zeros(len(self.rt.ids), bool)
    for k, name in self._pooled():
      flat = {n: v for n, v in replies.get(name, {}).items() if n.startswith(ONLINE)}
      if {n: np.shape(v) for n, v in flat.items()} != template:
        if name in replies:
          log.warning('edge: client %s sent weights of another model; left out of the average',
                      name)
        continue
      rows[k] = client_lib.unflatten({n[len(ONLINE):]: v for n, v in flat.items()})
      reported[k] = True
    return jax.tree.map(lambda *r: np.stack(r), *rows), reported

  def average(self, mean) -> None:
    self.rt._latest = online_flat(mean)
    self.syncs_left -= 1
    # The round's last average goes to every client, as the simulation's
    # broadcast does: an edge client left out of the pool must not start
    # its next round from an older model.
    names = [str(cid) for cid in self.rt.ids] if self.syncs_left == 0 else \
        [name for _, name in self._pooled()]
    if names:
      self.rt.hub.average(self.round, names, self.rt._latest)


def main(argv):
  del argv
  # Imported here: the flags are defined only for the command line.
  from mocosfl_jax import edge_hub  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('mocosfl_jax').setLevel(logging.INFO)
  config = _CONFIG.value
  hub = None
  try:
    cli.check_output_dir(_WORKDIR.value, f'--workdir={_WORKDIR.value}')
    ids = parse_ids(_EDGE_CLIENTS.value, config.num_clients)
    names = [str(i) for i in ids]
    hub = edge_hub.EdgeHub(
        _LISTEN.value, edge_hub.read_tokens(_TOKEN_FILE.value, names),
        timeout_s=config.edge.timeout_s, max_message_bytes=int(config.edge.max_message_mb * 2**20),
        tls_cert=_TLS_CERT.value, tls_key=_TLS_KEY.value,
        known_ids=[str(i) for i in range(config.num_clients)], log=log.warning,
        hold_welcomes=True)
    hub.start()
    train.run(config, _WORKDIR.value, fresh=_FRESH.value,
              edge=EdgeRuntime(hub, ids, _WAIT_S.value))
  except checkpoint.Interrupted as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)
  except (cli.OutputPathError, ConfigError, DataError, checkpoint.CheckpointError,
          FloatingPointError, edge_hub.HubError) as e:
    sys.exit(f'error: {e}')
  finally:
    if hub is not None:
      hub.close()


if __name__ == '__main__':
  # pylint: disable=g-import-not-at-top
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Directory for metrics and checkpoints.')
  _FRESH = flags.DEFINE_bool('fresh', False, 'Delete the checkpoints and earlier results in '
                             '--workdir and start over instead of resuming.')
  _LISTEN = flags.DEFINE_string('listen', '127.0.0.1:50051', 'HOST:PORT the edge clients connect to.')
  _EDGE_CLIENTS = flags.DEFINE_string('edge_clients', None,
                                      'Client indices played by edge-client processes, e.g. 0,5.')
  _TOKEN_FILE = flags.DEFINE_string('token_file', None, 'File of "CLIENT_ID TOKEN" lines, one '
                                    'for each edge client.')
  _TLS_CERT = flags.DEFINE_string('tls_cert', None, 'PEM certificate of the server (with --tls_key).')
  _TLS_KEY = flags.DEFINE_string('tls_key', None, 'PEM private key of the server.')
  _WAIT_S = flags.DEFINE_float('wait_s', 60.0, 'How long to wait for the edge clients to '
                               'connect before the first round.')
  flags.mark_flags_as_required(['config', 'edge_clients', 'token_file'])
  app.run(main, flags_parser=functools.partial(cli.parse_flags, config_flag='config'))
