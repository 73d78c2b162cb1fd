"""``jax.jit`` with the XLA options that the convolution-heavy programs are compiled with.

On CPU, XLA (jaxlib 0.10) hands convolutions to YNNPACK by default. For this
ResNet that is the slower library: a 64-channel 3x3 convolution at 32x32 takes
80 ms forward and 170 ms for its kernel gradient with YNNPACK, 44 ms and 72 ms
with XLA's Eigen path, and the paper-setting step drops from 8.4 s to 7.0 s
(design notes in README "Performance"). The option applies per program, so
nothing else in the process changes, and a jaxlib that does not know it simply
compiles without it.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

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
