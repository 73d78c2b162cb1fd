"""The bottleneck layer at the cut (spec 1.5): grammar, shapes, sizes, PyTorch's
transposed conv, the client formulations and the step against its loop twin."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax import checkpoint
from mocosfl_jax import config as config_lib
from mocosfl_jax import config_checks
from mocosfl_jax.config_checks import ConfigError
from mocosfl_jax.evaluation import features
from mocosfl_jax.models import bottleneck, split

import test_step
import tiny
import twins

IMAGES = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)


def shapes(cut_layer, option, width=1.0, images=IMAGES):
  """(client params, smashed data, server params) as shapes: full width costs nothing."""
  client = split.ClientNet(cut_layer, width, bottleneck=option)
  server = split.ServerNet(cut_layer, width, bottleneck=option)
  client_params = jax.eval_shape(client.init, jax.random.key(0), images)['params']
  smashed = jax.eval_shape(client.apply, {'params': client_params}, images)
  server_params = jax.eval_shape(server.init, jax.random.key(0), smashed)['params']
  return client_params, smashed, server_params


def count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize('cut_layer', [1, 2, 3])
def test_c4s2_smashed_data_and_parameters_are_the_references(cut_layer):
  plain_client, plain_smashed, plain_server = shapes(cut_layer, '')
  client, smashed, server = shapes(cut_layer, 'C4S2')
  assert plain_smashed.shape == (2, 32, 32, 64) and smashed.shape == (2, 16, 16, 4)
  assert count(client) - count(plain_client) == 2_308    # conv 3x3 64 -> 4 with bias
  assert count(server) - count(plain_server) == 2_368    # transposed conv 3x3 4 -> 64 with bias
  assert 'bottleneck' not in plain_client and 'bottleneck' not in plain_server


@pytest.mark.parametrize('option, shape', [('C8S4', (8, 8, 8)), ('K1C8noRELU', (32, 32, 8)),
                                           ('C2S8', (4, 4, 2))])
def test_smashed_data_shape(option, shape):
  assert shapes(1, option)[1].shape == (2,) + shape


@pytest.mark.parametrize('cut_layer', [3, 5, 8])  # stages 0, 1 and 3
def test_the_server_restores_the_smashed_shape(cut_layer):
  """The server's first module gets the channels and size it has without a bottleneck."""
  (_, plain_smashed, plain_server), (_, _, server) = (shapes(cut_layer, option, 0.0625)
                                                       for option in ('', 'C3S2'))
  assert split.smashed_hw(cut_layer, 0.0625, 32) == plain_smashed.shape[1:3]
  assert split.smashed_channels(cut_layer, 0.0625) == plain_smashed.shape[-1]
  without = {k: v for k, v in server.items() if k != 'bottleneck'}
  assert jax.tree.map(lambda x: x.shape, without) == jax.tree.map(lambda x: x.shape, plain_server)


def torch_conv_transpose(x, weight, stride=2, padding=1, output_padding=1):
  """PyTorch's ConvTranspose2d by definition: every input pixel scatters weight * value.

  x (N, C_in, H, W), weight (C_in, C_out, k, k), both NumPy, NCHW as in PyTorch.
  """
  n, _, h, w = x.shape
  _, c_out, k, _ = weight.shape
  full = np.zeros((n, c_out, (h - 1) * stride + k + output_padding,
                   (w - 1) * stride + k + output_padding))
  for i in range(h):
    for j in range(w):
      full[:, :, i * stride:i * stride + k, j * stride:j * stride + k] += np.einsum(
          'nc,cokl->nokl', x[:, :, i, j], weight)
  out_h = (h - 1) * stride - 2 * padding + k + output_padding
  out_w = (w - 1) * stride - 2 * padding + k + output_padding
  return full[:, :, padding:padding + out_h, padding:padding + out_w]


def test_transposed_conv_equals_pytorchs_definition():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 6, 3))            # NHWC, not square: rows and columns not mixed up
  weight = rng.normal(size=(3, 7, 3, 3))       # PyTorch's (in, out, kh, kw)
  bias = rng.normal(size=7)
  expected = torch_conv_transpose(x.transpose(0, 3, 1, 2), weight).transpose(0, 2, 3, 1) + bias
  layer = bottleneck.BiasConvTranspose(7)
  with jax.enable_x64(True):
    params = {'kernel': jnp.asarray(weight.transpose(2, 3, 0, 1)), 'bias': jnp.asarray(bias)}
    out = layer.apply({'params': params}, jnp.asarray(x))
  assert out.shape == (2, 10, 12, 7)           # exactly doubled
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-10, atol=1e-12)


def test_relus_follow_the_reference():
  """ReLU after each side's last conv and between convs; none at all with noRELU."""
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 6))

  @twins.quick_jit(static_argnums=0)
  def round_trip(option, x):
    compress, decompress = bottleneck.Compress(option), bottleneck.Decompress(option, 6)
    params = compress.init(jax.random.key(1), x)
    # Negative biases: without a ReLU after the last conv, some outputs stay negative.
    params = jax.tree.map(lambda p: p - 1.0 if p.ndim == 1 else p, params)
    smashed = compress.apply(params, x)
    restored = decompress.apply(decompress.init(jax.random.key(2), smashed), smashed - 1.0)
    return smashed, restored

  for option, clipped in (('C4S4', True), ('C4S4noRELU', False)):
    smashed, restored = round_trip(option, x)
    assert smashed.shape == (1, 2, 2, 4) and bool(jnp.all(smashed >= 0)) == clipped
    assert restored.shape == x.shape and bool(jnp.all(restored >= 0)) == clipped
  names = lambda module, x: sorted(jax.eval_shape(module.init, jax.random.key(0), x)['params'])
  assert names(bottleneck.Compress('C4S8'), x) == ['conv1', 'conv2', 'conv3']
  assert names(bottleneck.Decompress('C4S8', 6), jnp.zeros((1, 1, 1, 4))) == [
      'deconv1', 'deconv2', 'deconv3']


@pytest.mark.parametrize('option', ['C4S4', 'K5C3'])
def test_matmul_client_equals_native_convolutions(option):
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  native = split.ClientNet(1, width=0.25, bottleneck=option)
  matmul = split.ClientNet(1, width=0.25, as_matmul=True, bottleneck=option)
  params = twins.quick_jit(native.init)(jax.random.key(1), x)
  # Xavier init with zero bias: perturb the biases so that they count.
  params = jax.tree.map(lambda p: p + 0.1, params)
  np.testing.assert_allclose(twins.quick_jit(matmul.apply)(params, x),
                             twins.quick_jit(native.apply)(params, x), rtol=1e-5, atol=1e-5)


def test_vmapped_step_with_a_bottleneck_equals_per_client_loop():
  """test_step's comparison with C4S2 on both sides (test_step builds plain models).

  The client as matmuls, the default; test_matmul_client_equals_native_convolutions
  covers the native convolutions of 'vmap' and 'map'.
  """
  n = test_step.N_POOL
  with jax.enable_x64(True):
    client = split.ClientNet(1, width=0.125, as_matmul=True, bottleneck='C4S2',
                             depth=tiny.DEPTH)
    server = split.ServerNet(1, width=0.125, moco_version='smallV2', bottleneck='C4S2',
                             depth=tiny.DEPTH)
    train_step = test_step.make_engine(client, server, 'matmul')
    state = test_step.pool_state(client, server)
    # NumPy for the twin's inputs and the comparisons: op by op, each small
    # operation would compile on its own.
    host = jax.device_get(state)
    round_index = int(host.round)
    rows = lambda tree: [jax.tree.map(lambda x: x[j], tree) for j in range(n)]
    twin = dict(online=rows(host.clients.online), ema=rows(host.clients.ema),
                bufs=rows(jax.tree.map(np.zeros_like, host.clients.online)),
                client_steps=host.clients.steps.tolist(), server=host.server['params'],
                server_ema=host.server_ema['params'],
                server_buf=jax.tree.map(np.zeros_like, host.server['params']),
                queue=host.queue.keys, ptr=0)
    rng = np.random.default_rng(0)
    for step in range(2):
      images = rng.integers(0, 256, (n, test_step.BATCH, test_step.SIZE, test_step.SIZE, 3),
                            np.uint8)
      state, metrics = train_step(state, images, jax.random.key(step))
      twin.update(twins.twin_step(
          client, server, test_step.fixed_views(None, images), online=twin['online'],
          ema=twin['ema'], bufs=twin['bufs'], client_steps=twin['client_steps'],
          server=twin['server'], server_ema=twin['server_ema'], server_buf=twin['server_buf'],
          queue=twin['queue'], ptr=twin['ptr'], round_index=round_index,
          num_rounds=test_step.ROUNDS, lr=test_step.LR, momentum=test_step.MOMENTUM,
          weight_decay=test_step.WD, temperature=test_step.T, tau=test_step.TAU))
      host = jax.device_get(state)
      np.testing.assert_allclose(float(metrics['loss']), twin['loss'], rtol=1e-10)
      for j, online in enumerate(rows(host.clients.online)):
        test_step.assert_close(online, twin['online'][j], f'client {j} after step {step}')
      test_step.assert_close(host.server['params'], twin['server'], 'server')
      np.testing.assert_allclose(host.queue.keys, twin['queue'], rtol=1e-10, atol=1e-15)
    # The bottleneck's own weights were trained on both sides.
    assert not np.allclose(host.server['params']['bottleneck']['deconv1']['bias'], 0)
    assert not np.allclose(host.clients.online['bottleneck']['conv1']['bias'], 0)


def test_knn_features_run_through_the_bottleneck():
  """The kNN monitor's embedding (the probes' differs in the head only) runs client then server."""
  config = config_lib.default_config()
  config.model.width, config.model.image_size, config.model.bottleneck = 0.0625, 8, 'C4S2'
  config.moco.version = 'smallV2'
  client, server = split.build(config)
  client_params = twins.quick_jit(client.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  assert client_params['params']['bottleneck']['conv1']['kernel'].shape == (3, 3, 4, 4)
  server_vars = twins.quick_jit(server.init)(jax.random.key(1), jnp.zeros((1, 4, 4, 4)))
  embed = features.make_embed(client, server, np.zeros(3), np.ones(3), batch_size=2)
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), np.uint8)
  out = embed(client_params['params'], server_vars, jnp.asarray(images), head=True)
  assert out.shape == (3, 512) and np.all(np.isfinite(out))


@pytest.mark.parametrize('option', ['C4S2', 'C4S2noRELU', 'K1C8', 'C8S4norelu', 'C16'])
def test_grammar_accepts_the_references_options(option):
  config = config_lib.default_config()
  config.model.bottleneck = option
  config_checks.validate(config)


@pytest.mark.parametrize('option, why', [
    ('C4S', 'C4S2'), ('c4s2', 'C4S2'), ('S2C4', 'C4S2'), ('None', 'C4S2'), ('C0', 'channel'),
    ('C4S3', 'power of 2'), ('K5C4S2', 'only at stride 1'), ('K2C4', 'odd'),
    ('C4S64', 'does not divide the smashed data\'s 32x32')])
def test_malformed_or_impossible_options_are_one_line_errors(option, why):
  config = config_lib.default_config()
  config.model.bottleneck = option
  with pytest.raises(ConfigError) as info:
    config_checks.validate(config)
  message = str(info.value)
  assert '\n' not in message and why in message
  assert f'model.bottleneck is {option!r}' in message
  if why == 'C4S2':
    assert bottleneck.GRAMMAR in message


def test_off_by_default_and_part_of_the_checkpointed_config():
  config = config_lib.default_config()
  assert config.model.bottleneck == ''
  client, server = split.build(config)
  assert client.bottleneck == '' and server.bottleneck == ''
  # A checkpoint written before the field existed resumes; another bottleneck does not.
  saved = config.to_dict()
  del saved['model']['bottleneck']
  assert checkpoint.config_differences(saved, config.to_dict()) == []
  config.model.bottleneck = 'C4S2'
  assert checkpoint.config_differences(saved, config.to_dict()) == ["model.bottleneck '' -> 'C4S2'"]
