"""The split ResNets (10, 18, 34): shapes, parameter counts, norms and heads against references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.models import heads, resnet, split

import twins

IMAGES = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
# Programs are compiled unoptimised (twins.quick_jit): run once, they cost far
# less that way than optimised, or op by op, each operation compiled on its own.


def param_shapes(module, *inputs):
  """Parameter shapes without computing anything (full width stays cheap)."""
  return jax.eval_shape(module.init, jax.random.key(0), *inputs)['params']


def count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize('cut_layer, shape', [(1, (2, 32, 32, 64)), (2, (2, 32, 32, 64)),
                                              (3, (2, 32, 32, 64)), (4, (2, 16, 16, 128))])
def test_smashed_data_shape_per_cut_layer(cut_layer, shape):
  client = split.ClientNet(cut_layer)
  params = jax.eval_shape(client.init, jax.random.key(0), IMAGES)
  assert jax.eval_shape(client.apply, params, IMAGES).shape == shape


@pytest.mark.parametrize('cut_layer, expected', [(1, 1_856), (2, 75_840)])
def test_client_parameter_counts_equal_the_reference(cut_layer, expected):
  assert count(param_shapes(split.ClientNet(cut_layer), IMAGES)) == expected


@pytest.mark.parametrize('cut_layer', [1, 2, 3])
def test_client_and_server_hold_the_whole_resnet18_between_them(cut_layer):
  client, server = split.ClientNet(cut_layer), split.ServerNet(cut_layer)
  smashed = jax.eval_shape(client.apply, jax.eval_shape(client.init, jax.random.key(0), IMAGES),
                           IMAGES)
  server_params = param_shapes(server, smashed)
  backbone = count(param_shapes(client, IMAGES)) + count(server_params) - count(
      server_params['head'])
  # The CIFAR ResNet-18 without its classifier; GroupNorm has BatchNorm's two vectors.
  assert backbone == 11_168_832


def backbone_parameters(stage_blocks) -> int:
  """The CIFAR ResNet's convolution and GroupNorm parameters, counted layer by layer."""
  total, cin = 3 * 3 * 3 * 64 + 2 * 64, 64
  for cout, blocks in zip((64, 128, 256, 512), stage_blocks):
    for _ in range(blocks):
      total += 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout
      total += cin * cout + 2 * cout if cin != cout else 0
      cin = cout
  return total


@pytest.mark.parametrize('depth, stage_blocks', [(10, (1, 1, 1, 1)), (18, (2, 2, 2, 2)),
                                                 (34, (3, 4, 6, 3))])
def test_every_depth_splits_into_its_whole_backbone(depth, stage_blocks):
  assert backbone_parameters((2, 2, 2, 2)) == 11_168_832
  assert resnet.num_modules(depth) == 1 + sum(stage_blocks)
  client, server = split.ClientNet(1, depth=depth), split.ServerNet(1, depth=depth)
  client_params = param_shapes(client, IMAGES)
  smashed = jax.eval_shape(client.apply, {'params': client_params}, IMAGES)
  server_params = param_shapes(server, smashed)
  backbone = count(client_params) + count(server_params) - count(server_params['head'])
  assert backbone == backbone_parameters(stage_blocks)
  # A stage's first block halves the resolution (but the first stage's) and sets the channels.
  for stage, first in enumerate(np.cumsum((1,) + stage_blocks[:-1])):
    for cut_layer in (first, first + 1):
      expected = stage if cut_layer > first else max(stage - 1, 0)
      assert split.smashed_channels(cut_layer, 1.0, depth) == 64 << expected
      assert split.smashed_hw(cut_layer, 1.0, 32, depth) == (32 >> expected,) * 2


@pytest.mark.parametrize('version, out_dim, head_params', [
    ('V1', 128, 512 * 128 + 128),
    ('smallV2', 512, 2 * (512 * 512 + 512)),
    ('V2', 1024, 512 * 1024 + 1024 + 1024 * 1024 + 1024),
    ('largeV2', 2048, 512 * 4096 + 4096 + 2 * 4096 + 4096 * 2048 + 2048),
])
def test_heads_match_the_reference_sizes(version, out_dim, head_params):
  features = jax.ShapeDtypeStruct((2, 512), jnp.float32)
  head = heads.ProjectionHead(version)
  variables = jax.eval_shape(head.init, jax.random.key(0), features)
  assert count(variables['params']) == head_params
  mutable = ['batch_stats'] if 'batch_stats' in variables else False
  out = jax.eval_shape(lambda v, f: head.apply(v, f, mutable=mutable), variables, features)
  assert (out[0] if mutable else out).shape == (2, out_dim) and heads.key_dim(version) == out_dim


@pytest.mark.parametrize('features_only, dim', [(False, 1024), (True, 64)])
def test_server_output_is_the_head_or_the_pooled_feature(features_only, dim):
  width = 0.125
  server = split.ServerNet(cut_layer=8, width=width)
  smashed = jax.ShapeDtypeStruct((3, 4, 4, 64), jnp.float32)
  variables = jax.eval_shape(server.init, jax.random.key(0), smashed)
  out = jax.eval_shape(lambda v, x: server.apply(v, x, features_only=features_only),
                       variables, smashed)
  assert out.shape == (3, dim)


def test_weight_standardization_matches_the_reference_formula():
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 8, 5)) * 0.3 + 0.1
  flat = np.asarray(kernel, np.float64).reshape(-1, 5)
  centred = flat - flat.mean(axis=0)
  expected = centred / (centred.std(axis=0, ddof=1) + 1e-5)
  np.testing.assert_allclose(np.asarray(resnet.standardize(kernel)).reshape(-1, 5), expected,
                             rtol=1e-5, atol=1e-5)


def test_group_norm_uses_four_channels_per_group_like_pytorch():
  x = jax.random.normal(jax.random.key(1), (2, 5, 5, 16)) * 2.0 + 0.5
  norm = resnet.group_norm(16)
  variables = twins.quick_jit(norm.init)(jax.random.key(0), x)
  groups = np.asarray(x, np.float64).reshape(2, 5, 5, 4, 4)
  mean = groups.mean(axis=(1, 2, 4), keepdims=True)
  var = groups.var(axis=(1, 2, 4), keepdims=True)  # biased, as torch.nn.GroupNorm
  expected = ((groups - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
  np.testing.assert_allclose(twins.quick_jit(norm.apply)(variables, x), expected,
                             rtol=1e-4, atol=1e-5)


def test_conv_init_is_pytorch_default_and_linear_init_is_xavier():
  server = split.ServerNet(cut_layer=8, width=1.0)
  variables = twins.quick_jit(server.init)(jax.random.key(0), jnp.ones((1, 4, 4, 512)))
  conv = np.asarray(variables['params']['layer4_block2']['Conv_0']['kernel'])
  bound = 1 / np.sqrt(3 * 3 * 512)  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  assert np.abs(conv).max() <= bound * (1 + 1e-6)
  assert np.std(conv) == pytest.approx(bound / np.sqrt(3), rel=0.02)
  dense = np.asarray(variables['params']['head']['Dense_0']['kernel'])
  xavier_bound = np.sqrt(6 / (512 + 1024))
  assert np.abs(dense).max() <= xavier_bound * (1 + 1e-6)
  assert np.std(dense) == pytest.approx(xavier_bound / np.sqrt(3), rel=0.02)


def test_downsampling_pads_symmetrically_like_pytorch():
  # A stride-2 3x3 conv with padding 1 on each side reads output (0, 0) from input
  # rows and columns -1..1; flax's asymmetric 'SAME' would read 0..2.
  x = jnp.zeros((1, 8, 8, 1)).at[0, 2, 2, 0].set(1.0)
  conv = resnet.Conv(1, 3, 2, weight_standardization=False)
  variables = {'params': {'kernel': jnp.ones((3, 3, 1, 1))}}
  out = conv.apply(variables, x)[0, :, :, 0]
  assert out.shape == (4, 4)
  assert float(out[0, 0]) == 0.0 and float(out[1, 1]) == 1.0


@pytest.mark.parametrize('cut_layer', [1, 2])
def test_client_as_matmul_equals_native_convolutions(cut_layer):
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  native = split.ClientNet(cut_layer, width=0.25)
  matmul = split.ClientNet(cut_layer, width=0.25, as_matmul=True)
  variables = twins.quick_jit(native.init)(jax.random.key(0), x)
  np.testing.assert_allclose(twins.quick_jit(matmul.apply)(variables, x),
                             twins.quick_jit(native.apply)(variables, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kernel_size, stride', [(3, 1), (3, 2), (1, 2)])
def test_matmul_conv_gradients_equal_native_convolution_gradients(kernel_size, stride):
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 5))
  kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 5, 4))
  pad = ((kernel_size // 2,) * 2,) * 2
  native = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (stride, stride), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  matmul = lambda x, k: resnet.conv_as_matmul(x, k, (stride, stride), pad)
  weights = jax.random.normal(jax.random.key(2), native(x, kernel).shape)
  grads = lambda f: twins.quick_jit(jax.grad(lambda x, k: jnp.sum(f(x, k) * weights),
                                              argnums=(0, 1)))(x, kernel)
  for got, want in zip(grads(matmul), grads(native)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_paper_names_for_cut_layers():
  assert split.PAPER_NAMES == {1: 'MocoSFL-1', 2: 'MocoSFL-3', 3: 'MocoSFL-5'}
  assert [split.paper_name(cut) for cut in (1, 3, 4)] == ['MocoSFL-1', 'MocoSFL-5', 'cut 4']
  assert split.paper_name(1, depth=10) == 'cut 1'
