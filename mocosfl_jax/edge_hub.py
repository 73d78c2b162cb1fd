"""The server's side of the edge runtime: a gRPC server that its edge clients connect to.

``EdgeHub`` runs the ``mocosfl.Edge/Session`` stream (mocosfl_jax/edge/protocol.py)
in gRPC's threads and gives the training loop a synchronous interface: ask the
connected clients of a step for their smashed data and wait for them, send
them their gradients, collect their weights at a sync point and broadcast the
average. Whatever goes wrong with one client (no connection, no answer within
``timeout_s``, a broken stream, a reply of the wrong shape, dtype or size, a
NaN) drops that client for that exchange only: it is logged, recorded for
``drain_drops`` and the others go on. A dropped client rejoins by connecting
again. Needs numpy and grpcio, not JAX.

Each client has its own token, compared in constant time. A request carries a
sequence number that its reply must echo; a reply to an exchange that is over
(late, after a time-out, or repeated) is ignored with a log line, so it can
never be taken for the answer to a later step.
"""
from __future__ import annotations

import hmac
import itertools
import logging
import queue
import threading
import time
from concurrent import futures
from typing import Callable, Iterable, Mapping

import grpc
import numpy as np

from mocosfl_jax.edge import protocol

_log = logging.getLogger('mocosfl_jax.edge')
# Above the hub's own limit, so that an oversized reply reaches the hub's check
# (a clear log line naming the client) rather than gRPC's (a broken stream).
_GRPC_SLACK_BYTES = 1 << 20
# Pings find a client that vanished without closing its connection.
_KEEPALIVE_OPTIONS = [('grpc.keepalive_time_ms', 20_000), ('grpc.keepalive_timeout_ms', 10_000),
                      ('grpc.keepalive_permit_without_calls', 1),
                      ('grpc.http2.min_recv_ping_interval_without_data_ms', 5_000),
                      ('grpc.http2.max_pings_without_data', 0)]


class HubError(ValueError):
  """A hub that cannot start (bad address, missing certificate); one line."""


class _Session:
  """One client's open stream: what goes down it and the replies that came up."""

  def __init__(self, client_id: str, hello):
    self.client_id = client_id
    self.hello = hello
    self.outbox: queue.Queue = queue.Queue()
    self.alive = True
    self.replaced = False
    self.expected: set[int] = set()  # seqs of requests whose reply is awaited
    self.replies: dict[int, object] = {}

  def close(self) -> None:
    self.alive = False
    self.outbox.put(None)


class EdgeHub:
  """The edge clients' gRPC server with a synchronous interface for the training loop.

  Args:
    listen: 'HOST:PORT' to bind; port 0 picks a free one (see ``address``).
    tokens: {client_id: token} of the clients played by edge processes.
    timeout_s: how long an exchange waits for replies (and a new stream for
      its Hello) before the missing clients are dropped.
    max_message_bytes: the largest reply accepted (and the largest tensor).
    tls_cert, tls_key: PEM files of the server's certificate and key; both or
      neither (then the connection is not encrypted).
    known_ids: every client id of the run (simulated ones too), so that a
      simulated client's id is refused as "not an edge client" rather than as
      unknown; None: any id without a token is unknown.
    log: where the one-line events go (connections, refusals, drops, ignored
      replies); default: the 'mocosfl_jax.edge' logger at WARNING.
    hold_welcomes: a client that connects before ``set_welcome`` is called
      waits for its Welcome until then (a server restoring its state: without
      the weights, the client would go on with whatever model it holds).
  """

  def __init__(self, listen: str, tokens: Mapping[str, str], timeout_s: float = 30.0,
               max_message_bytes: int = 64 << 20, tls_cert: str | None = None,
               tls_key: str | None = None, known_ids: Iterable[str] | None = None,
               log: Callable[[str], None] | None = None, hold_welcomes: bool = False):
    if (tls_cert is None) != (tls_key is None):
      raise HubError('give both --tls_cert and --tls_key, or neither')
    if timeout_s <= 0 or max_message_bytes <= 0:
      raise HubError(f'timeout_s {timeout_s} and max_message_bytes {max_message_bytes} '
                     'must be positive')
    self.listen = listen
    self.tokens = {str(k): str(v) for k, v in tokens.items()}
    self.timeout_s = float(timeout_s)
    self.max_message_bytes = int(max_message_bytes)
    self.known_ids = None if known_ids is None else {str(k) for k in known_ids}
    self._tls = (tls_cert, tls_key)
    self._log = log or _log.warning
    self._cond = threading.Condition()
    self._sessions: dict[str, _Session] = {}
    self._drops: list[dict] = []
    self._traffic: dict[tuple[str, str, str], list[int]] = {}  # (id, way, body) -> [count, bytes]
    self._seq = itertools.count(1)
    # The round of the latest average: what a Welcome's weights are.
    self._round = -1
    self._welcome: Callable[[str], Mapping[str, np.ndarray] | None] | None = None
    self._held = hold_welcomes
    self._server = None
    self.address: str | None = None

  # -------------------------------------------------------------------------
  # Life cycle.

  def start(self) -> 'EdgeHub':
    """Binds ``listen`` and starts serving; ``address`` is then the bound HOST:PORT."""
    options = _KEEPALIVE_OPTIONS + [
        ('grpc.max_receive_message_length', self.max_message_bytes + _GRPC_SLACK_BYTES),
        ('grpc.max_send_message_length', -1)]
    # A stream holds a worker for its life: room for every client, a replaced
    # stream still closing and a few refused ones.
    workers = 2 * len(self.tokens) + 8
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix='edge-hub'),
                         options=options)
    handler = grpc.stream_stream_rpc_method_handler(
        self._stream, request_deserializer=protocol.parser(protocol.ClientMessage),
        response_serializer=protocol.serialize)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(f'{protocol.PACKAGE}.{protocol.SERVICE}',
                                              {'Session': handler}),))
    try:
      if self._tls[0] is None:
        port = server.add_insecure_port(self.listen)
      else:
        port = server.add_secure_port(self.listen, grpc.ssl_server_credentials(
            [(protocol.read_file(self._tls[1], 'TLS key', HubError),
              protocol.read_file(self._tls[0], 'TLS certificate', HubError))]))
    except RuntimeError as e:
      raise HubError(f'cannot listen on {self.listen} ({e}): give a free HOST:PORT') from None
    if not port:
      raise HubError(f'cannot listen on {self.listen}: give a free HOST:PORT')
    server.start()
    self._server = server
    self.address = f'{self.listen.rsplit(":", 1)[0]}:{port}'
    self._log(f'edge: listening on {self.address} for clients {", ".join(sorted(self.tokens))}'
              f'{" (TLS)" if self._tls[0] else ""}')
    return self

  def close(self, done: bool = True, grace_s: float = 5.0) -> None:
    """Stops serving; with ``done`` the connected clients are told the run is over (they exit 0).

    Without ``done`` the streams are cut as if the server had died, and the
    clients try to reconnect.
    """
    with self._cond:
      sessions = list(self._sessions.values())
      self._sessions.clear()
      self._cond.notify_all()
    for session in sessions:
      if done:
        self._queue(session, protocol.server_message(next(self._seq), 'Done'))
      session.close()
    if self._server is not None:
      self._server.stop(grace_s if done else None).wait()
      self._server = None

  def __enter__(self) -> 'EdgeHub':
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()

  def set_welcome(self, fn: Callable[[str], Mapping[str, np.ndarray] | None] | None,
                  round: int | None = None) -> None:
    """``fn(client_id)`` gives the weights a (re)joining client loads ({name: float32}), or None.

    ``round``: the round whose average they are (-1: none), until the next
    ``average``. Releases the Welcomes that ``hold_welcomes`` held.
    """
    with self._cond:
      self._welcome, self._held = fn, False
      if round is not None:
        self._round = int(round)
      self._cond.notify_all()

  def connected(self) -> set[str]:
    with self._cond:
      return {cid for cid, session in self._sessions.items() if session.alive}

  def wait_connected(self, client_ids: Iterable[str], timeout_s: float) -> set[str]:
    """Waits up to ``timeout_s`` for all of ``client_ids`` to connect; those connected."""
    wanted = set(client_ids)
    deadline = time.monotonic() + timeout_s
    with self._cond:
      while True:
        present = {cid for cid in wanted if cid in self._sessions and self._sessions[cid].alive}
        left = deadline - time.monotonic()
        if present == wanted or left <= 0:
          return present
        self._cond.wait(left)

  def traffic(self, reset: bool = False) -> dict[str, dict[str, dict[str, dict[str, int]]]]:
    """What crossed each client's stream: {client_id: {'up'|'down': {body: {messages, bytes}}}}.

    ``bytes`` are serialized protobuf sizes; gRPC adds a 5-byte prefix to each
    message, HTTP/2 its frame headers. Messages down count when queued;
    refused streams are not counted.
    ``reset`` starts the count again.
    """
    with self._cond:
      counts = dict(self._traffic)
      if reset:
        self._traffic = {}
    result: dict = {}
    for (cid, way, body), (messages, size) in sorted(counts.items()):
      result.setdefault(cid, {'up': {}, 'down': {}})[way][body] = {'messages': messages,
                                                                   'bytes': size}
    return result

  def drain_drops(self) -> list[dict]:
    """The drops since the last call: {client_id, round, step, reason}; step None at a sync."""
    with self._cond:
      drops, self._drops = self._drops, []
    return drops

  # -------------------------------------------------------------------------
  # The training loop's exchanges.

  def smashed(self, round: int, step: int, requests: Mapping[str, np.ndarray], shape: tuple,
              frozen: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each requested client's (online, ema) smashed data of a step; the dropped are absent.

    Args:
      round, step: where the run is (sent to the client and logged with drops).
      requests: {client_id: the sample ids of its batch in its own data}.
      shape: (batch, *smashed_shape) both arrays must have.
      frozen: the clients take no gradient this step (TAResSFL's client_lr=0).
    """
    bodies = {cid: ('StepRequest', dict(round=round, step=step, frozen=frozen,
                                        sample_ids=np.asarray(ids, np.int64).tolist()))
              for cid, ids in requests.items()}
    shape = tuple(int(n) for n in shape)
    result = {}
    for cid, message in self._exchange(round, step, bodies).items():
      try:
        self._check_reply(message, 'smashed')
        result[cid] = tuple(protocol.decode(getattr(message.smashed, part), shape,
                                            self.max_message_bytes) for part in ('online', 'ema'))
      except protocol.ProtocolError as e:
        self._drop(cid, round, step, f'rejected its smashed data: {e}')
    return result

  def gradients(self, round: int, step: int, grads: Mapping[str, np.ndarray]) -> None:
    """Sends each client its smashed-data gradient; it applies it before its next step."""
    for cid, grad in grads.items():
      tensor = protocol.encode(np.asarray(grad, np.float32))
      if not self._send(cid, 'Gradient', smashed_grad=tensor, round=round):
        self._drop(cid, round, step, 'not connected for its gradient')

  def weights(self, round: int, client_ids: Iterable[str],
              template: Mapping[str, tuple] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The weights of each client (its online and EMA groups); the dropped are absent.

    ``template``: {name: shape} every reply must match; None: the first valid
    reply's names and shapes (in ``client_ids`` order) are the template.
    """
    client_ids = list(client_ids)
    bodies = {cid: ('WeightsRequest', dict(round=round)) for cid in client_ids}
    replies = self._exchange(round, None, bodies)
    expected = None if template is None else {k: tuple(v) for k, v in template.items()}
    result = {}
    for cid in client_ids:
      if cid not in replies:
        continue
      try:
        self._check_reply(replies[cid], 'weights')
        weights = protocol.decode_named(replies[cid].weights.weights, expected,
                                        self.max_message_bytes)
      except protocol.ProtocolError as e:
        self._drop(cid, round, None, f'rejected its weights: {e}')
        continue
      if not weights:
        self._drop(cid, round, None, 'rejected its weights: none sent')
        continue
      expected = expected or {name: value.shape for name, value in weights.items()}
      result[cid] = weights
    return result

  def average(self, round: int, client_ids: Iterable[str],
              weights: Mapping[str, np.ndarray]) -> None:
    """Broadcasts the averaged weights (FedAvg) to the clients; they load them and checkpoint."""
    named = protocol.encode_named({k: np.asarray(v, np.float32) for k, v in weights.items()})
    self._round = round
    for cid in client_ids:
      if not self._send(cid, 'Average', weights=named, round=round):
        self._drop(cid, round, None, 'not connected for the average')

  # -------------------------------------------------------------------------
  # Internals: sending, waiting, recording.

  def _send(self, cid: str, body: str, **fields) -> int | None:
    """Queues a message to ``cid``'s stream; its seq, or None when it is not connected."""
    with self._cond:
      session = self._sessions.get(cid)
      if session is None or not session.alive:
        return None
      seq = next(self._seq)
      self._queue(session, protocol.server_message(seq, body, **fields))
      return seq

  def _exchange(self, round: int, step: int | None, bodies: Mapping[str, tuple]) -> dict:
    """Sends each client its request and waits up to timeout_s for the replies that came."""
    deadline = time.monotonic() + self.timeout_s
    sent = {}
    with self._cond:
      for cid, (body, fields) in bodies.items():
        session = self._sessions.get(cid)
        if session is None or not session.alive:
          self._drop(cid, round, step, 'not connected')
          continue
        seq = next(self._seq)
        session.expected.add(seq)
        self._queue(session, protocol.server_message(seq, body, **fields))
        sent[cid] = session, seq
      while True:
        waiting = [cid for cid, (s, seq) in sent.items() if s.alive and seq not in s.replies]
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
          break
        self._cond.wait(left)
      replies = {}
      for cid, (session, seq) in sent.items():
        session.expected.discard(seq)
        message = session.replies.pop(seq, None)
        if message is not None:
          replies[cid] = message
        elif not session.alive:
          self._drop(cid, round, step, 'disconnected')
        else:
          self._drop(cid, round, step, f'no reply within {self.timeout_s:g} s')
    return replies

  def _check_reply(self, message, want: str) -> None:
    size = message.ByteSize()
    if size > self.max_message_bytes:
      raise protocol.ProtocolError(f'reply of {size} bytes, over the limit of '
                                   f'{self.max_message_bytes}')
    body = protocol.body_of(message)
    if body == 'error':
      raise protocol.ProtocolError(f'the client reported: {message.error.message}')
    if body != want:
      raise protocol.ProtocolError(f'a {body or "empty"} message in reply, expected {want}')

  def _drop(self, cid: str, round: int, step: int | None, reason: str) -> None:
    with self._cond:
      self._drops.append(dict(client_id=cid, round=round, step=step, reason=reason))
    where = f'round {round}' + ('' if step is None else f' step {step}')
    self._log(f'edge: {where}: client {cid} dropped: {reason}')

  # -------------------------------------------------------------------------
  # The stream, in gRPC's threads.

  def _stream(self, request_iterator, context):
    """One client's Session: Hello, then Welcome and the requests the loop queues."""
    peer = context.peer()
    hello_box, session_box = queue.Queue(), queue.Queue()
    threading.Thread(target=self._read, args=(request_iterator, hello_box, session_box),
                     daemon=True, name='edge-hub-reader').start()
    try:
      first = hello_box.get(timeout=self.timeout_s)
    except queue.Empty:
      first = None
    refusal = self._refusal(first)
    if refusal is not None:
      session_box.put(None)
      code, reason = refusal
      self._log(f'edge: refused a connection from {peer}: {reason}')
      yield protocol.server_message(0, 'Refusal', reason=reason)
      context.abort(code, reason)
    hello = first.hello
    cid = hello.client_id
    session = _Session(cid, hello)
    with self._cond:
      old = self._sessions.get(cid)
      self._sessions[cid] = session
      if old is not None:
        old.replaced = True
        old.close()
      self._cond.notify_all()
    session_box.put(session)
    context.add_callback(lambda: self._disconnected(session))
    self._log(f'edge: client {cid} connected from {peer} (step {hello.steps}, last average '
              f'round {hello.round}){"; it replaces its previous connection" if old else ""}')
    self._count(cid, 'up', first)
    with self._cond:
      self._cond.wait_for(lambda: not self._held or not session.alive)
    if session.alive:
      welcome = self._welcome_message(cid)
      self._count(cid, 'down', welcome)
      yield welcome
    while True:
      message = session.outbox.get()
      if message is None:
        break
      yield message
    if session.replaced:
      reason = f'client {cid} connected again: this older connection is closed'
      yield protocol.server_message(0, 'Refusal', reason=reason)
      context.abort(grpc.StatusCode.ABORTED, reason)

  def _refusal(self, first) -> tuple[grpc.StatusCode, str] | None:
    """(status, reason) for a stream that may not go on, else None."""
    if first is None:
      return grpc.StatusCode.DEADLINE_EXCEEDED, f'no Hello within {self.timeout_s:g} s'
    if protocol.body_of(first) != 'hello':
      return grpc.StatusCode.INVALID_ARGUMENT, 'the first message must be a Hello'
    cid, token = first.hello.client_id, first.hello.token
    expected = self.tokens.get(cid)
    # Compared even for an unknown id, so that the time does not tell ids apart.
    matches = hmac.compare_digest(token.encode(), (expected or '\0').encode())
    if expected is None:
      if self.known_ids is not None and cid in self.known_ids:
        return (grpc.StatusCode.PERMISSION_DENIED,
                f'client {cid} is simulated by the server, not an edge client')
      return grpc.StatusCode.UNAUTHENTICATED, f'unknown client id {cid!r}'
    if not matches:
      return grpc.StatusCode.UNAUTHENTICATED, f'wrong token for client {cid}'
    return None

  def _welcome_message(self, cid: str):
    weights = self._welcome(cid) if self._welcome is not None else None
    named = protocol.encode_named({k: np.asarray(v, np.float32) for k, v in weights.items()}
                                  ) if weights else []
    return protocol.server_message(next(self._seq), 'Welcome', weights=named, round=self._round)

  def _read(self, request_iterator, hello_box: queue.Queue, session_box: queue.Queue) -> None:
    """Reads a stream's client messages: the Hello, then the replies, until it ends."""
    try:
      first = next(request_iterator, None)
    except Exception:  # pylint: disable=broad-except  # a stream broken before its Hello
      first = None
    hello_box.put(first)
    session = session_box.get()
    if session is None:
      return
    try:
      for message in request_iterator:
        self._receive(session, message)
    except Exception:  # pylint: disable=broad-except  # the stream broke: the client is gone
      pass
    self._disconnected(session)

  def _receive(self, session: _Session, message) -> None:
    self._count(session.client_id, 'up', message)
    with self._cond:
      if message.seq not in session.expected or message.seq in session.replies:
        self._log(f'edge: client {session.client_id}: ignored a late or repeated '
                  f'{protocol.body_of(message) or "empty"} reply (seq {message.seq})')
        return
      session.replies[message.seq] = message
      self._cond.notify_all()

  def _queue(self, session: _Session, message) -> None:
    # Counted when queued, so that an exchange's messages are all counted when it returns.
    self._count(session.client_id, 'down', message)
    session.outbox.put(message)

  def _count(self, cid: str, way: str, message) -> None:
    key = (cid, way, protocol.body_of(message) or 'empty')
    size = message.ByteSize()
    with self._cond:
      entry = self._traffic.setdefault(key, [0, 0])
      entry[0] += 1
      entry[1] += size

  def _disconnected(self, session: _Session) -> None:
    with self._cond:
      if not session.alive:
        return
      session.close()
      if self._sessions.get(session.client_id) is session:
        del self._sessions[session.client_id]
      self._cond.notify_all()
    self._log(f'edge: client {session.client_id} disconnected')


def read_tokens(path: str, client_ids: Iterable[str]) -> dict[str, str]:
  """{client_id: token} from a file of ``ID TOKEN`` lines, for exactly ``client_ids``."""
  try:
    with open(path) as f:
      lines = [line.split() for line in f if line.strip() and not line.startswith('#')]
  except OSError as e:
    raise HubError(f'cannot read the token file {path} ({e.strerror})') from None
  if any(len(parts) != 2 for parts in lines):
    raise HubError(f'{path}: each line must be "CLIENT_ID TOKEN"')
  tokens = dict(lines)
  missing = sorted(set(client_ids) - set(tokens), key=str)
  if missing:
    raise HubError(f'{path}: no token for edge client{"s" if len(missing) > 1 else ""} '
                   f'{", ".join(missing)}')
  return {cid: tokens[cid] for cid in client_ids}
