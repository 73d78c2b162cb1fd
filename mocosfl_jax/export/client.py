"""What the exported signatures compute, as JAX functions of explicit weights.

Each function is the engine's own code path for one client: the project's
``ClientNet`` (native convolutions, which LiteRT maps to CONV_2D, and no
``compilation.materialize`` boundaries, which LiteRT has no use for), the
normalisation of ``augment.normalize``, the client optimiser ``optim.sgd``
updated as ``sfl/step.py`` updates it, and the EMA move of ``sfl/step.py``.
The converter (``litert.py``) holds the weights in variables and calls these.

Weights travel as flat dictionaries ``{'stem__Conv_0__kernel': array}``: the
flax parameter path joined by ``SEPARATOR``. TensorFlow turns '/' and '.' in
signature argument names into '_', and flax names hold single underscores
(``Conv_0``), so a double underscore is the one spelling that reads back.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from mocosfl_jax import compilation
from mocosfl_jax.data import sources
from mocosfl_jax.models import split
from mocosfl_jax.sfl import optim

SEPARATOR = '__'
# Prefixes of the weight names in get_weights / set_weights.
GROUPS = ('online', 'ema', 'momentum')

Flat = dict[str, Any]


def flatten(params: Mapping[str, Any]) -> Flat:
  """flax parameters -> ``{'stem__Conv_0__kernel': array}``, in sorted order."""
  flat = traverse_util.flatten_dict(params, sep=SEPARATOR)
  return {name: flat[name] for name in sorted(flat)}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of :func:`flatten`."""
  return traverse_util.unflatten_dict(dict(flat), sep=SEPARATOR)


def client_net(config: ml_collections.ConfigDict) -> split.ClientNet:
  """The client module of ``config`` with native convolutions.

  The engine may run clients as matmuls (``model.client_impl``); the
  parameters are the same, and LiteRT (XNNPACK) runs a CONV_2D faster than
  the patch gathering.
  """
  client, _ = split.build(config, as_matmul=False)
  return client


def momentum_of(opt_state) -> Any:
  """The momentum buffers (optax's ``trace``) of a client optimiser state."""
  return optax.tree_utils.tree_get(opt_state, 'trace')


@dataclasses.dataclass(frozen=True)
class ClientFunctions:
  """The client's device functions; weights are flat dictionaries (see :func:`flatten`).

  Attributes:
    forward: (weights, images) -> smashed; images float32 (B, H, W, 3) in
      [0, 1], normalised inside.
    train: (online, momentum, images, smashed_grad, lr (1,)) -> (online,
      momentum): recomputes the forward pass, back-propagates smashed_grad
      and takes one step of the client optimiser.
    ema_update: (online, ema, decay (1,)) -> ema.
    init: key -> online weights of a fresh client model.
  """
  forward: Callable
  train: Callable
  ema_update: Callable
  init: Callable


def make(config: ml_collections.ConfigDict) -> ClientFunctions:
  """The device functions of ``config``'s client model and optimiser."""
  net = client_net(config)
  mean, std = (np.asarray(v, np.float32) for v in sources.normalization(config.data.name))
  tx = optim.sgd(config.optim.momentum, config.optim.weight_decay)
  size = config.model.image_size

  def forward(weights, images):
    # Set here, not around the conversion: JAX reuses a function's trace for
    # the same shapes, so every trace of it must be boundary-free.
    with compilation.without_boundaries():
      return net.apply({'params': unflatten(weights)}, (images - mean) / std)

  def train(online, momentum, images, smashed_grad, lr):
    with compilation.without_boundaries():  # the backward's GroupNorm has them too
      _, vjp = jax.vjp(lambda w: forward(w, images), online)
      (grads,) = vjp(smashed_grad)
    # A fresh state carrying the device's momentum: optax's trace starts at
    # zero, so its first step is PyTorch's (buffer = gradient).
    opt_state = optax.tree_utils.tree_set(tx.init(online), trace=momentum)
    opt_state = optim.with_learning_rate(opt_state, lr[0])
    updates, opt_state = tx.update(grads, opt_state, online)
    return optax.apply_updates(online, updates), momentum_of(opt_state)

  def ema_update(online, ema, decay):
    return optax.incremental_update(online, ema, 1.0 - decay[0])

  def init(key):
    return flatten(net.init(key, jnp.zeros((1, size, size, 3), jnp.float32))['params'])

  return ClientFunctions(forward, train, ema_update, init)
