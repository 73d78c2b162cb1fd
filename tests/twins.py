"""Plain per-client reference implementations ("loop twins") of the vmapped engine.

They loop over clients in Python, write SGD and the queue by hand and share
nothing with the engine but the Flax modules, so an engine bug cannot hide in
both places.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np


def normalize_rows(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ce_positive_first(q, k, negatives, temperature):
  logits = jnp.concatenate([jnp.sum(q * k, -1, keepdims=True), q @ negatives.T], 1) / temperature
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0]), logits


def torch_sgd(param, grad, buf, lr, momentum, weight_decay):
  """PyTorch's SGD rule; the buffer starts as zero, which equals PyTorch's first-step clone."""
  d = grad + weight_decay * param
  buf = momentum * buf + d
  return param - lr * buf, buf


# XLA options for programs that run a few times on tiny inputs: compiling
# them fully optimised costs more than running them unoptimised.
QUICK_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def perturbed(tree, phase: float):
  """``tree`` plus a fixed pattern of amplitude 0.05 that differs between elements and phases.

  A pattern rather than random draws: one draw per parameter leaf is a random
  generator compiled per shape, seconds of every program that builds a state.
  """
  flat, unravel = jax.flatten_util.ravel_pytree(tree)
  return unravel(flat + 0.05 * jnp.sin(0.7 * jnp.arange(flat.size, dtype=flat.dtype) + phase))


def distinct_pool(state):
  """A three-client pool state in float64 whose clients, EMAs and schedule
  positions differ, so that a mixed-up row shows."""
  state = jax.tree.map(
      lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  clients = state.clients.replace(online=perturbed(state.clients.online, 1.0),
                                  ema=perturbed(state.clients.ema, 2.0),
                                  steps=jnp.array([0, 3, 9], jnp.int32))
  return state.replace(clients=clients, round=jnp.array(2, jnp.int32),
                       server_ema=perturbed(state.server_ema, 3.0))


def quick_jit(fun=None, **kwargs):
  """jax.jit with QUICK_COMPILE."""
  if fun is None:
    return functools.partial(quick_jit, **kwargs)
  return jax.jit(fun, compiler_options=QUICK_COMPILE, **kwargs)


# Every piece below is one compiled program: run eagerly, each operation (and
# each derivative of one) is compiled on its own the first time, which costs
# far more than the twin's arithmetic.
@quick_jit
def sgd_tree(params, grads, bufs, lr, momentum, weight_decay):
  """torch_sgd on every leaf; returns (params, bufs)."""
  pairs = jax.tree.map(lambda p, g, m: torch_sgd(p, g, m, lr, momentum, weight_decay),
                       params, grads, bufs)
  is_pair = lambda x: isinstance(x, tuple)
  return (jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair),
          jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair))


@quick_jit
def ema_tree(ema, online, tau):
  return jax.tree.map(lambda e, o: tau * e + (1 - tau) * o, ema, online)


@quick_jit(static_argnums=0)
def apply(net, params, x):
  return net.apply({'params': params}, x)


@quick_jit(static_argnums=0)
def client_grads(client_net, params, x, cotangent):
  """The gradient that the client's own smashed-data gradient ``cotangent`` gives its params."""
  _, vjp = jax.vjp(lambda p: client_net.apply({'params': p}, x), params)
  return vjp(cotangent)[0]


@quick_jit(static_argnames=('server_net', 'rows', 'temperature', 'symmetric'))
def server_loss_and_grads(server_net, params, a_q, a_k, k1, k2, queue, *, rows, temperature,
                          symmetric):
  """((loss, last term's logits), (d loss / d params, d loss / d a_q)).

  The symmetric loss, or term 1 alone (``symmetric=False``).

  ``queue``: shared (K, D), or per client (n, Kc, D) with ``rows`` the
  (start, stop) of each client's rows.
  """
  def cross_entropy(q, k):
    if queue.ndim == 2:
      return ce_positive_first(q, k, queue, temperature)
    # Each client's rows against its own queue; the mean is over all rows.
    parts = [ce_positive_first(q[a:b], k[a:b], queue[j], temperature)
             for j, (a, b) in enumerate(rows)]
    total = sum(loss * (b - a) for (loss, _), (a, b) in zip(parts, rows))
    return total / rows[-1][1], jnp.concatenate([logits for _, logits in parts])

  def loss_fn(params, a_q):
    apply_s = lambda x: server_net.apply({'params': params}, x)
    l12, logits = cross_entropy(normalize_rows(apply_s(a_q)), k2)
    if not symmetric:
      return l12, logits
    l21, logits = cross_entropy(normalize_rows(apply_s(a_k)), k1)
    return l12 + l21, logits

  return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, a_q)


def twin_step(client_net, server_net, views, *, online, ema, bufs, client_steps,
              server, server_ema, server_buf, queue, ptr, round_index, num_rounds,
              lr, momentum, weight_decay, temperature, tau, symmetric=True):
  """One MocoSFL step for a pool of clients, one client at a time.

  ``online``, ``ema``, ``bufs`` are lists (one pytree per pool client); ``views``
  is a pair of per-client image batches, (n, B, H, W, 3) arrays or lists of
  (B_j, H, W, 3) arrays of each client's own size (ragged batches). ``queue``
  is the shared (K, D) queue with an int ``ptr``, or per-client (n, Kc, D)
  queues with a list of pointers. Returns the new values and the loss.
  """
  view1, view2 = views
  n = len(view1)
  offsets = np.cumsum([0] + [len(v) for v in view1]).tolist()
  rows = tuple(zip(offsets[:-1], offsets[1:]))
  a_q, a_k, new_ema = [], [], []
  for j in range(n):
    a_q.append(apply(client_net, online[j], view1[j]))
    new_ema.append(ema_tree(ema[j], online[j], tau))
    a_k.append(apply(client_net, new_ema[j], view2[j]))
  a_q, a_k = jnp.concatenate(a_q), jnp.concatenate(a_k)
  server_ema = ema_tree(server_ema, server, tau)
  k2 = normalize_rows(apply(server_net, server_ema, a_k))
  k1 = normalize_rows(apply(server_net, server_ema, a_q))
  (loss, logits), (g_server, g_smashed) = server_loss_and_grads(
      server_net, server, a_q, a_k, k1, k2, jnp.asarray(queue), rows=rows,
      temperature=temperature, symmetric=symmetric)
  accuracy = jnp.mean(jnp.argmax(logits, 1) == 0)

  queue = np.array(queue)
  # The asymmetric loss enqueues the key view's keys only.
  blocks = [np.asarray(k1), np.asarray(k2)] if symmetric else [np.asarray(k2)]
  if queue.ndim == 3:
    ptr = list(ptr)
    for j, (a, b) in enumerate(rows):
      for key in np.concatenate([k[a:b] for k in blocks]):
        queue[j, ptr[j]] = key
        ptr[j] = (ptr[j] + 1) % queue.shape[1]
  else:
    for key in np.concatenate(blocks):
      queue[ptr] = key
      ptr = (ptr + 1) % len(queue)

  server_lr = lr * 0.5 * (1 + math.cos(math.pi * round_index / num_rounds))
  server, server_buf = sgd_tree(server, g_server, server_buf, server_lr, momentum, weight_decay)

  new_online, new_bufs, grads = [], [], []
  for j, (a, b) in enumerate(rows):
    grads.append(client_grads(client_net, online[j], view1[j], g_smashed[a:b]))
    client_lr = lr * 0.5 * (1 + math.cos(math.pi * client_steps[j] / num_rounds))
    params, buf = sgd_tree(online[j], grads[j], bufs[j], client_lr, momentum, weight_decay)
    new_online.append(params)
    new_bufs.append(buf)
  return dict(online=new_online, ema=new_ema, bufs=new_bufs, server=server,
              server_ema=server_ema, server_buf=server_buf, queue=queue, ptr=ptr,
              loss=float(loss), accuracy=float(accuracy), client_grads=grads,
              client_steps=[s + 1 for s in client_steps])
