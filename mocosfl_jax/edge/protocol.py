"""The messages between the server and its edge clients: protobuf over gRPC, no generated code.

The schema is built here as a ``FileDescriptorProto`` and turned into classes
with ``message_factory.GetMessageClass``: no ``protoc`` step and no generated
module pinned to one protobuf version. The wire format is ordinary protobuf, so
a client in another language can be written from this file (its ``.proto``
form is ``PROTO``, kept in step with the schema by a test).

One service, ``mocosfl.Edge``, with one bidirectional stream, ``Session``: the
client opens it with ``Hello``, the server answers ``Welcome`` (or ``Refusal``
and an UNAUTHENTICATED / PERMISSION_DENIED status), then sends requests in
order and the client answers those that need an answer with the request's
``seq``, so a late or repeated reply is recognised. Tensors travel as raw
little-endian bytes with their shape and dtype, never pickled; only float32 is
accepted for smashed data, gradients and weights. Imports only numpy and
protobuf: this runs on the device.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = 'mocosfl'
SERVICE = 'Edge'
METHOD = f'/{PACKAGE}.{SERVICE}/Session'
FLOAT32 = 'float32'

_T = descriptor_pb2.FieldDescriptorProto
_SCALARS = {'int64': _T.TYPE_INT64, 'string': _T.TYPE_STRING, 'bytes': _T.TYPE_BYTES,
            'bool': _T.TYPE_BOOL}

# message -> [(field, type, repeated)]; a type that is not a scalar is a message.
_MESSAGES = {
    'Tensor': [('shape', 'int64', True), ('dtype', 'string', False), ('data', 'bytes', False)],
    'NamedTensor': [('name', 'string', False), ('tensor', 'Tensor', False)],
    # round: the last round whose Average the client applied (-1: none); steps: its step count.
    'Hello': [('client_id', 'string', False), ('token', 'string', False),
              ('round', 'int64', False), ('steps', 'int64', False)],
    'Smashed': [('online', 'Tensor', False), ('ema', 'Tensor', False)],
    'Weights': [('weights', 'NamedTensor', True)],
    'Error': [('message', 'string', False)],
    # weights: what the client is to load; empty: keep its own.
    'Welcome': [('weights', 'NamedTensor', True), ('round', 'int64', False)],
    # sample_ids: the batch's positions in the client's own data (the server's draw).
    'StepRequest': [('round', 'int64', False), ('step', 'int64', False),
                    ('sample_ids', 'int64', True), ('frozen', 'bool', False)],
    'Gradient': [('smashed_grad', 'Tensor', False), ('round', 'int64', False)],
    'WeightsRequest': [('round', 'int64', False)],
    'Average': [('weights', 'NamedTensor', True), ('round', 'int64', False)],
    'Refusal': [('reason', 'string', False)],
    'Done': [],
}
# Envelope -> the messages of its oneof ``body``, each in a field of its name in snake case.
CLIENT_BODIES = ('Hello', 'Smashed', 'Weights', 'Error')
SERVER_BODIES = ('Welcome', 'StepRequest', 'Gradient', 'WeightsRequest', 'Average', 'Refusal',
                 'Done')


class ProtocolError(ValueError):
  """A message or tensor that breaks the protocol; the message is one line naming the problem."""


def read_file(path: str, what: str, error: type[Exception] = ValueError) -> bytes:
  """The bytes of a session's file (a token, a TLS key or certificate), or ``error``
  with one line naming ``what``, the path and why."""
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError as e:
    raise error(f'cannot read the {what} {path} ({e.strerror})') from None


def field_name(message: str) -> str:
  """'StepRequest' -> 'step_request': the envelope's field for a body message."""
  return ''.join('_' + c.lower() if c.isupper() and i else c.lower()
                 for i, c in enumerate(message))


def _add_field(message, name, kind, number, repeated=False, oneof=None):
  field = message.field.add(name=name, number=number)
  field.label = _T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL
  if kind in _SCALARS:
    field.type = _SCALARS[kind]
  else:
    field.type, field.type_name = _T.TYPE_MESSAGE, f'.{PACKAGE}.{kind}'
  if oneof is not None:
    field.oneof_index = oneof


def _file() -> descriptor_pb2.FileDescriptorProto:
  proto = descriptor_pb2.FileDescriptorProto(name='mocosfl_edge.proto', package=PACKAGE,
                                             syntax='proto3')
  for name, fields in _MESSAGES.items():
    message = proto.message_type.add(name=name)
    for number, (field, kind, repeated) in enumerate(fields, 1):
      _add_field(message, field, kind, number, repeated)
  for envelope, bodies in (('ClientMessage', CLIENT_BODIES), ('ServerMessage', SERVER_BODIES)):
    message = proto.message_type.add(name=envelope)
    _add_field(message, 'seq', 'int64', 1)
    message.oneof_decl.add(name='body')
    for number, body in enumerate(bodies, 2):
      _add_field(message, field_name(body), body, number, oneof=0)
  service = proto.service.add(name=SERVICE)
  service.method.add(name='Session', input_type=f'.{PACKAGE}.ClientMessage',
                     output_type=f'.{PACKAGE}.ServerMessage', client_streaming=True,
                     server_streaming=True)
  return proto


def _classes() -> dict[str, type]:
  # A pool of our own: nothing else in the process can clash with these names.
  pool = descriptor_pool.DescriptorPool()
  pool.Add(_file())
  names = list(_MESSAGES) + ['ClientMessage', 'ServerMessage']
  return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f'{PACKAGE}.{name}'))
          for name in names}


_CLASSES = _classes()
Tensor = _CLASSES['Tensor']
NamedTensor = _CLASSES['NamedTensor']
ClientMessage = _CLASSES['ClientMessage']
ServerMessage = _CLASSES['ServerMessage']


def proto_text() -> str:
  """The schema as a ``.proto`` file, for clients written in other languages."""
  lines = ['syntax = "proto3";', f'package {PACKAGE};', '']
  for name, fields in _MESSAGES.items():
    body = [f'  {"repeated " if repeated else ""}{kind} {field} = {number};'
            for number, (field, kind, repeated) in enumerate(fields, 1)]
    lines += [f'message {name} {{', *body, '}']
  for envelope, bodies in (('ClientMessage', CLIENT_BODIES), ('ServerMessage', SERVER_BODIES)):
    lines += [f'message {envelope} {{', '  int64 seq = 1;', '  oneof body {',
              *[f'    {body} {field_name(body)} = {number};'
                for number, body in enumerate(bodies, 2)], '  }', '}']
  lines += [f'service {SERVICE} {{',
            '  rpc Session(stream ClientMessage) returns (stream ServerMessage);', '}']
  return '\n'.join(lines) + '\n'


def client_message(seq: int, body: str, **fields):
  """A ClientMessage whose oneof holds ``body`` ('Hello', 'Smashed', ...) built from ``fields``."""
  return _envelope(ClientMessage, CLIENT_BODIES, seq, body, fields)


def server_message(seq: int, body: str, **fields):
  """A ServerMessage whose oneof holds ``body`` ('StepRequest', 'Done', ...) built from ``fields``."""
  return _envelope(ServerMessage, SERVER_BODIES, seq, body, fields)


def _envelope(cls, bodies, seq, body, fields):
  if body not in bodies:
    raise ValueError(f'{body} is not one of {cls.__name__}\'s bodies: {", ".join(bodies)}')
  return cls(seq=seq, **{field_name(body): _CLASSES[body](**fields)})


def body_of(message) -> str:
  """The oneof's field name ('hello', 'step_request', ...), or '' for an empty envelope."""
  return message.WhichOneof('body') or ''


def serialize(message) -> bytes:
  return message.SerializeToString()


def parser(cls):
  """bytes -> message of ``cls``; malformed bytes raise ProtocolError (gRPC reports it)."""
  def parse(data: bytes):
    message = cls()
    try:
      message.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError has no stable public home across versions
      raise ProtocolError(f'malformed {cls.__name__} ({e})') from None
    return message
  return parse


# ---------------------------------------------------------------------------
# Tensors.


def encode(array) -> object:
  """A float32 array as a Tensor: shape, 'float32' and little-endian bytes."""
  array = np.asarray(array)
  if array.dtype != np.float32:
    raise ProtocolError(f'only float32 tensors are sent, got {array.dtype}')
  return Tensor(shape=array.shape, dtype=FLOAT32,
                data=np.ascontiguousarray(array, '<f4').tobytes())


def decode(tensor, expected_shape=None, max_bytes: int | None = None) -> np.ndarray:
  """The Tensor as a float32 array, checked.

  Args:
    tensor: a Tensor message.
    expected_shape: the shape it must have; None accepts any.
    max_bytes: the most bytes its data may hold; None: no limit.

  Raises:
    ProtocolError naming the problem: a dtype other than float32, a negative
    or wrong shape, data that does not fit the shape, too many bytes, a NaN or
    an infinity.
  """
  if tensor.dtype != FLOAT32:
    raise ProtocolError(f'dtype {tensor.dtype!r}, expected float32')
  shape = tuple(int(n) for n in tensor.shape)
  if any(n < 0 for n in shape):
    raise ProtocolError(f'negative dimension in shape {shape}')
  if expected_shape is not None and shape != tuple(expected_shape):
    raise ProtocolError(f'shape {shape}, expected {tuple(expected_shape)}')
  if max_bytes is not None and len(tensor.data) > max_bytes:
    raise ProtocolError(f'{len(tensor.data)} bytes, over the limit of {max_bytes}')
  want = 4 * int(np.prod(shape, dtype=np.int64))
  if len(tensor.data) != want:
    raise ProtocolError(f'{len(tensor.data)} bytes of data for shape {shape} ({want} expected)')
  array = np.frombuffer(tensor.data, '<f4').astype(np.float32).reshape(shape)
  if not np.isfinite(array).all():
    bad = int(np.size(array) - np.isfinite(array).sum())
    raise ProtocolError(f'{bad} NaN or infinite value{"s" if bad > 1 else ""}')
  return array


def encode_named(weights: Mapping[str, np.ndarray]) -> list:
  """{name: array} as NamedTensors, sorted by name."""
  return [NamedTensor(name=name, tensor=encode(weights[name])) for name in sorted(weights)]


def decode_named(named, expected: Mapping[str, tuple] | None = None,
                 max_bytes: int | None = None) -> dict[str, np.ndarray]:
  """NamedTensors as {name: float32 array}, checked against ``expected`` {name: shape}.

  With ``expected`` the names must be exactly its names; every tensor is
  checked as ``decode`` checks it. Errors name the weight.
  """
  weights = {}
  for item in named:
    if item.name in weights:
      raise ProtocolError(f'weight {item.name} sent twice')
    if expected is not None and item.name not in expected:
      raise ProtocolError(f'unknown weight {item.name}')
    try:
      weights[item.name] = decode(item.tensor, None if expected is None else expected[item.name],
                                  max_bytes)
    except ProtocolError as e:
      raise ProtocolError(f'weight {item.name}: {e}') from None
  missing = sorted(set(expected or ()) - set(weights))
  if missing:
    raise ProtocolError(f'missing weight{"s" if len(missing) > 1 else ""} '
                        f'{", ".join(missing[:3])}{" ..." if len(missing) > 3 else ""}')
  return weights
