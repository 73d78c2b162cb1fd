"""Frozen features of a client + server model pair, for the kNN monitor and the probes."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mocosfl_jax import compilation
from mocosfl_jax.data import augment


def make_embed(client_net, server_net, mean, std, batch_size: int = 500):
  """Builds ``embed(client_params, server_vars, images, head) -> (n, D)``.

  ``head=True`` gives the projection-head output (the reference's kNN feature,
  spec 9.14); ``head=False`` the 512-d pooled backbone feature (the probes').
  Batches of ``batch_size`` images (the last one zero-padded) are dispatched
  one by one to a single compiled program per ``head``: the training set, the
  test set and any other image count share it, where a program over all
  batches would compile the network again for each count.
  """
  @functools.partial(compilation.jit, static_argnames='head')
  def embed_batch(client_params, server_vars, batch, head: bool):
    x = augment.normalize(batch, mean, std)
    smashed = client_net.apply({'params': client_params}, x)
    return server_net.apply(server_vars, smashed, train=False, features_only=not head)

  def embed(client_params, server_vars, images, head: bool = True):
    n = images.shape[0]
    padded = jnp.pad(images, [(0, -n % batch_size)] + [(0, 0)] * (images.ndim - 1))
    # dynamic_slice: one slicing program for every offset.
    out = [embed_batch(client_params, server_vars,
                       lax.dynamic_slice_in_dim(padded, start, batch_size), head=head)
           for start in range(0, n, batch_size)]
    return jnp.concatenate(out)[:n]
  return embed
