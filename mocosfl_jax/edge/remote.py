"""The edge-client process: one EdgeClient driven by the server over gRPC.

``python -m mocosfl_jax.edge.client --server=HOST:PORT --client_id=ID
--token_file=F --model=client.tflite --data=PATH`` connects to the server's
``mocosfl.Edge/Session`` stream (mocosfl_jax/edge/protocol.py), says Hello with
its id and token, loads the weights of the Welcome if there are any, and then
serves the server's requests in the order they come:

- StepRequest: the forward pass on the batch the server drew (its
  ``sample_ids``, positions in this client's data), replied as Smashed; a
  frozen step (TAResSFL) ends there, no gradient comes;
- Gradient: the update of the online model (``apply_gradient``);
- WeightsRequest: the online and EMA weights, replied as Weights;
- Average: the FedAvg broadcast loaded, then the local checkpoint written;
- Done: the checkpoint written, exit 0; Refusal: exit 1 with the reason.

A request that cannot be served (a wrong sample id, a gradient of the wrong
shape) is answered with an Error naming the problem, and the server drops the
client for that step. When the server goes away the client reconnects with
exponential backoff, for ``--retry_s`` seconds; restarted, it resumes from its
checkpoint. Imports numpy, grpcio and protobuf, not JAX.
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from typing import Callable

import grpc
import numpy as np

from mocosfl_jax.edge import protocol

# The group that takes part in the FedAvg: serve.py averages the online models
# only (it refuses fedavg.average_ema); the EMA and the momentum stay on the device.
SHARED_GROUPS = ('online',)
BACKOFF_S = (0.5, 10.0)
_FATAL_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.ABORTED)


class Refused(Exception):
  """The server refused this client (wrong token, unknown id, replaced); retrying cannot help."""


class Unreachable(Exception):
  """The server could not be reached for the whole retry period."""


class _StreamEnded(Exception):
  """The server closed the stream without Done (it is shutting down or restarting)."""


def shared_weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The weights of the groups the server averages (``online__...``)."""
  return {name: value for name, value in weights.items()
          if name.split('__', 1)[0] in SHARED_GROUPS}


def open_channel(server: str, root_cert: bytes | None = None) -> grpc.Channel:
  """A channel to ``server`` (HOST:PORT), TLS-verified against ``root_cert`` when given."""
  options = [('grpc.max_receive_message_length', -1), ('grpc.max_send_message_length', -1),
             ('grpc.keepalive_time_ms', 30_000), ('grpc.keepalive_timeout_ms', 10_000)]
  if root_cert is None:
    return grpc.insecure_channel(server, options=options)
  return grpc.secure_channel(server, grpc.ssl_channel_credentials(root_cert), options=options)


class Runner:
  """Serves one client's requests; one Runner lives across reconnections.

  Args:
    client: the EdgeClient (mocosfl_jax/edge/client.py).
    client_id, token: what the Hello says.
    checkpoint: where the local checkpoint is written after each Average and at
      the end; None: nowhere.
    log: where one-line events go.
  """

  def __init__(self, client, client_id: str, token: str, checkpoint: str | None = None,
               log: Callable[[str], None] | None = None):
    self.client = client
    self.client_id = client_id
    self.token = token
    self.checkpoint = checkpoint
    self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    self._call = None
    self._stopped = threading.Event()

  def serve(self, server: str, root_cert: bytes | None = None, retry_s: float = 600.0) -> None:
    """Serves sessions until Done; reconnects with backoff while the server is away.

    Raises Refused when the server refuses this client, Unreachable when no
    session could be held for ``retry_s`` seconds.
    """
    delay, lost_since = BACKOFF_S[0], None
    while not self._stopped.is_set():
      channel = open_channel(server, root_cert)
      try:
        welcomed = self._session(channel)
        if welcomed is None:
          return
        reason = 'the server closed the stream'
      except grpc.RpcError as e:
        if e.code() in _FATAL_CODES:
          raise Refused(e.details()) from None
        welcomed, reason = False, f'{e.code().name}: {e.details()}'
      finally:
        channel.close()
      if welcomed:
        delay, lost_since = BACKOFF_S[0], None
      now = time.monotonic()
      lost_since = lost_since or now
      if now - lost_since > retry_s:
        raise Unreachable(f'server {server} unreachable for {retry_s:g} s ({reason})')
      self.log(f'edge client {self.client_id}: connection lost ({reason}); '
               f'retrying in {delay:g} s')
      self._stopped.wait(delay)
      delay = min(2 * delay, BACKOFF_S[1])

  def stop(self) -> None:
    """Ends ``serve`` from another thread (the current stream is cancelled)."""
    self._stopped.set()
    if self._call is not None:
      self._call.cancel()

  def _session(self, channel) -> bool | None:
    """One stream: None after Done; whether a Welcome came if the stream ended otherwise."""
    outbox: queue.Queue = queue.Queue()

    def requests():
      yield protocol.client_message(0, 'Hello', client_id=self.client_id, token=self.token,
                                    round=self.client.round, steps=self.client.steps)
      while True:
        message = outbox.get()
        if message is None:
          return
        yield message

    call = channel.stream_stream(protocol.METHOD, request_serializer=protocol.serialize,
                                 response_deserializer=protocol.parser(protocol.ServerMessage))
    self._call = responses = call(requests())
    welcomed = False
    try:
      for message in responses:
        body = protocol.body_of(message)
        if body == 'refusal':
          raise Refused(message.refusal.reason)
        if body == 'done':
          self.save()
          return None
        welcomed = welcomed or body == 'welcome'
        reply = self.handle(message)
        if reply is not None:
          outbox.put(reply)
    except grpc.RpcError as e:
      if e.code() == grpc.StatusCode.CANCELLED and self._stopped.is_set():
        return None
      raise
    finally:
      outbox.put(None)
      responses.cancel()
    return welcomed

  def handle(self, message):
    """Serves one server message; the reply to send, or None."""
    body = protocol.body_of(message)
    handler = getattr(self, '_on_' + body, None)
    if handler is None:
      self.log(f'edge client {self.client_id}: ignored an unknown {body or "empty"} message')
      return None
    try:
      return handler(message.seq, getattr(message, body))
    except (ValueError, RuntimeError) as e:  # ProtocolError is a ValueError
      self.log(f'edge client {self.client_id}: cannot serve {body} (seq {message.seq}): {e}')
      if body in ('step_request', 'weights_request'):
        return protocol.client_message(message.seq, 'Error', message=f'{body}: {e}')
      return None

  def _on_welcome(self, seq, welcome):
    if welcome.weights:
      self.client.set_weights(self._weights(welcome.weights))
      self.client.round = welcome.round
    self.log(f'edge client {self.client_id}: connected (step {self.client.steps}'
             f'{", loaded the server weights" if welcome.weights else ""})')

  def _on_step_request(self, seq, request):
    client = self.client
    if client.step_in_progress:
      client.end_step(advance=False)  # the server dropped the last step: no gradient comes
    ids = np.asarray(request.sample_ids, np.int64) if len(request.sample_ids) else None
    online, ema = client.forward(ids)
    if request.frozen and client.step_in_progress:
      client.end_step(advance=True)
    return protocol.client_message(seq, 'Smashed', online=protocol.encode(online),
                                   ema=protocol.encode(ema))

  def _on_gradient(self, seq, gradient):
    client = self.client
    if not client.step_in_progress:
      raise ValueError('a gradient with no step in progress')
    shape = (client.batch,) + tuple(client.model.smashed_shape)
    try:
      grad = protocol.decode(gradient.smashed_grad, shape)
    except protocol.ProtocolError:
      client.end_step(advance=False)
      raise
    client.apply_gradient(grad, int(gradient.round))

  def _on_weights_request(self, seq, request):
    weights = shared_weights(self.client.get_weights())
    return protocol.client_message(seq, 'Weights', weights=protocol.encode_named(weights))

  def _on_average(self, seq, average):
    self.client.set_weights(self._weights(average.weights))
    self.client.round = int(average.round)
    self.save()

  def _weights(self, named) -> dict[str, np.ndarray]:
    """Named tensors from the server, checked against this model's names and shapes."""
    shapes = {name: value.shape for name, value in self.client.get_weights().items()}
    unknown = sorted(item.name for item in named if item.name not in shapes)
    if unknown:
      raise protocol.ProtocolError(f'unknown weight {unknown[0]} for this client model')
    return protocol.decode_named(named, {item.name: shapes[item.name] for item in named})

  def save(self) -> None:
    """Writes the local checkpoint, if the client has one."""
    if self.checkpoint is not None:
      self.client.save(self.checkpoint)


# ---------------------------------------------------------------------------
# The command line.


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m mocosfl_jax.edge.client',
      description='Run one edge client of a MocoSFL server (mocosfl_jax.serve).')
  parser.add_argument('--server', required=True, help='HOST:PORT of the server')
  parser.add_argument('--client_id', required=True, help='this client\'s id in the run')
  parser.add_argument('--token_file', required=True, help='file holding this client\'s token')
  parser.add_argument('--model', required=True, help='the exported client .tflite (sidecar beside)')
  parser.add_argument('--data', required=True, help='folder of images or .npz of the client\'s data')
  parser.add_argument('--checkpoint', default=None,
                      help='local checkpoint (npz): resumed from if it exists, written after '
                      'each average and at the end')
  parser.add_argument('--tls_root_cert', default=None,
                      help='PEM certificate the server\'s must chain to; enables TLS')
  parser.add_argument('--seed', type=int, default=0, help='seed of the views (non-negative)')
  parser.add_argument('--retry_s', type=float, default=600.0,
                      help='how long to keep reconnecting to an unreachable server')
  parser.add_argument('--threads', type=int, default=1, help='interpreter threads')
  return parser.parse_args(argv)


def build_runner(args) -> Runner:
  """The Runner of the command line's client, resumed from its checkpoint if there is one."""
  # Imported here: the model needs ai_edge_litert, which the tests' fake clients do not.
  from mocosfl_jax.edge.client import EdgeClient  # pylint: disable=import-outside-toplevel
  from mocosfl_jax.edge.data import load_images  # pylint: disable=import-outside-toplevel
  from mocosfl_jax.edge.model import ClientModel  # pylint: disable=import-outside-toplevel
  token = protocol.read_file(args.token_file, 'token file').decode().strip()
  if not token:
    raise ValueError(f'the token file {args.token_file} is empty')
  if not os.path.exists(args.model):
    raise ValueError(f'{args.model} does not exist: export the client model first '
                     '(python -m mocosfl_jax.export)')
  model = ClientModel(args.model, num_threads=args.threads)
  client = EdgeClient(model, load_images(args.data, model.image_size), seed=args.seed)
  if args.checkpoint and os.path.exists(args.checkpoint):
    client.load(args.checkpoint)
  return Runner(client, args.client_id, token, args.checkpoint)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    root_cert = (protocol.read_file(args.tls_root_cert, 'TLS root certificate')
                 if args.tls_root_cert else None)
    runner = build_runner(args)
    runner.log(f'edge client {args.client_id}: step {runner.client.steps}, '
               f'connecting to {args.server}')
    runner.serve(args.server, root_cert, args.retry_s)
  except Refused as e:
    print(f'error: the server refused client {args.client_id}: {e}', file=sys.stderr)
    return 1
  except (Unreachable, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    if 'runner' in locals():
      runner.save()
    return 130
  runner.log(f'edge client {args.client_id}: done at step {runner.client.steps}')
  return 0
