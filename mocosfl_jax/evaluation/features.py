"""Frozen features of a client + server model pair, for the kNN monitor and the probes."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mocosfl_jax.data import augment


def pad_batches(images: jax.Array, batch_size: int) -> jax.Array:
  """(num_batches, batch_size, ...) with the last batch zero-padded."""
  n = images.shape[0]
  padded = -(-n // batch_size) * batch_size
  images = jnp.pad(images, [(0, padded - n)] + [(0, 0)] * (images.ndim - 1))
  return images.reshape((padded // batch_size, batch_size) + images.shape[1:])


def make_embed(client_net, server_net, mean, std, batch_size: int = 500):
  """Builds ``embed(client_params, server_vars, images, head) -> (n, D)``.

  ``head=True`` gives the projection-head output (the reference's kNN feature,
  spec 9.14); ``head=False`` the 512-d pooled backbone feature (the probes').
  One compiled program per image count; batches run in a device loop.
  """
  @functools.partial(jax.jit, static_argnames='head')
  def embed(client_params, server_vars, images, head: bool = True):
    def one_batch(batch):
      x = augment.normalize(batch, mean, std)
      smashed = client_net.apply({'params': client_params}, x)
      return server_net.apply(server_vars, smashed, train=False, features_only=not head)
    out = lax.map(one_batch, pad_batches(images, batch_size))
    return out.reshape((-1, out.shape[-1]))[:images.shape[0]]
  return embed
