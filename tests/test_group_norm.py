"""The hand-written GroupNorm backward against autodiff of flax's GroupNorm."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.models import group_norm

import twins

# Every computation is one program compiled unoptimised (twins.quick_jit): op by
# op, each operation of each shape would compile on its own, at far more cost.


def reference(x, scale, bias):
  flax_norm = nn.GroupNorm(num_groups=x.shape[-1] // 4, epsilon=1e-5, use_fast_variance=False)
  return flax_norm.apply({'params': {'scale': scale, 'bias': bias}}, x)


def ours(x, scale, bias):
  return group_norm.group_norm(x, scale, bias, x.shape[-1] // 4, 1e-5)


def inputs(shape, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], shape) * 2.0 + 0.5
  scale = 1.0 + 0.3 * jax.random.normal(keys[1], shape[-1:])
  bias = 0.3 * jax.random.normal(keys[2], shape[-1:])
  # A smooth downstream loss: a ReLU would make the comparison hinge on ties.
  weight = jax.random.normal(keys[3], shape)
  return x, scale, bias, weight


@pytest.mark.parametrize('shape', [(3, 6, 5, 8), (2, 4, 4, 16)])
def test_forward_and_every_gradient_equal_flax_groupnorm(shape):
  x, scale, bias, weight = inputs(shape)
  grads = {}
  for name, norm in [('reference', reference), ('ours', ours)]:
    loss = lambda x, s, b, norm=norm: jnp.sum(jnp.tanh(norm(x, s, b)) * weight)
    grads[name] = twins.quick_jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
  np.testing.assert_allclose(twins.quick_jit(ours)(x, scale, bias),
                             twins.quick_jit(reference)(x, scale, bias), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads['ours']), jax.tree.leaves(grads['reference'])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_vmapped_over_per_client_parameters_equals_a_loop():
  x, _, _, weight = inputs((3, 2, 4, 4, 8), seed=1)
  scale = 1.0 + 0.3 * jax.random.normal(jax.random.key(5), (3, 8))
  bias = 0.3 * jax.random.normal(jax.random.key(6), (3, 8))
  loss = lambda norm: lambda x, s, b: jnp.sum(jnp.tanh(jax.vmap(norm)(x, s, b)) * weight)
  got = twins.quick_jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(x, scale, bias)
  want = twins.quick_jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(x, scale, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_module_keeps_flax_parameter_names_and_output_dtype_and_rejects_other_ranks():
  module = group_norm.GroupNorm(num_groups=2)
  params = twins.quick_jit(module.init)(jax.random.key(0), jnp.ones((1, 2, 2, 8)))['params']
  assert {k: v.shape for k, v in params.items()} == {'scale': (8,), 'bias': (8,)}
  x = jax.random.normal(jax.random.key(1), (2, 3, 3, 8))
  half = x.astype(jnp.bfloat16)
  out = twins.quick_jit(module.apply)({'params': params}, half)
  assert out.dtype == jnp.float32
  want = twins.quick_jit(reference)(half, params['scale'], params['bias'])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='3 groups do not divide 8 channels'):
    group_norm.GroupNorm(num_groups=3).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r'\(N, H, W, C\)'):
    module.init(jax.random.key(0), jnp.ones((2, 8)))
