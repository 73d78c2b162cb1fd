"""End to end: the server with edge-client processes (LiteRT, gRPC on 127.0.0.1), set up by the demo.

edge_demo_config.py's run: 6 clients, 3 a round, fixed views, one round. Its
pools are [3, 4, 5], then [0, 3, 2] and [1, 4, 0], so edge clients 3 and 4
both train in round 0, with a sync. One export and one pure simulation serve
both tests.
"""
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mocosfl_jax import edge_demo as demo
from mocosfl_jax import evaluate, train
from mocosfl_jax.config_checks import ConfigError
from mocosfl_jax.export import client as client_lib
from mocosfl_jax.export import workdir as workdir_lib

import edge_demo_config

CONFIG_FILE = str(pathlib.Path(edge_demo_config.__file__))
EDGE = (3, 4)
RUN_S = 300  # a generous bound on a server run of seconds
DIE_AFTER_CHECKPOINT = pathlib.Path(__file__).parent / 'die_after_checkpoint.py'
# LiteRT's float32 kernels against XLA's: the same arithmetic in another order.
RTOL, ATOL = 2e-4, 2e-5


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  return demo.export_model(edge_demo_config.get_config(), tmp_path_factory.mktemp('none'),
                           tmp_path_factory.mktemp('export') / demo.MODEL)


@pytest.fixture(scope='module')
def simulation(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('simulation')
  train.run(edge_demo_config.get_config(), workdir)
  return workdir


def records(workdir):
  """The rounds' records of metrics.jsonl (not the kNN at initialisation)."""
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [r for r in map(json.loads, lines) if 'loss' in r]


def final_state(workdir, config):
  path = workdir / 'checkpoints' / str(config.num_rounds)
  return evaluate.read_checkpoint(
      path, state=ocp.args.StandardRestore(workdir_lib.abstract_state(config))).state


def serve(tmp_path, exported, monkeypatch, *overrides):
  """The demo's server and edge clients, started; (setup, processes)."""
  # The server's config file imports tiny.py.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      [str(pathlib.Path(__file__).parent), os.environ.get('PYTHONPATH', '')]))
  setup = demo.prepare(edge_demo_config.get_config(), tmp_path, EDGE, model=exported)
  return setup, demo.start(setup, [f'--config={CONFIG_FILE}', *overrides], tmp_path)


def assert_close(got, want, what):
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL, err_msg=what)


def edge_weights(setup, cid, group):
  with np.load(setup.checkpoint(cid)) as archive:
    prefix = 'weight:' + group + client_lib.SEPARATOR
    return client_lib.unflatten({k[len(prefix):]: archive[k] for k in archive.files
                                 if k.startswith(prefix)})


def test_edge_processes_give_the_simulations_numbers(tmp_path, exported, simulation, monkeypatch):
  config = edge_demo_config.get_config()
  setup, processes = serve(tmp_path, exported, monkeypatch)
  assert demo.finish(processes, RUN_S) == 0, (setup.folder / 'server.log').read_text()
  assert all(p.returncode == 0 for p in processes.clients.values())
  got, want = records(tmp_path), records(simulation)
  assert [r.get('edge_drops') for r in got] == [0] * config.num_rounds
  np.testing.assert_allclose([r['loss'] for r in got], [r['loss'] for r in want], rtol=RTOL)
  served, pure = final_state(tmp_path, config), final_state(simulation, config)
  assert_close(served.server['params'], pure.server['params'], 'server')
  assert_close(served.queue.keys, pure.queue.keys, 'queue')
  # After the round's FedAvg every client, simulated or not, holds the average.
  assert_close(served.clients.online, pure.clients.online, 'clients')
  simulated = np.asarray([i for i in range(config.num_clients) if i not in EDGE])
  assert_close(jax.tree.map(lambda x: x[simulated], served.clients.ema),
               jax.tree.map(lambda x: x[simulated], pure.clients.ema), 'simulated EMA')
  for cid in EDGE:
    row = lambda tree: jax.tree.map(lambda x: x[cid], tree)
    assert_close(edge_weights(setup, cid, 'online'), row(pure.clients.online), f'edge {cid}')
    assert_close(edge_weights(setup, cid, 'ema'), row(pure.clients.ema), f'edge {cid} EMA')


def wait_for(done, processes, what):
  """Polls ``done()`` until it holds; fails if the server exits first or after RUN_S."""
  deadline = time.monotonic() + RUN_S
  while not done():
    assert processes.server.poll() is None, (what, read_log(processes, 'server'))
    assert time.monotonic() < deadline, f'no {what} after {RUN_S} s'
    with pytest.raises(subprocess.TimeoutExpired):  # the server waits for its clients
      processes.server.wait(0.05)


def read_log(processes, name):
  for log in processes.logs:
    if not log.closed:
      log.flush()
  return (pathlib.Path(processes.logs[0].name).parent / f'{name}.log').read_text()


def relaunch(processes, command, name):
  """``command`` started again, its output appended to ``name``'s log."""
  processes.logs.append(open(pathlib.Path(processes.logs[0].name).parent / f'{name}.log', 'a'))
  return subprocess.Popen(command, stdout=processes.logs[-1], stderr=subprocess.STDOUT)


def test_killed_clients_and_a_killed_server_restart_and_the_run_finishes(tmp_path, exported,
                                                                         monkeypatch):
  """Client 4 (pools [3, 4, 5], [0, 3, 2], [1, 4, 0]) dies right after its
  checkpoint at round 0's first sync and drops out of round 0; the server dies
  right after its checkpoint of round 1 (die_after_checkpoint.py). Both
  restart with their commands: the server resumes from its checkpoint, client
  3, still running, reconnects, and client 4 resumes from its own checkpoint
  and trains in round 2.
  """
  overrides = ['--config.num_rounds=3', '--config.edge.timeout_s=5']
  client_command, server_command = demo.client_command, demo.server_command
  dying = lambda command, *args: [sys.executable, str(DIE_AFTER_CHECKPOINT), *args,
                                  *command[command.index('-m') + 2:]]
  # demo.start's commands; the restarts below use the real ones.
  monkeypatch.setattr(demo, 'client_command', lambda setup, cid, port: (
      dying(client_command(setup, cid, port), 'client') if cid == 4
      else client_command(setup, cid, port)))
  monkeypatch.setattr(demo, 'server_command', lambda *args: dying(server_command(*args),
                                                                   'server', '1'))
  setup, processes = serve(tmp_path, exported, monkeypatch, *overrides)
  wait_for(lambda: processes.clients[4].poll() is not None, processes, "client 4's exit")
  assert processes.clients[4].returncode == 137, read_log(processes, 'client_4')
  with np.load(setup.checkpoint(4)) as archive:
    steps = int(archive['steps'])
  assert processes.server.wait(RUN_S) == 137, read_log(processes, 'server')
  processes.server = relaunch(processes, server_command(
      [f'--config={CONFIG_FILE}', *overrides], tmp_path, setup, processes.port), 'server')
  processes.clients[4] = relaunch(processes, client_command(setup, 4, processes.port),
                                  'client_4')

  assert demo.finish(processes, RUN_S) == 0, read_log(processes, 'server')
  assert [p.returncode for p in processes.clients.values()] == [0, 0]
  assert 'resuming from the checkpoint of round 1 ' in read_log(processes, 'server')
  assert 'edge client 3: connection lost' in read_log(processes, 'client_3')
  # Even those that reconnected while the server restored its state: the server's model.
  for cid in EDGE:
    joins = re.findall(r'connected \(step \d+(.*)\)', read_log(processes, f'client_{cid}'))
    assert len(joins) == 2 and set(joins) == {', loaded the server weights'}, joins
  assert steps > 0 and f'edge client 4: step {steps}, connecting' in read_log(processes, 'client_4')
  got = records(tmp_path)
  assert [r['round'] for r in got] == [1, 2, 3]
  assert {d['client_id'] for r in got for d in r.get('edge_dropped', [])} == {'4'}


def test_bad_edge_client_counts_are_one_line_errors():
  with pytest.raises(ConfigError, match='--edge_clients=7: give a number of edge clients from 1 '
                     'to 6'):
    demo.edge_ids(7, None, 6)
  assert demo.edge_ids(2, None, 6) == [0, 1]
  assert demo.edge_ids(None, '4,1', 6) == [1, 4]
  assert demo.config_arguments(['--config', 'f.py', '--workdir=x', '--config.seed=1']) == [
      '--config', 'f.py', '--config.seed=1']


def test_the_edge_package_command_hands_over_to_the_server_side_demo(tmp_path):
  """mocosfl_jax/edge/demo.py (jax-free) runs edge_demo.py with its arguments and status."""
  done = subprocess.run(
      [sys.executable, '-m', 'mocosfl_jax.edge.demo', f'--config={CONFIG_FILE}',
       f'--workdir={tmp_path / "run"}', '--edge_clients=9'],
      cwd=pathlib.Path(__file__).parent, capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [
      'error: --edge_clients=9: give a number of edge clients from 1 to 6 (or --edge_ids)']
