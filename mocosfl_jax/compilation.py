"""``jax.jit`` with the XLA options that the convolution-heavy programs are compiled with.

On CPU, XLA (jaxlib 0.10) hands convolutions to YNNPACK by default. For this
ResNet that is the slower library: a 64-channel 3x3 convolution at 32x32 takes
80 ms forward and 170 ms for its kernel gradient with YNNPACK, 44 ms and 72 ms
with XLA's Eigen path, and the paper-setting step drops from 8.4 s to 7.0 s
(design notes in README "Performance"). The option applies per program, so
nothing else in the process changes, and a jaxlib that does not know it simply
compiles without it.

:func:`materialize` is the other CPU workaround: a fusion boundary for
activations that the kernel gradient transposes.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

CPU_OPTIONS = {
    # Empty: fuse nothing into YNNPACK, leaving convolutions and dots to Eigen.
    'xla_cpu_experimental_ynn_fusion_type': '',
}


@functools.cache
def compiler_options() -> dict[str, Any] | None:
  """The options for the default backend, or None where none apply or jaxlib lacks them."""
  if jax.default_backend() != 'cpu':
    return None
  try:
    jax.jit(jnp.negative, compiler_options=CPU_OPTIONS).lower(1.0).compile()
  except Exception:  # an older jaxlib rejects unknown option names  # pylint: disable=broad-except
    return None
  return dict(CPU_OPTIONS)


def jit(fun: Callable, **kwargs) -> Callable:
  """``jax.jit(fun, **kwargs)`` compiled with :func:`compiler_options`.

  Looks up the backend, so call it where JAX may initialise, not at import.
  """
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)


# Off while tracing for export: LiteRT has no use for an XLA:CPU fusion
# boundary, and with a dynamic batch the conditional does not convert.
_boundaries = contextvars.ContextVar('materialize_boundaries', default=True)


@contextlib.contextmanager
def without_boundaries() -> Iterator[None]:
  """Within the block, :func:`materialize` is the identity on every backend.

  It acts when a function is traced, so trace (``jax2tf.convert``,
  ``jax.make_jaxpr``) inside the block, not through a cached ``jax.jit``.
  """
  token = _boundaries.set(False)
  try:
    yield
  finally:
    _boundaries.reset(token)


def materialize(x: jax.Array) -> jax.Array:
  """Identity that XLA:CPU must materialise instead of fusing into its consumers.

  A convolution's kernel gradient reads its input transposed to channels-major.
  XLA:CPU fuses the whole GroupNorm / residual / ReLU chain that produced that
  input into the transpose and recomputes it there, reading four or five
  activation arrays in transposed order: 215 ms for one layer-1 transpose
  instead of about 15 ms. So every activation a server convolution reads (the
  smashed data, each block's output and its inner GroupNorm-ReLU) is stored.
  A conditional is the one boundary XLA:CPU keeps (``lax.optimization_barrier``
  is removed before fusion, and a conditional with identical branches is
  folded), so both branches are the identity but one passes through a
  barrier. Paper-setting CPU step: about 6.8 s -> 6.3 s for the block
  outputs, 6.1 s -> 5.8 s more for the inner activations. Other backends get
  ``x`` unchanged: a GPU conditional waits for its predicate on the host.
  Under ``vmap`` (the per-client models) it stays one boundary over the
  stacked array, and a cotangent passing back through it gets one too.
  """
  if jax.default_backend() != 'cpu' or not _boundaries.get():
    return x
  return _materialize(x)


@jax.custom_batching.custom_vmap
def _boundary(x):
  return jax.lax.cond(jnp.isfinite(x.ravel()[0]), lambda y: y, jax.lax.optimization_barrier, x)


@_boundary.def_vmap
def _boundary_vmap(axis_size, in_batched, x):
  # A batched predicate would turn the conditional into a select of both
  # branches, which XLA fuses away; one boundary over the whole stack keeps it.
  del axis_size
  return _boundary(x), in_batched[0]


# custom_vmap has no autodiff rule of its own. The cotangent gets the same
# boundary, as the conditional's transpose would give it. Being a custom_vjp,
# it supports reverse mode only: no jvp, jacfwd or second derivatives through it.
_materialize = jax.custom_vjp(_boundary)
_materialize.defvjp(lambda x: (_boundary(x), None), lambda _, g: (_boundary(g),))
