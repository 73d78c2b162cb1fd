"""A run with real clients on one machine: ``python -m mocosfl_jax.edge.demo
--config=... --workdir=DIR --edge_clients=N``.

A server-side tool (it imports JAX), so it lives outside ``mocosfl_jax/edge``,
which runs on devices without JAX; ``mocosfl_jax/edge/demo.py`` only hands
its command line over to this module. It prepares and starts what the
README's "Running real clients" section otherwise starts by hand.

1. Exports the client model (``DIR/edge/client.tflite`` and its sidecar) from
   the run's initial state, or from DIR's newest checkpoint when there is one
   (then the server resumes from it).
2. Writes each edge client's share of the training data to
   ``DIR/edge/client_ID.npz`` (the npz source format, PNG-encoded so the
   images stay exact), in the partition's order: the server asks for
   positions within that share.
3. Writes fresh tokens: ``DIR/edge/tokens`` for the server, ``client_ID.token``
   for each client, readable by their owner only.
4. Starts ``python -m mocosfl_jax.serve`` on 127.0.0.1 with a free port and
   one ``python -m mocosfl_jax.edge.client`` process per edge client, their
   output going to ``DIR/edge/server.log`` and ``DIR/edge/client_ID.log``.

The edge clients are client ids 0 to N - 1, or those of ``--edge_ids``. The
demo exits with the server's status, after ending clients still running.
Errors the user can fix print one ``error:`` line and exit with status 1.
"""
from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import secrets
import socket
import subprocess
import sys
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from mocosfl_jax import checkpoint
from mocosfl_jax import init_from
from mocosfl_jax import train
from mocosfl_jax.config_checks import ConfigError
from mocosfl_jax.export import exporter
from mocosfl_jax.export import workdir as workdir_lib

EDGE_DIR = 'edge'
MODEL = 'client.tflite'
# How long clients may take to finish after the server did (they get Done first).
CLIENT_GRACE_S = 10.0


@dataclasses.dataclass
class Setup:
  """The files of a demo: what the server and each edge client are given."""
  folder: pathlib.Path
  model: pathlib.Path
  ids: list[int]
  data: dict[int, pathlib.Path]
  tokens: pathlib.Path  # the server's token file
  client_tokens: dict[int, pathlib.Path]

  def checkpoint(self, cid: int) -> pathlib.Path:
    """The edge client's local checkpoint."""
    return self.folder / f'client_{cid}.ckpt.npz'


@dataclasses.dataclass
class Processes:
  """The running demo: the server, the edge clients by id, their log files and the port."""
  server: subprocess.Popen
  clients: dict[int, subprocess.Popen]
  logs: list
  port: int


def edge_ids(count: int | None, ids: str | None, num_clients: int) -> list[int]:
  """The edge clients: ``ids`` (comma-separated) if given, else the first ``count``."""
  if ids:
    from mocosfl_jax import serve  # pylint: disable=import-outside-toplevel
    return serve.parse_ids(ids, num_clients)
  if count is None or not 1 <= count <= num_clients:
    raise ConfigError(f'--edge_clients={count}: give a number of edge clients from 1 to '
                      f'{num_clients} (or --edge_ids)')
  return list(range(count))


def export_model(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                 out: str | pathlib.Path) -> pathlib.Path:
  """Exports client 0 of ``workdir``'s newest checkpoint, else of the run's initial state."""
  workdir = pathlib.Path(workdir)
  if (workdir / checkpoint.CHECKPOINT_DIR).is_dir() and any(
      (workdir / checkpoint.CHECKPOINT_DIR).iterdir()):
    client = workdir_lib.load(workdir, 'latest')
    exporter.export_client(client.config, client.online, client.ema, client.momentum, out,
                           batch=client.config.batch_size, step=client.step,
                           source=client.source)
    return pathlib.Path(out)
  init_key, _ = jax.random.split(jax.random.key(config.seed))  # train.run's
  state = jax.jit(workdir_lib.init_state(config))(init_key)
  if config.init.from_workdir:
    state = init_from.load_into(state, config)
  first = lambda tree: jax.tree.map(lambda x: np.asarray(x[0]), tree)
  c = state.clients
  exporter.export_client(config, first(c.online),
                         jax.tree.map(lambda x: x.astype(np.float32), first(c.ema)),
                         jax.tree.map(np.zeros_like, first(c.online)), out,
                         batch=config.batch_size, source={'note': 'the initial state'})
  return pathlib.Path(out)


def write_share(images: np.ndarray, labels: np.ndarray, path: pathlib.Path) -> None:
  """``images`` (uint8 NHWC) as an npz in the npz source format, PNG-encoded (lossless)."""
  encoded = []
  for image in images:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG')
    encoded.append(np.frombuffer(buffer.getvalue(), np.uint8))
  offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
  classes = np.array([str(c) for c in range(int(labels.max()) + 1)])
  np.savez(path, jpeg=np.concatenate(encoded), offsets=offsets,
           labels=np.asarray(labels, np.int64), classes=classes)


def write_private(path: pathlib.Path, text: str) -> None:
  """``text`` to ``path``, readable and writable by its owner only."""
  if path.exists():
    path.unlink()
  handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  with os.fdopen(handle, 'w') as f:
    f.write(text)


def prepare(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, ids: Sequence[int],
            model: str | pathlib.Path | None = None) -> Setup:
  """Writes the model (unless ``model`` is given), the clients' data and fresh tokens."""
  folder = pathlib.Path(workdir) / EDGE_DIR
  folder.mkdir(parents=True, exist_ok=True)
  exp = train.build(config)
  ids = sorted(int(i) for i in ids)
  data = {}
  for cid in ids:
    share = np.asarray(exp.partition.client_indices[cid])
    data[cid] = folder / f'client_{cid}.npz'
    write_share(exp.train.images[share], exp.train.labels[share], data[cid])
  tokens = {cid: secrets.token_urlsafe(32) for cid in ids}
  client_tokens = {cid: folder / f'client_{cid}.token' for cid in ids}
  for cid, token in tokens.items():
    write_private(client_tokens[cid], token + '\n')
  write_private(folder / 'tokens', ''.join(f'{cid} {token}\n' for cid, token in tokens.items()))
  if model is None:
    model = export_model(config, workdir, folder / MODEL)
  return Setup(folder, pathlib.Path(model), ids, data, folder / 'tokens', client_tokens)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def server_command(config_args: Sequence[str], workdir, setup: Setup, port: int) -> list[str]:
  return [sys.executable, '-m', 'mocosfl_jax.serve', *config_args, f'--workdir={workdir}',
          f'--listen=127.0.0.1:{port}', f'--edge_clients={",".join(map(str, setup.ids))}',
          f'--token_file={setup.tokens}']


def client_command(setup: Setup, cid: int, port: int) -> list[str]:
  return [sys.executable, '-m', 'mocosfl_jax.edge.client', f'--server=127.0.0.1:{port}',
          f'--client_id={cid}', f'--token_file={setup.client_tokens[cid]}',
          f'--model={setup.model}', f'--data={setup.data[cid]}',
          f'--checkpoint={setup.checkpoint(cid)}']


def wait_listening(port: int, server: subprocess.Popen) -> None:
  """Returns once 127.0.0.1:``port`` accepts connections or ``server`` has exited."""
  while server.poll() is None:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      return
    except OSError:
      try:
        server.wait(0.1)
      except subprocess.TimeoutExpired:
        pass


def start(setup: Setup, config_args: Sequence[str], workdir, port: int | None = None,
          server_args: Sequence[str] = ()) -> Processes:
  """Starts the server and the edge clients, each writing to its log in ``setup.folder``."""
  port = port or free_port()
  logs = []

  def launch(command, name):
    logs.append(open(setup.folder / f'{name}.log', 'w'))  # pylint: disable=consider-using-with
    return subprocess.Popen(command, stdout=logs[-1], stderr=subprocess.STDOUT)

  server = launch(server_command(config_args, workdir, setup, port) + list(server_args), 'server')
  # Started before the server listens, the clients would back off for seconds.
  wait_listening(port, server)
  clients = {cid: launch(client_command(setup, cid, port), f'client_{cid}') for cid in setup.ids}
  return Processes(server, clients, logs, port)


def finish(processes: Processes, timeout_s: float | None = None) -> int:
  """Waits for the server; ends the clients that outlive it by ``CLIENT_GRACE_S``; its status."""
  try:
    status = processes.server.wait(timeout_s)
  finally:
    if processes.server.poll() is None:
      processes.server.kill()
      processes.server.wait()
    deadline = time.monotonic() + CLIENT_GRACE_S
    for client in processes.clients.values():
      try:
        client.wait(max(deadline - time.monotonic(), 0))
      except subprocess.TimeoutExpired:
        client.kill()
        client.wait()
    for log in processes.logs:
      log.close()
  return status


def config_arguments(argv: Sequence[str]) -> list[str]:
  """The ``--config`` and ``--config.FIELD`` arguments of ``argv``, for the server."""
  picked = []
  for i, arg in enumerate(argv):
    if arg.startswith('--config'):
      picked.append(arg)
      if '=' not in arg and i + 1 < len(argv):
        picked.append(argv[i + 1])
  return picked


def main(argv):
  del argv  # what absl left: the flags, the server's among them, are taken out
  from mocosfl_jax import cli  # pylint: disable=import-outside-toplevel
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    cli.check_output_dir(workdir, f'--workdir={workdir}')
    ids = edge_ids(_EDGE_CLIENTS.value, _EDGE_IDS.value, config.num_clients)
    setup = prepare(config, workdir, ids)
  except (cli.OutputPathError, ConfigError, ValueError, OSError,
          checkpoint.CheckpointError) as e:  # DataError, ExportError, EvaluationError: ValueErrors
    sys.exit(f'error: {e}')
  config_args = config_arguments(sys.argv[1:])
  processes = start(setup, config_args, workdir)
  print(f'demo: server and edge clients {", ".join(map(str, ids))} started; logs in '
        f'{setup.folder}', flush=True)
  try:
    status = finish(processes)
  except KeyboardInterrupt:
    processes.server.terminate()
    status = finish(processes)
  print(f'demo: the server exited with status {status}; see {setup.folder / "server.log"}')
  sys.exit(status)


if __name__ == '__main__':
  # pylint: disable=g-import-not-at-top
  import functools
  from absl import app, flags
  from ml_collections import config_flags
  from mocosfl_jax import cli as cli_lib
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', 'runs/edge_demo', 'Directory of the run.')
  _EDGE_CLIENTS = flags.DEFINE_integer('edge_clients', None,
                                       'Number of edge clients: client ids 0 to N - 1.')
  _EDGE_IDS = flags.DEFINE_string('edge_ids', None, 'Client ids of the edge clients, e.g. 1,4 '
                                  '(instead of --edge_clients).')
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=functools.partial(cli_lib.parse_flags, config_flag='config'))
