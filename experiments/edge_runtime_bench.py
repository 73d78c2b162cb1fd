"""The edge runtime on loopback: bytes per client, added step latency, client RSS, throughput.

    python experiments/edge_runtime_bench.py --out experiments/results/edge_runtime_bench_cpu.json

Two parts:

- ``wire``: the paper's Table 1 settings (cut 2, batch 1, 200 epochs of 50
  images: 10,000 steps a client), TAResSFL with C4S2 (frozen: smashed data
  up only) and plain MocoSFL-3 (no bottleneck, a sync every 50 steps). A
  Runner (mocosfl_jax/edge/remote.py) over a stand-in client of the model's
  smashed and weight shapes serves an in-process EdgeHub over gRPC on
  127.0.0.1 for ``--wire_steps`` steps: the bytes depend on the shapes only.
  Measured per step and per sync, then scaled to the 10,000 steps, beside
  mocosfl_jax/overhead.py's explicit accounting and the paper's formula (39.06
  MB for TAResSFL).
- ``run``: the server's training loop (train.build with serve.EdgeRuntime)
  in this process with a 1/16-width cut-1 model, 16 clients, all in every
  step's pool, and 0, 1, 4 and 16 of them played by real edge-client
  processes (``python -m mocosfl_jax.edge.client``, LiteRT, one thread each)
  started once and kept connected. The settings take turns round by round,
  so that all see the same drift of the machine's load. Per setting: the
  median round and step (a step with no sync) after a warm-up round, the
  time the loop waits in the exchange (the clients' forward and the
  transport), the bytes each edge client sent and received. 0 is measured
  twice: the pure simulation, and before the clients start, the exchange
  path with its one edge client not connected (what the host loop costs by
  itself). The edge clients' peak RSS (VmHWM) is read from /proc before they
  exit.

Bytes come from EdgeHub.traffic (serialized protobuf, by message) plus
gRPC's 5-byte prefix a message; ``tcp_*`` are the client sockets' TCP
payload bytes from ``ss`` (HTTP/2 frames, settings and pings included). The
edge clients share the server's cores, so on a small machine the added
latency is an upper bound. Takes about 7 minutes on 2 busy cores, most of
it exporting and compiling (``--tiny``: edge clients 0, 1, 2, one measured
round and 50 wire steps, a smoke test).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_file  # noqa: E402
from mocosfl_jax.edge import remote  # noqa: E402
from mocosfl_jax.edge_hub import EdgeHub, read_tokens  # noqa: E402

GRPC_PREFIX = 5  # gRPC's length prefix: a compressed flag and 4 bytes of length
MB = 2 ** 20
PAPER_STEPS = 200 * 50  # Table 1: 200 epochs of 50 images at batch 1
PAPER_SYNC_EVERY = 50  # a sync an epoch
TABLE1 = {'TAResSFL C4S2 cut 2': {'bottleneck': 'C4S2', 'frozen': True, 'paper_mb': 39.1},
          'MocoSFL-3 cut 2': {'bottleneck': '', 'frozen': False, 'paper_mb': 5057.9}}
TOKEN = 'bench-token'


# ---------------------------------------------------------------------------
# Bytes.


class ShapeClient:
  """What remote.Runner needs of an EdgeClient, with a model's shapes and zeros for values."""

  def __init__(self, smashed_shape: tuple, shapes: dict[str, tuple]):
    self.batch = smashed_shape[0]
    self.model = type('Shapes', (), {'smashed_shape': tuple(smashed_shape[1:])})()
    self._smashed = np.zeros(smashed_shape, np.float32)
    self._weights = {f'{group}__{name}': np.zeros(shape, np.float32)
                     for group in ('online', 'ema') for name, shape in shapes.items()}
    self.round, self.steps, self.step_in_progress = -1, 0, False

  def forward(self, ids):
    del ids
    self.step_in_progress = True
    return self._smashed, self._smashed

  def end_step(self, advance: bool) -> None:
    self.steps += int(advance)
    self.step_in_progress = False

  def apply_gradient(self, grad, round_index: int) -> None:
    del grad, round_index
    self.end_step(advance=True)

  def get_weights(self) -> dict:
    return dict(self._weights)

  def set_weights(self, weights) -> None:
    del weights


def wire_bytes(traffic: dict) -> dict:
  """{way: {body: bytes with gRPC's prefix}} of one client's EdgeHub.traffic."""
  return {way: {body: c['bytes'] + GRPC_PREFIX * c['messages'] for body, c in bodies.items()}
          for way, bodies in traffic.items()}


def tcp_bytes(port: int) -> dict[int, tuple[int, int]]:
  """{pid: (sent, received)} of the TCP sockets on 127.0.0.1 that connect to ``port``."""
  out = subprocess.run(['ss', '-tinpH', 'dst', f'127.0.0.1:{port}'], capture_output=True,
                       text=True, check=False).stdout
  result = {}
  for block in re.split(r'\n(?=\S)', out):
    pid = re.search(r'pid=(\d+)', block)
    if pid:
      sent, received = (re.search(rf'{field}:(\d+)', block) for field in ('bytes_sent',
                                                                          'bytes_received'))
      old = result.get(int(pid.group(1)), (0, 0))
      result[int(pid.group(1))] = (old[0] + int(sent.group(1) if sent else 0),
                                   old[1] + int(received.group(1) if received else 0))
  return result


def measure_wire(smashed_shape: tuple, shapes: dict[str, tuple], steps: int, sync_every: int,
                 frozen: bool) -> dict:
  """One client's bytes over ``steps`` steps (and their syncs) through a real EdgeHub.

  ``shapes``: {name: shape} of the client model's parameters (as
  export.client.flatten names them); the client sends its online and EMA
  models at a sync, as the edge client does. Returns the per-message totals
  (``wire``, gRPC prefix included), the connection's (Hello, Welcome with the
  model) apart, and the client socket's TCP payload bytes. Sample ids,
  rounds and steps are like the paper's run's (varints: their size depends on
  them by a byte or two).
  """
  batch = smashed_shape[0]
  model = {f'online__{name}': np.zeros(shape, np.float32) for name, shape in shapes.items()}
  with EdgeHub('127.0.0.1:0', {'0': TOKEN}, timeout_s=60, log=lambda line: None) as hub:
    hub.set_welcome(lambda cid: model)
    runner = remote.Runner(ShapeClient(smashed_shape, shapes), '0', TOKEN,
                           log=lambda line: None)
    thread = threading.Thread(target=runner.serve, args=(hub.address,), daemon=True)
    thread.start()
    if hub.wait_connected({'0'}, 60) != {'0'}:
      raise RuntimeError('the stand-in client did not connect')
    connection = wire_bytes(hub.traffic(reset=True)['0'])
    port = int(hub.address.rsplit(':', 1)[1])
    tcp_start = tcp_bytes(port).get(os.getpid(), (0, 0))
    grad = np.zeros(smashed_shape, np.float32)
    for i in range(steps):
      round_, step = 100 + i // PAPER_SYNC_EVERY, i % PAPER_SYNC_EVERY
      ids = np.arange(batch) + 37  # positions within the paper's 50 images
      if not hub.smashed(round_, step, {'0': ids}, smashed_shape, frozen=frozen):
        raise RuntimeError(f'step {i}: the stand-in client dropped: {hub.drain_drops()}')
      if frozen:
        continue
      hub.gradients(round_, step, {'0': grad})
      if (i + 1) % sync_every == 0:
        hub.weights(round_, ['0'])
        hub.average(round_, ['0'], model)
    traffic = wire_bytes(hub.traffic(reset=True)['0'])
    tcp_end = tcp_bytes(port).get(os.getpid(), (0, 0))
  thread.join(60)
  return {'steps': steps, 'syncs': 0 if frozen else steps // sync_every,
          'connection': connection, 'wire': traffic,
          'tcp_sent': tcp_end[0] - tcp_start[0], 'tcp_received': tcp_end[1] - tcp_start[1]}


def per_step_and_sync(measured: dict) -> dict:
  """Measured bytes a step and a sync by message, up and down."""
  steps, syncs = measured['steps'], max(measured['syncs'], 1)
  up, down = measured['wire']['up'], measured['wire']['down']
  return {'per_step': {'smashed_up': up.get('smashed', 0) / steps,
                       'step_request_down': down.get('step_request', 0) / steps,
                       'gradient_down': down.get('gradient', 0) / steps},
          'per_sync': {'weights_up': up.get('weights', 0) / syncs,
                       'weights_request_down': down.get('weights_request', 0) / syncs,
                       'average_down': down.get('average', 0) / syncs}}


def table1(wire_steps: int) -> dict:
  """Table 1's rows measured over ``wire_steps`` steps, scaled to the paper's 10,000."""
  import jax  # pylint: disable=import-outside-toplevel
  from mocosfl_jax import overhead  # pylint: disable=import-outside-toplevel
  from mocosfl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from mocosfl_jax.export import client as client_lib  # pylint: disable=import-outside-toplevel
  from mocosfl_jax.models import split  # pylint: disable=import-outside-toplevel
  rows = {}
  for name, row in TABLE1.items():
    c = config_lib.default_config()
    c.cut_layer, c.model.bottleneck, c.data.name = 2, row['bottleneck'], 'cifar10'
    net, _ = split.build(c)
    image = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
    params = jax.eval_shape(net.init, jax.random.key(0), image)
    smashed = jax.eval_shape(net.apply, params, image).shape
    shapes = {n: v.shape for n, v in client_lib.flatten(params['params']).items()}
    num_params = sum(int(np.prod(shape)) for shape in shapes.values())
    steps = max(wire_steps, PAPER_SYNC_EVERY) if not row['frozen'] else wire_steps
    measured = measure_wire(smashed, shapes, steps, PAPER_SYNC_EVERY, row['frozen'])
    rates = per_step_and_sync(measured)
    syncs = 0 if row['frozen'] else PAPER_STEPS // PAPER_SYNC_EVERY
    up = (PAPER_STEPS * rates['per_step']['smashed_up'] + syncs * rates['per_sync']['weights_up']
          + sum(measured['connection']['up'].values()))
    down = (PAPER_STEPS * (rates['per_step']['step_request_down']
                           + rates['per_step']['gradient_down'])
            + syncs * (rates['per_sync']['weights_request_down']
                       + rates['per_sync']['average_down'])
            + sum(measured['connection']['down'].values()))
    explicit = overhead.communication_per_client(
        rounds=200, pool_size=1, num_clients=1, steps_per_round=50, batch_size=1,
        smashed_floats=int(np.prod(smashed[1:])), client_params=num_params,
        sync_every=PAPER_SYNC_EVERY, frozen=row['frozen'])
    tensor = 4 * int(np.prod(smashed))
    rows[name] = {
        'smashed_shape': list(smashed), 'client_params': num_params, 'frozen': row['frozen'],
        'measured_steps': measured['steps'], 'measured_syncs': measured['syncs'],
        **rates, 'connection_bytes': measured['connection'],
        'framing_bytes_per_smashed_message': rates['per_step']['smashed_up'] - 2 * tensor,
        'tcp_bytes_per_step': {'up': measured['tcp_sent'] / measured['steps'],
                               'down': measured['tcp_received'] / measured['steps']},
        'run_steps': PAPER_STEPS, 'run_syncs': syncs,
        'run_mb': {'up': up / MB, 'down': down / MB, 'total': (up + down) / MB},
        'run_tcp_mb': (measured['tcp_sent'] + measured['tcp_received'])
        / measured['steps'] * PAPER_STEPS / MB,
        'explicit_mb': {'up': explicit['upload_mb'], 'down': explicit['download_mb'],
                        'total': explicit['total_mb'], 'per_step': explicit['per_step'],
                        'per_sync': explicit['per_sync']},
        'paper_formula_mb': explicit['paper_formula']['total_mb'],
        'paper_table1_mb': row['paper_mb'],
    }
    print(f'{name}: {rows[name]["run_mb"]["total"]:,.2f} MB measured over the run, '
          f'{explicit["total_mb"]:,.2f} MB explicit, paper {row["paper_mb"]} MB', flush=True)
  return rows


# ---------------------------------------------------------------------------
# The server with real edge clients.


def run_config(num_clients: int, steps_per_round: int, sync_every: int):
  from mocosfl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.default_config()
  c.update_from_flattened_dict({
      'num_clients': num_clients, 'client_sample_ratio': 1.0, 'noniid_ratio': 0.2,
      'batch_size': 2, 'cut_layer': 1, 'steps_per_round': steps_per_round,
      'sync_every': sync_every, 'data.source': 'digits', 'data.name': 'digits',
      'model.width': 0.0625, 'moco.version': 'smallV2', 'moco.queue_size': 64,
      'round_impl': 'loop'})
  return c


class _TimedRound:
  """A serve._Round whose exchanges are timed into ``events`` (name, step, start, end)."""

  def __init__(self, inner, events: list):
    self._inner, self._events = inner, events
    self.index, self.present = inner.index, inner.present

  def _timed(self, name, step, fn, *args):
    tick = time.perf_counter()
    result = fn(*args)
    self._events.append((name, step, tick, time.perf_counter()))
    return result

  def smashed(self, step, sample_ids):
    return self._timed('smashed', step, self._inner.smashed, step, sample_ids)

  def gradients(self, step, grads, answered):
    return self._timed('gradients', step, self._inner.gradients, step, grads, answered)

  def weights(self):
    return self._timed('weights', None, self._inner.weights)

  def average(self, mean):
    return self._timed('average', None, self._inner.average, mean)


def timed_runtime(hub, ids):
  from mocosfl_jax import serve  # pylint: disable=import-outside-toplevel

  class TimedRuntime(serve.EdgeRuntime):
    """EdgeRuntime recording, round by round, when each exchange started and ended."""

    def __init__(self, hub, client_ids):
      super().__init__(hub, client_ids)
      self.rounds: list[list] = []

    def round(self, round_index, pool, state):
      self.rounds.append([])
      return _TimedRound(super().round(round_index, pool, state), self.rounds[-1])

  return TimedRuntime(hub, ids)


def step_times(events: list) -> dict:
  """A round's steps with no sync (from one smashed data request to the next), exchange, sync."""
  starts = [(e[1], e[2]) for e in events if e[0] == 'smashed']
  syncs = [e for e in events if e[0] in ('weights', 'average')]
  steps, exchange = [], []
  for (step, start), (_, end) in zip(starts, starts[1:]):
    if not any(start <= s[2] < end for s in syncs):
      steps.append(end - start)
      exchange.append(sum(e[3] - e[2] for e in events
                          if e[0] in ('smashed', 'gradients') and e[1] == step))
  sync = [sum(e[3] - e[2] for e in syncs[i:i + 2]) for i in range(0, len(syncs), 2)]
  return {'steps': steps, 'exchange': exchange, 'sync': sync}


class Setting:
  """One setting of the run part: its experiment and state, and what its rounds measured."""

  def __init__(self, name: str, edge: int, exp, runtime=None):
    import jax  # pylint: disable=import-outside-toplevel
    self.name, self.edge, self.exp, self.runtime = name, edge, exp, runtime
    self.state = exp.init_state(jax.random.key(0))
    if runtime is not None:
      runtime.rounds.clear()
      runtime.start(self.state)
    self.data = exp.client_data()
    self.times: list[float] = []
    self.traffic: dict = {}
    self.tcp: dict[int, list[int]] = {}

  def round(self, hub=None, port: int = 0, pids=()) -> None:
    """One round, timed; with ``hub``, its edge clients' bytes added up."""
    import jax  # pylint: disable=import-outside-toplevel
    if hub is not None:
      hub.traffic(reset=True)
      before = tcp_bytes(port)
    tick = time.perf_counter()
    self.state, metrics = self.exp.run_round(self.state, self.data,
                                             jax.random.key(len(self.times) + 1))
    jax.block_until_ready((self.state, metrics))
    self.times.append(time.perf_counter() - tick)
    if hub is None:
      return
    for pid, delta in zip(pids, tcp_delta(before, tcp_bytes(port), pids)):
      self.tcp[pid] = [a + b for a, b in zip(self.tcp.get(pid, [0, 0]), delta)]
    for cid, ways in hub.traffic().items():
      for way, bodies in ways.items():
        for body, count in bodies.items():
          total = self.traffic.setdefault(cid, {'up': {}, 'down': {}})[way].setdefault(
              body, {'messages': 0, 'bytes': 0})
          total['messages'] += count['messages']
          total['bytes'] += count['bytes']


def time_rounds(exp, runtime, rounds: int) -> list[float]:
  """Seconds of each of ``rounds`` rounds from a fresh state (the first compiles)."""
  import jax  # pylint: disable=import-outside-toplevel
  state = exp.init_state(jax.random.key(0))
  if runtime is not None:
    runtime.rounds.clear()
    runtime.start(state)
  data = exp.client_data()
  times = []
  for r in range(rounds):
    tick = time.perf_counter()
    state, metrics = exp.run_round(state, data, jax.random.key(r + 1))
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - tick)
  return times


def summarise(name: str, edge: int, connected: int, times: list[float], exp,
              runtime=None, traffic=None, tcp=None) -> dict:
  measured = times[1:]  # the first round compiles
  steps = exp.steps_per_round
  round_s = statistics.median(measured)
  record = {'setting': name, 'edge_clients': edge, 'connected': connected,
            'round_seconds': measured, 'round_median_s': round_s,
            'steps_per_s': steps / round_s,
            'images_per_s': steps * exp.pool_size * exp.config.batch_size / round_s}
  if runtime is not None:
    parts = [step_times(events) for events in runtime.rounds[1:]]
    flat = lambda key: [x for p in parts for x in p[key]]
    record.update(step_median_s=statistics.median(flat('steps')),
                  exchange_median_s=statistics.median(flat('exchange')),
                  sync_exchange_median_s=statistics.median(flat('sync')) if flat('sync') else None)
  if traffic:
    all_steps = len(times) * steps
    syncs = len(times) * -(-steps // exp.config.sync_every)
    per_client = [wire_bytes(traffic[cid]) for cid in sorted(traffic)]
    mean = lambda way, body: float(np.mean([c[way].get(body, 0) for c in per_client]))
    record['bytes_per_client'] = {
        'per_step': {'smashed_up': mean('up', 'smashed') / all_steps,
                     'step_request_down': mean('down', 'step_request') / all_steps,
                     'gradient_down': mean('down', 'gradient') / all_steps},
        'per_sync': {'weights_up': mean('up', 'weights') / syncs,
                     'weights_request_down': mean('down', 'weights_request') / syncs,
                     'average_down': mean('down', 'average') / syncs},
        'run': {'up': float(np.mean([sum(c['up'].values()) for c in per_client])),
                'down': float(np.mean([sum(c['down'].values()) for c in per_client]))},
        'steps': all_steps, 'syncs': syncs}
  if tcp:
    record['tcp_bytes_per_client'] = {'up': float(np.mean([t[0] for t in tcp])),
                                      'down': float(np.mean([t[1] for t in tcp]))}
  printed = {k: v for k, v in record.items() if k not in ('round_seconds', 'bytes_per_client')}
  print(printed, flush=True)
  return record


def vm_peak_mb(pid: int) -> dict:
  """VmHWM and VmRSS of a running process, in MB."""
  with open(f'/proc/{pid}/status') as f:
    fields = dict(line.split(':', 1) for line in f if line.startswith(('VmHWM', 'VmRSS')))
  return {k.lower() + '_mb': int(v.split()[0]) / 1024 for k, v in fields.items()}


def tcp_delta(before: dict, after: dict, pids) -> list[tuple[int, int]]:
  return [(after.get(p, (0, 0))[0] - before.get(p, (0, 0))[0],
           after.get(p, (0, 0))[1] - before.get(p, (0, 0))[1]) for p in pids]


def run_part(edge_counts: list[int], rounds: int, folder: str) -> dict:
  """The server loop with 0 and more real edge clients; see the module's docstring."""
  from mocosfl_jax import train  # pylint: disable=import-outside-toplevel
  from mocosfl_jax import overhead  # pylint: disable=import-outside-toplevel
  from mocosfl_jax import edge_demo as demo  # pylint: disable=import-outside-toplevel
  steps_per_round, sync_every = 6, 3
  num = max(max(edge_counts), 1)
  config = run_config(16 if num <= 16 else num, steps_per_round, sync_every)
  setup = demo.prepare(config, folder, list(range(num)))
  tokens = read_tokens(str(setup.tokens), [str(cid) for cid in setup.ids])
  records = []
  plain = train.build(config)
  with EdgeHub('127.0.0.1:0', tokens, timeout_s=60, log=lambda line: None) as hub:
    port = int(hub.address.rsplit(':', 1)[1])
    runtimes, exps = {}, {}
    for n in sorted({max(n, 1) for n in edge_counts}):
      runtimes[n] = timed_runtime(hub, list(range(n)))
      exps[n] = train.build(config, runtimes[n])
      runtimes[n].attach(exps[n])
    times = time_rounds(exps[1], runtimes[1], rounds)
    hub.drain_drops()
    records.append(summarise('exchange, its edge client absent', 1, 0, times, exps[1],
                             runtimes[1]))
    logs = [open(os.path.join(folder, f'client_{cid}.log'), 'w') for cid in setup.ids]
    started = time.perf_counter()
    processes = {cid: subprocess.Popen(demo.client_command(setup, cid, port), stdout=log,
                                       stderr=subprocess.STDOUT)
                 for cid, log in zip(setup.ids, logs)}
    connected = hub.wait_connected({str(c) for c in setup.ids}, 300)
    connect_s = time.perf_counter() - started
    if len(connected) != len(setup.ids):
      raise RuntimeError(f'only {len(connected)} of {len(setup.ids)} edge clients connected; '
                         f'see {folder}')
    connection = hub.traffic(reset=True)
    settings = [Setting('simulation', 0, plain)] + [
        Setting(f'{n} edge client{"s" if n > 1 else ""}', n, exps[n], runtimes[n])
        for n in edge_counts if n > 0]
    # Round by round in turn, so that every setting sees the same drift of the load.
    for _ in range(rounds):
      for setting in settings:
        pids = [processes[c].pid for c in range(setting.edge)]
        setting.round(hub if setting.edge else None, port, pids)
    drops = hub.drain_drops()
    records += [summarise(setting.name, setting.edge, setting.edge, setting.times, setting.exp,
                          setting.runtime, setting.traffic, list(setting.tcp.values()))
                for setting in settings]
    rss = [vm_peak_mb(p.pid) for p in processes.values()]
  for process in processes.values():
    process.wait(60)
  for log in logs:
    log.close()
  exp = exps[1]
  info = overhead.per_client(config, exp.client_net, exp.client_tx, pool_size=exp.pool_size,
                             steps_per_round=exp.steps_per_round)['communication_per_client_mb']
  return {'config': {k: v for k, v in config.to_dict().items()
                     if k in ('num_clients', 'batch_size', 'cut_layer', 'steps_per_round',
                              'sync_every', 'client_sample_ratio')}
          | {'model.width': config.model.width, 'data': config.data.name,
             'image_size': config.model.image_size, 'rounds': rounds},
          'settings': records, 'drops': len(drops), 'clients_connect_s': connect_s,
          'connection_bytes_per_client': float(np.mean(
              [sum(sum(v['bytes'] for v in t[way].values()) for way in t)
               for t in connection.values()])),
          'edge_client_rss_mb': {'vmhwm_mb': [r['vmhwm_mb'] for r in rss],
                                 'vmhwm_median_mb': statistics.median(r['vmhwm_mb'] for r in rss),
                                 'vmrss_median_mb': statistics.median(r['vmrss_mb'] for r in rss)},
          'explicit_mb': {'per_step': info['per_step'], 'per_sync': info['per_sync']}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--edge_clients', default='0,1,4,16')
  parser.add_argument('--rounds', type=int, default=6, help='rounds a setting (the first warms up)')
  parser.add_argument('--wire_steps', type=int, default=200)
  parser.add_argument('--tiny', action='store_true',
                      help='edge clients 0,1,2, 2 rounds, 50 wire steps: a smoke test')
  parser.add_argument('--out', default=os.path.join(
      REPO, 'experiments/results/edge_runtime_bench_cpu.json'))
  args = parser.parse_args()
  if args.tiny:
    args.edge_clients, args.rounds, args.wire_steps = '0,1,2', 2, 50
  import jax  # pylint: disable=import-outside-toplevel
  import grpc  # pylint: disable=import-outside-toplevel
  results = results_file.new(jax=jax.__version__, grpc=grpc.__version__,
                             load_average_start=os.getloadavg())
  results['wire'] = table1(args.wire_steps)
  results_file.write(results, args.out)
  with tempfile.TemporaryDirectory(prefix='edge_runtime_bench_') as folder:
    results['run'] = run_part([int(n) for n in args.edge_clients.split(',')], args.rounds, folder)
  results['load_average_end'] = os.getloadavg()
  results_file.write(results, args.out)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
