"""Tests for the edge runtime's transport: the protocol, the server's EdgeHub, the client loop.

The hub runs a real gRPC server on 127.0.0.1. Well-behaved clients are
``remote.Runner`` loops in threads over EdgeClients with test_edge_lib's
NumPy FakeModel; misbehaving ones are RawClients that send hand-made
messages. One test runs the real ``python -m mocosfl_jax.edge.client``
process over a tiny exported model.
"""
import concurrent.futures
import os
import queue
import re
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest

from mocosfl_jax.edge import augment, protocol, remote
from mocosfl_jax.edge.data import load_images
from mocosfl_jax.edge.client import EdgeClient
from mocosfl_jax.edge_hub import EdgeHub, HubError, read_tokens

from test_edge_lib import SIDECAR, FakeModel, _images

TOKENS = {'a': 'secret-a', 'b': 'secret-b'}
SHAPE = (4, 16, 16, 2)  # FakeModel: batch 4, 16x16 images, 2 channels
WAIT_S = 30  # generous bounds on events that come in milliseconds


class NamedFake(FakeModel):
  """FakeModel with the exported models' weight names (``online__w``, ...)."""

  def get_weights(self):
    return {k.replace('/', '__'): v for k, v in super().get_weights().items()}

  def set_weights(self, weights):
    merged = super().get_weights()
    merged.update({k.replace('__', '/'): np.asarray(v, np.float32) for k, v in weights.items()})
    super().set_weights(merged)


def fake_client(seed=1):
  return EdgeClient(NamedFake(), _images(10, seed=12), seed=seed)


class Player:
  """A Runner serving a hub from a thread; ``outcome`` is 'done' or the exception it ended with."""

  def __init__(self, address, cid, token, checkpoint=None, root_cert=None, client=None):
    self.client = client or fake_client()
    self.logs = []
    self.runner = remote.Runner(self.client, cid, token, checkpoint, log=self.logs.append)
    self.outcome = None
    self.thread = threading.Thread(target=self._run, args=(address, root_cert), daemon=True)
    self.thread.start()

  def _run(self, address, root_cert):
    try:
      self.runner.serve(address, root_cert, retry_s=WAIT_S)
      self.outcome = 'done'
    except Exception as e:  # pylint: disable=broad-except
      self.outcome = e

  def join(self):
    self.thread.join(WAIT_S)
    assert not self.thread.is_alive()
    return self.outcome

  def stop(self):
    self.runner.stop()
    self.thread.join(WAIT_S)


class RawClient:
  """A client speaking the protocol by hand: ``receive`` what the server sent, ``send`` anything."""

  def __init__(self, address, cid, token, root_cert=None):
    self.outbox, self.inbox = queue.Queue(), queue.Queue()
    self.channel = remote.open_channel(address, root_cert)
    call = self.channel.stream_stream(protocol.METHOD, request_serializer=protocol.serialize,
                                      response_deserializer=protocol.parser(protocol.ServerMessage))
    self.outbox.put(protocol.client_message(0, 'Hello', client_id=cid, token=token))
    self.responses = call(iter(self.outbox.get, None))
    threading.Thread(target=self._pump, daemon=True).start()

  def _pump(self):
    try:
      for message in self.responses:
        self.inbox.put(message)
      self.inbox.put('end')
    except grpc.RpcError as e:
      self.inbox.put(e)

  def receive(self, body=None):
    message = self.inbox.get(timeout=WAIT_S)
    if body is not None:
      assert protocol.body_of(message) == body, message
    return message

  def send(self, seq, body, **fields):
    self.outbox.put(protocol.client_message(seq, body, **fields))

  def close(self):
    self.outbox.put(None)
    self.responses.cancel()
    self.channel.close()


@pytest.fixture
def hub():
  logs = []
  hub = EdgeHub('127.0.0.1:0', TOKENS, timeout_s=WAIT_S, max_message_bytes=40_000,
                known_ids=['a', 'b', 'c'], log=logs.append).start()
  hub.logs = logs
  yield hub
  hub.close(done=False, grace_s=0)


def smashed_async(hub, *args, **kwargs):
  return concurrent.futures.ThreadPoolExecutor(1).submit(hub.smashed, *args, **kwargs)


def ids(*values):
  return np.asarray(values, np.int64)


# ---------------------------------------------------------------------------
# The protocol.


def test_tensor_round_trip_is_exact_and_little_endian():
  array = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
  tensor = protocol.encode(array)
  assert tuple(tensor.shape) == (2, 3, 4) and tensor.dtype == 'float32'
  assert tensor.data == array.astype('<f4').tobytes()
  wire = protocol.serialize(protocol.client_message(7, 'Smashed', online=tensor, ema=tensor))
  message = protocol.parser(protocol.ClientMessage)(wire)
  assert message.seq == 7 and protocol.body_of(message) == 'smashed'
  np.testing.assert_array_equal(protocol.decode(message.smashed.online, (2, 3, 4)), array)
  named = protocol.encode_named({'b': array, 'a': array[0]})
  assert [item.name for item in named] == ['a', 'b']
  assert protocol.decode_named(named, {'a': (3, 4), 'b': (2, 3, 4)})['a'].shape == (3, 4)


@pytest.mark.parametrize('tensor,shape,message', [
    (protocol.Tensor(shape=[2], dtype='float64', data=bytes(16)), (2,), "dtype 'float64'"),
    (protocol.encode(np.zeros((2, 3), np.float32)), (3, 2), r'shape \(2, 3\), expected \(3, 2\)'),
    (protocol.encode(np.array([1, np.nan, np.inf], np.float32)), (3,), '2 NaN or infinite values'),
    (protocol.encode(np.zeros(100, np.float32)), (100,), '400 bytes, over the limit of 256'),
    (protocol.Tensor(shape=[3], dtype='float32', data=bytes(8)), (3,), '8 bytes of data for'),
    (protocol.Tensor(shape=[-1], dtype='float32', data=b''), None, 'negative dimension'),
])
def test_decode_rejects_and_names_the_problem(tensor, shape, message):
  with pytest.raises(protocol.ProtocolError, match=message):
    protocol.decode(tensor, shape, max_bytes=256)


def test_named_tensors_and_messages_are_checked():
  named = protocol.encode_named({'w': np.zeros(2, np.float32)})
  with pytest.raises(protocol.ProtocolError, match='missing weight v'):
    protocol.decode_named(named, {'w': (2,), 'v': (1,)})
  with pytest.raises(protocol.ProtocolError, match='unknown weight w'):
    protocol.decode_named(named, {'v': (2,)})
  with pytest.raises(protocol.ProtocolError, match=r'weight w: shape \(2,\), expected \(3,\)'):
    protocol.decode_named(named, {'w': (3,)})
  with pytest.raises(protocol.ProtocolError, match='weight w sent twice'):
    protocol.decode_named(named + named)
  with pytest.raises(protocol.ProtocolError, match='only float32'):
    protocol.encode(np.zeros(2))
  with pytest.raises(protocol.ProtocolError, match='malformed ServerMessage'):
    protocol.parser(protocol.ServerMessage)(b'\xff\xff\xff')
  text = protocol.proto_text()
  for name in ('Tensor', 'StepRequest', 'ClientMessage', 'ServerMessage', 'Done'):
    assert f'message {name} {{' in text
  assert 'rpc Session(stream ClientMessage) returns (stream ServerMessage);' in text


def test_none_augmentation_gives_the_image_itself_twice():
  images = _images(3, seed=4, size=16)
  view1, view2 = augment.pair_views(np.random.default_rng(0), images, 'none', 16)
  np.testing.assert_array_equal(view1, images.astype(np.float32) / 255)
  np.testing.assert_array_equal(view2, view1)
  small, _ = augment.pair_views(np.random.default_rng(1), images, 'none', 8)
  assert small.shape == (3, 8, 8, 3)
  np.testing.assert_allclose(small.mean(), view1.mean(), atol=0.05)


# ---------------------------------------------------------------------------
# The hub with well-behaved clients.


def test_smashed_gradients_weights_and_average_round_trip(hub, tmp_path):
  checkpoint = str(tmp_path / 'a.npz')
  players = {'a': Player(hub.address, 'a', TOKENS['a'], checkpoint),
             'b': Player(hub.address, 'b', TOKENS['b'])}
  assert hub.wait_connected({'a', 'b'}, WAIT_S) == {'a', 'b'}
  twins = {cid: fake_client() for cid in players}
  draws = {'a': ids(0, 1, 2, 3), 'b': ids(9, 8, 7, 6)}
  out = hub.smashed(0, 0, draws, SHAPE)
  rng = np.random.default_rng(0)
  grads = {}
  for cid, twin in twins.items():
    want = twin.forward(draws[cid])
    np.testing.assert_array_equal(out[cid][0], want[0])
    np.testing.assert_array_equal(out[cid][1], want[1])
    grads[cid] = rng.normal(size=SHAPE).astype(np.float32)
    twin.apply_gradient(grads[cid], 0)
  hub.gradients(0, 0, grads)
  weights = hub.weights(0, ['a', 'b'])
  for cid, twin in twins.items():
    assert set(weights[cid]) == {'online__w'}  # the EMA and momentum stay on the device
    np.testing.assert_array_equal(weights[cid]['online__w'], twin.get_weights()['online__w'])
  average = {name: (weights['a'][name] + weights['b'][name]) / 2 for name in weights['a']}
  hub.average(0, ['a', 'b'], average)
  again = hub.weights(1, ['a', 'b'])
  for cid in players:
    np.testing.assert_array_equal(again[cid]['online__w'], average['online__w'])
  assert players['a'].client.steps == 1
  hub.close(done=True)
  assert [player.join() for player in players.values()] == ['done', 'done']
  resumed = fake_client(seed=3)
  resumed.load(checkpoint)
  assert (resumed.steps, resumed.round, resumed.seed) == (1, 0, 1)
  np.testing.assert_array_equal(resumed.get_weights()['online__w'], average['online__w'])
  assert hub.drain_drops() == []


def test_frozen_steps_a_dropped_step_and_bad_sample_ids(hub):
  player = Player(hub.address, 'a', TOKENS['a'])
  hub.wait_connected({'a'}, WAIT_S)
  hub.smashed(0, 0, {'a': ids(0, 1, 2, 3)}, SHAPE, frozen=True)
  assert player.client.steps == 1 and not player.client.step_in_progress
  hub.smashed(0, 1, {'a': ids(0, 1, 2, 3)}, SHAPE)  # its gradient never comes
  hub.smashed(0, 2, {'a': ids(4, 5, 6, 7)}, SHAPE)  # the client ends the dropped step itself
  assert player.client.steps == 1 and player.client.step_in_progress
  assert hub.smashed(0, 3, {'a': ids(0, 1, 2, 10)}, SHAPE) == {}
  (drop,) = hub.drain_drops()
  assert drop['client_id'] == 'a' and drop['step'] == 3
  assert 'the client reported: step_request: sample ids [0, 1, 2, 10] are not 4 positions' in \
      drop['reason']
  assert hub.connected() == {'a'}


def test_a_client_reconnects_to_a_restarted_server(hub):
  player = Player(hub.address, 'a', TOKENS['a'])
  hub.wait_connected({'a'}, WAIT_S)
  address = hub.address
  hub.close(done=False, grace_s=0)  # the server dies
  with EdgeHub(address, TOKENS, timeout_s=WAIT_S, log=[].append, hold_welcomes=True) as restarted:
    # Connected while the server restores its state, the client waits for its Welcome.
    assert restarted.wait_connected({'a'}, WAIT_S) == {'a'}
    restarted.set_welcome(lambda cid: {'online__w': np.full((3, 2), 7, np.float32)}, round=4)
    assert restarted.weights(0, ['a'])['a']['online__w'][0, 0] == 7  # the Welcome's weights
    assert player.client.round == 4
  assert player.join() == 'done'
  assert any('connection lost' in line for line in player.logs)


# ---------------------------------------------------------------------------
# Faults.


@pytest.mark.parametrize('cid,token,code,reason', [
    ('a', 'wrong', grpc.StatusCode.UNAUTHENTICATED, 'wrong token for client a'),
    ('zed', 'secret-a', grpc.StatusCode.UNAUTHENTICATED, "unknown client id 'zed'"),
    ('c', 'secret-a', grpc.StatusCode.PERMISSION_DENIED, 'client c is simulated by the server'),
])
def test_refused_clients_get_a_reason_and_the_others_go_on(hub, cid, token, code, reason):
  good = Player(hub.address, 'b', TOKENS['b'])
  hub.wait_connected({'b'}, WAIT_S)
  bad = RawClient(hub.address, cid, token)
  assert reason in bad.receive('refusal').refusal.reason
  error = bad.receive()
  assert isinstance(error, grpc.RpcError) and error.code() == code and reason in error.details()
  assert any(f'refused a connection' in line and reason in line for line in hub.logs)
  assert set(hub.smashed(0, 0, {'b': ids(0, 1, 2, 3)}, SHAPE)) == {'b'}
  assert hub.connected() == {'b'}
  refused = Player(hub.address, cid, token)
  assert isinstance(refused.join(), remote.Refused)
  good.stop()


def test_a_second_connection_replaces_the_first(hub):
  first = RawClient(hub.address, 'a', TOKENS['a'])
  first.receive('welcome')
  second = RawClient(hub.address, 'a', TOKENS['a'])
  second.receive('welcome')
  assert 'connected again' in first.receive('refusal').refusal.reason
  future = smashed_async(hub, 0, 0, {'a': ids(0, 1, 2, 3)}, SHAPE)
  request = second.receive('step_request')
  zeros = protocol.encode(np.zeros(SHAPE, np.float32))
  second.send(request.seq, 'Smashed', online=zeros, ema=zeros)
  assert set(future.result()) == {'a'}
  second.close()


def test_timeouts_late_and_repeated_replies_and_rejoining():
  logs = []
  with EdgeHub('127.0.0.1:0', TOKENS, timeout_s=1.0, log=logs.append) as hub:
    player = Player(hub.address, 'b', TOKENS['b'])
    raw = RawClient(hub.address, 'a', TOKENS['a'])
    raw.receive('welcome')
    hub.wait_connected({'a', 'b'}, WAIT_S)
    draws = {'a': ids(0, 1, 2, 3), 'b': ids(0, 1, 2, 3)}
    future = smashed_async(hub, 0, 0, draws, SHAPE)
    late = raw.receive('step_request')
    assert set(future.result()) == {'b'}  # a did not answer within 1 s
    assert hub.drain_drops() == [dict(client_id='a', round=0, step=0,
                                      reason='no reply within 1 s')]
    zeros = protocol.encode(np.zeros(SHAPE, np.float32))
    ones = protocol.encode(np.ones(SHAPE, np.float32))
    raw.send(late.seq, 'Smashed', online=zeros, ema=zeros)  # late
    future = smashed_async(hub, 0, 1, draws, SHAPE)
    request = raw.receive('step_request')
    raw.send(late.seq, 'Smashed', online=zeros, ema=zeros)  # a repeat of the stale reply
    raw.send(request.seq, 'Smashed', online=ones, ema=ones)
    raw.send(request.seq, 'Smashed', online=zeros, ema=zeros)  # a repeat of the right one
    result = future.result()
    assert set(result) == {'a', 'b'} and result['a'][0].min() == 1
    # One more exchange: the stream is ordered, so the repeat has been read before its reply.
    future = smashed_async(hub, 0, 2, {'a': draws['a']}, SHAPE)
    raw.send(raw.receive('step_request').seq, 'Smashed', online=ones, ema=ones)
    assert set(future.result()) == {'a'}
    assert hub.drain_drops() == []
    raw.close()
    future = smashed_async(hub, 1, 0, draws, SHAPE)
    assert set(future.result()) == {'b'}
    (drop,) = hub.drain_drops()
    assert drop['client_id'] == 'a' and drop['reason'] in ('not connected', 'disconnected')
    rejoined = RawClient(hub.address, 'a', TOKENS['a'])
    rejoined.receive('welcome')
    future = smashed_async(hub, 1, 1, draws, SHAPE)
    rejoined.send(rejoined.receive('step_request').seq, 'Smashed', online=ones, ema=ones)
    assert set(future.result()) == {'a', 'b'}
    rejoined.close()
  player.join()
  ignored = [line for line in logs if 'client a: ignored a late or repeated smashed reply' in line]
  assert len(ignored) == 3
  assert any(f'(seq {late.seq})' in line for line in ignored)


def _tensor(shape, fill=0.0, dtype=np.float32, nbytes=None):
  array = np.full(shape, fill, dtype)
  data = array.astype(array.dtype.newbyteorder('<')).tobytes()
  return protocol.Tensor(shape=shape, dtype=array.dtype.name,
                         data=data if nbytes is None else bytes(nbytes))


@pytest.mark.parametrize('online,reason', [
    (_tensor((4, 16, 16, 3)), r'shape \(4, 16, 16, 3\), expected \(4, 16, 16, 2\)'),
    (_tensor(SHAPE, dtype=np.float64), "dtype 'float64', expected float32"),
    (_tensor(SHAPE, fill=np.nan), '2048 NaN or infinite values'),
    (_tensor(SHAPE, nbytes=50_000), r'reply of \d+ bytes, over the limit of 40000'),
    (None, 'the client reported: out of memory'),
])
def test_an_invalid_reply_drops_the_client_for_the_step(hub, online, reason):
  raw = RawClient(hub.address, 'a', TOKENS['a'])
  raw.receive('welcome')
  future = smashed_async(hub, 2, 5, {'a': ids(0, 1, 2, 3)}, SHAPE)
  seq = raw.receive('step_request').seq
  if online is None:
    raw.send(seq, 'Error', message='out of memory')
  else:
    raw.send(seq, 'Smashed', online=online, ema=_tensor(SHAPE))
  assert future.result() == {}
  (drop,) = hub.drain_drops()
  assert drop['client_id'] == 'a' and (drop['round'], drop['step']) == (2, 5)
  assert drop['reason'].startswith('rejected its smashed data: ')
  assert re.search(reason, drop['reason'])
  assert any('round 2 step 5: client a dropped: rejected' in line for line in hub.logs)
  assert hub.connected() == {'a'}  # still connected: only the step is lost
  raw.close()


def test_weights_are_checked_against_the_template(hub):
  raw = RawClient(hub.address, 'a', TOKENS['a'])
  raw.receive('welcome')
  pool = concurrent.futures.ThreadPoolExecutor(1)
  future = pool.submit(hub.weights, 3, ['a'], {'online__w': (3, 2), 'ema__w': (3, 2)})
  seq = raw.receive('weights_request').seq
  raw.send(seq, 'Weights', weights=protocol.encode_named({'online__w': np.zeros((3, 2),
                                                                               np.float32)}))
  assert future.result() == {}
  (drop,) = hub.drain_drops()
  assert drop == dict(client_id='a', round=3, step=None,
                      reason='rejected its weights: missing weight ema__w')
  raw.close()


def test_tls_with_a_self_signed_certificate(tmp_path):
  cert, key = tmp_path / 'cert.pem', tmp_path / 'key.pem'
  subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt',
                  'ec_paramgen_curve:prime256v1', '-nodes', '-days', '1', '-subj', '/CN=localhost',
                  '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1', '-keyout', str(key),
                  '-out', str(cert)], check=True, capture_output=True, timeout=WAIT_S)
  with EdgeHub('127.0.0.1:0', TOKENS, timeout_s=WAIT_S, tls_cert=str(cert), tls_key=str(key),
               log=[].append) as hub:
    player = Player(hub.address, 'a', TOKENS['a'], root_cert=cert.read_bytes())
    assert hub.wait_connected({'a'}, WAIT_S) == {'a'}
    assert set(hub.smashed(0, 0, {'a': ids(0, 1, 2, 3)}, SHAPE)) == {'a'}
  assert player.join() == 'done'
  with pytest.raises(HubError, match='give both --tls_cert and --tls_key'):
    EdgeHub('127.0.0.1:0', TOKENS, tls_cert=str(cert))
  with pytest.raises(HubError, match='cannot read the TLS key'):
    EdgeHub('127.0.0.1:0', TOKENS, tls_cert=str(cert), tls_key=str(tmp_path / 'no')).start()


def test_token_file(tmp_path):
  path = tmp_path / 'tokens'
  path.write_text('# id token\na secret-a\nb secret-b\n')
  assert read_tokens(str(path), ['a', 'b']) == TOKENS
  with pytest.raises(HubError, match='no token for edge client c'):
    read_tokens(str(path), ['a', 'c'])


# ---------------------------------------------------------------------------
# The real edge-client process.


@pytest.fixture(scope='module')
def exported_model(tmp_path_factory):
  """A trainable cut-1 client model (width 1/8, 16x16 images, batch 2) and its sidecar."""
  from mocosfl_jax.export import export_client
  from test_export import initial_weights, small_config
  config = small_config(1)
  path = tmp_path_factory.mktemp('export') / 'client.tflite'
  export_client(config, *initial_weights(config, seed=3), path, batch=2)
  return path


def _edge_process(hub, model, data, token_file, checkpoint, stderr):
  return subprocess.Popen(
      [sys.executable, '-m', 'mocosfl_jax.edge.client', f'--server={hub.address}',
       '--client_id=a', f'--token_file={token_file}', f'--model={model}', f'--data={data}',
       f'--checkpoint={checkpoint}', '--seed=4'], stderr=stderr)


def test_the_edge_client_process_steps_syncs_and_resumes(exported_model, tmp_path):
  from PIL import Image
  from mocosfl_jax.edge.model import ClientModel
  data = tmp_path / 'photos'
  data.mkdir()
  for i, image in enumerate(_images(6, seed=5, size=16)):
    Image.fromarray(image).save(data / f'{i}.png')
  token_file, checkpoint = tmp_path / 'token', tmp_path / 'state.npz'
  token_file.write_text('secret-a\n')
  twin = EdgeClient(ClientModel(str(exported_model)), load_images(str(data), 16), seed=4)
  shape = (2,) + twin.model.smashed_shape
  logs = []
  with open(tmp_path / 'stderr', 'w') as stderr:
    with EdgeHub('127.0.0.1:0', TOKENS, timeout_s=WAIT_S, log=logs.append) as hub:
      process = _edge_process(hub, exported_model, data, token_file, checkpoint, stderr)
      assert hub.wait_connected({'a'}, 2 * WAIT_S) == {'a'}
      out = hub.smashed(0, 0, {'a': ids(3, 1)}, shape)['a']
      for got, want in zip(out, twin.forward(ids(3, 1))):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
      grad = np.random.default_rng(0).normal(size=shape).astype(np.float32)
      hub.gradients(0, 0, {'a': grad})
      twin.apply_gradient(grad, 0)
      weights = hub.weights(0, ['a'])['a']
      assert set(weights) == set(remote.shared_weights(twin.get_weights()))
      for name, value in weights.items():
        np.testing.assert_allclose(value, twin.get_weights()[name], rtol=1e-6, atol=1e-6)
      average = {name: value / 2 for name, value in weights.items()}
      hub.average(0, ['a'], average)
    assert process.wait(WAIT_S) == 0
    saved = EdgeClient(ClientModel(str(exported_model)), load_images(str(data), 16))
    saved.load(str(checkpoint))
    assert (saved.steps, saved.round, saved.seed) == (1, 0, 4)
    np.testing.assert_array_equal(saved.get_weights()['online__stem__Conv_0__kernel'],
                                  average['online__stem__Conv_0__kernel'])
    # Restarted, the process resumes from its checkpoint.
    twin.set_weights(average)
    with EdgeHub('127.0.0.1:0', TOKENS, timeout_s=WAIT_S, log=logs.append) as hub:
      process = _edge_process(hub, exported_model, data, token_file, checkpoint, stderr)
      assert hub.wait_connected({'a'}, 2 * WAIT_S) == {'a'}
      out = hub.smashed(1, 0, {'a': ids(0, 5)}, shape)['a']
      for got, want in zip(out, twin.forward(ids(0, 5))):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert process.wait(WAIT_S) == 0
  assert any('client a connected' in line and '(step 1, last average round 0)' in line
             for line in logs), logs
