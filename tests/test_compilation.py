"""Compiler options and fusion boundaries of the convolution-heavy programs, and the suite's."""
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mocosfl_jax import compilation

import conftest


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def test_cpu_programs_leave_convolutions_to_eigen():
  assert jax.default_backend() == 'cpu'
  assert compilation.compiler_options() == compilation.CPU_OPTIONS
  x, w = jnp.ones((8, 32, 32, 64)), jnp.ones((3, 3, 64, 64))
  hlo = compilation.jit(conv).lower(x, w).compile().as_text()
  assert 'ynn_fusion' not in hlo
  np.testing.assert_allclose(compilation.jit(conv)(x, w), jax.jit(conv)(x, w), rtol=1e-5)


def test_an_option_this_jaxlib_lacks_is_dropped(monkeypatch):
  monkeypatch.setattr(compilation, 'CPU_OPTIONS', {'xla_cpu_no_such_option_for_sure': True})
  compilation.compiler_options.cache_clear()
  try:
    assert compilation.compiler_options() is None
    assert float(compilation.jit(jnp.sum)(jnp.ones(3))) == 3.0
  finally:
    compilation.compiler_options.cache_clear()


def test_materialize_is_the_identity_and_survives_compilation_as_a_boundary():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  f = lambda x: jnp.sum(jnp.sin(compilation.materialize(jnp.exp(x))))
  np.testing.assert_array_equal(jax.jit(compilation.materialize)(x), x)
  np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jnp.cos(jnp.exp(x)) * jnp.exp(x), rtol=1e-5)
  # The boundary is only worth its place if XLA keeps it; a jaxlib that folds the
  # conditional away should fail here rather than silently lose the speed-up.
  hlo = compilation.jit(f).lower(x).compile().as_text()
  assert ' conditional(' in hlo


def test_materialize_under_vmap_keeps_one_unbatched_boundary():
  x = jax.random.normal(jax.random.key(1), (5, 3, 4))
  f = lambda x: jnp.sum(jnp.sin(jax.vmap(compilation.materialize)(jnp.exp(x))))
  np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jnp.cos(jnp.exp(x)) * jnp.exp(x), rtol=1e-5)
  # A batched predicate would make the conditional a select of both branches.
  hlo = compilation.jit(f).lower(x).compile().as_text()
  assert ' conditional(' in hlo
  assert 'select' not in hlo


def test_the_suites_quick_flags_leave_out_what_this_xla_does_not_know(monkeypatch):
  # Both ways, so that a probe that always refused (and so dropped every quick flag) fails too.
  assert conftest._xla_accepts(['--xla_backend_optimization_level=0'])
  assert not conftest._xla_accepts(['--xla_cpu_no_such_flag_for_sure=1'])
  # One probe a flag costs a JAX import each: the rest with a stand-in.
  monkeypatch.setattr(conftest, '_xla_accepts', lambda flags: '--xla_cpu_no_such' not in str(flags))
  monkeypatch.setattr(conftest, 'QUICK_COMPILE_FLAGS',
                      '--xla_backend_optimization_level=0 --xla_cpu_no_such_flag_for_sure=1')
  warnings = []
  config = types.SimpleNamespace(
      issue_config_time_warning=lambda warning, stacklevel: warnings.append(str(warning)))
  assert conftest.quick_compile_flags(config) == ['--xla_backend_optimization_level=0']
  assert warnings == ["this jaxlib's XLA does not know --xla_cpu_no_such_flag_for_sure=1: the "
                      'suite compiles without it and takes longer']
