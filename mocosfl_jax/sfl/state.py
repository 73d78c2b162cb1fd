"""SimState: the whole simulation as one pytree.

Every per-client field carries a leading axis over ALL ``num_clients`` clients;
a round gathers the sampled pool's rows, trains them and scatters them back.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax

from mocosfl_jax.models import heads
from mocosfl_jax.sfl import moco

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Clients:
  """Per-client state, each leaf with a leading client axis."""
  online: PyTree      # client model parameters
  ema: PyTree         # momentum (EMA) client model parameters, stored in moco.ema_dtype
  opt: PyTree         # optimiser state (momentum buffers, learning rate)
  steps: jax.Array    # (N,) int32: steps each client has taken (drives its schedule)
  attacker: PyTree = None  # ResSFL's simulated attackers (privacy/ressfl.Attackers), or None

  def replace(self, **updates) -> Clients:
    return dataclasses.replace(self, **updates)


_CLIENT_FIELDS = ('online', 'ema', 'opt', 'steps')


def _flatten_clients(c: Clients):
  # Without attackers the tree is the one Clients had before ResSFL, field for
  # field and key for key, so that orbax restores the checkpoints written then
  # (it refuses a tree with an extra key, even one that holds None).
  names = _CLIENT_FIELDS + (() if c.attacker is None else ('attacker',))
  return [(jax.tree_util.GetAttrKey(name), getattr(c, name)) for name in names], len(names)


def _unflatten_clients(num_fields: int, children) -> Clients:
  return Clients(*children) if num_fields > len(_CLIENT_FIELDS) else Clients(*children, None)


jax.tree_util.register_pytree_with_keys(
    Clients, _flatten_clients, _unflatten_clients,
    flatten_func=lambda c: (tuple(v for _, v in _flatten_clients(c)[0]), _flatten_clients(c)[1]))


@flax.struct.dataclass
class SimState:
  server: PyTree      # online server variables ({'params': ..., maybe 'batch_stats'})
  server_ema: PyTree  # EMA server variables
  server_opt: PyTree
  clients: Clients
  queue: moco.Queue
  round: jax.Array    # completed rounds
  step: jax.Array     # completed server steps


def init_state(key: jax.Array, client_net, server_net, server_tx: optax.GradientTransformation,
               client_tx: optax.GradientTransformation, *, num_clients: int, image_size: int,
               queue_size: int, feature_sharing: bool, ema_dtype: str = 'float32') -> SimState:
  """Initial state; every client starts from the same client model (spec 1.3).

  ``ema_dtype`` (``moco.ema_dtype``) stores the clients' EMA models; 'bfloat16'
  rounds the initial one to nearest.
  """
  k_client, k_server, k_queue = jax.random.split(key, 3)
  image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  client_params = client_net.init(k_client, image)['params']
  smashed = jax.eval_shape(client_net.apply, {'params': client_params}, image)
  server_vars = server_net.init(k_server, jnp.zeros(smashed.shape, smashed.dtype))
  stack = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), tree)
  client_opt = client_tx.init(client_params)
  dim = heads.key_dim(server_net.moco_version)
  queue = moco.init_queue(k_queue, queue_size, dim, None if feature_sharing else num_clients)
  return SimState(
      server=server_vars,
      # A separate copy: the round function donates its input state.
      server_ema=jax.tree.map(jnp.copy, server_vars),
      server_opt=server_tx.init(server_vars['params']),
      clients=Clients(stack(client_params), stack(as_dtype(client_params, ema_dtype)),
                      stack(client_opt),
                      jnp.zeros((num_clients,), jnp.int32)),
      queue=queue,
      round=jnp.zeros((), jnp.int32),
      step=jnp.zeros((), jnp.int32))


def as_dtype(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype), tree)


def stochastic_round_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
  """float32 -> bfloat16, rounding up in magnitude with probability the dropped fraction.

  Unbiased: E[result] = x. bfloat16 is float32's upper 16 bits, so adding
  uniform random low bits and truncating them does it (the sign bit is
  separate, so negative numbers round symmetrically).
  """
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
  rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
  return lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


def store_ema(ema: PyTree, like: PyTree, key: jax.Array) -> PyTree:
  """The freshly updated (float32) EMA model in the dtypes of the stored one, ``like``.

  Float32 storage is returned as is. bfloat16 storage rounds stochastically:
  an EMA step moves a weight by (1 - decay) (online - ema), at decay 0.99 a
  hundredth of the gap, and round to nearest drops every move under half a
  bfloat16 ulp (2^-9 of the weight), so the stored EMA would stay put until
  the online model is about 20% away (experiments/ema_dtype.py measures it).
  Stochastic rounding keeps the expected update.
  """
  leaves, treedef = jax.tree.flatten(ema)
  kinds = treedef.flatten_up_to(like)
  if all(s.dtype == x.dtype for x, s in zip(leaves, kinds)):
    return ema
  keys = jax.random.split(key, len(leaves))
  stored = [x if s.dtype == x.dtype else stochastic_round_bf16(x, k)
            for x, s, k in zip(leaves, kinds, keys)]
  return treedef.unflatten(stored)


def count_params(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
