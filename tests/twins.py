"""Plain per-client reference implementations ("loop twins") of the vmapped engine.

They loop over clients in Python, write SGD and the queue by hand and share
nothing with the engine but the Flax modules, so an engine bug cannot hide in
both places.
"""
from __future__ import annotations

import math

import jax
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


def twin_step(client_net, server_net, views, *, online, ema, bufs, client_steps,
              server, server_ema, server_buf, queue, ptr, round_index, num_rounds,
              lr, momentum, weight_decay, temperature, tau):
  """One MocoSFL step for a pool of clients, one client at a time.

  ``online``, ``ema``, ``bufs`` are lists (one pytree per pool client); ``views``
  is a pair of (n, B, H, W, 3) float arrays. Returns the new values and the loss.
  """
  view1, view2 = views
  n, b = view1.shape[:2]
  apply_c = lambda p, x: client_net.apply({'params': p}, x)
  apply_s = lambda p, x: server_net.apply({'params': p}, x)
  a_q, a_k, new_ema, vjps = [], [], [], []
  for j in range(n):
    out, vjp = jax.vjp(lambda p: apply_c(p, view1[j]), online[j])
    a_q.append(out)
    vjps.append(vjp)
    new_ema.append(jax.tree.map(lambda e, o: tau * e + (1 - tau) * o, ema[j], online[j]))
    a_k.append(apply_c(new_ema[j], view2[j]))
  a_q, a_k = jnp.concatenate(a_q), jnp.concatenate(a_k)
  server_ema = jax.tree.map(lambda e, o: tau * e + (1 - tau) * o, server_ema, server)
  k2 = normalize_rows(apply_s(server_ema, a_k))
  k1 = normalize_rows(apply_s(server_ema, a_q))

  def loss_fn(params, a_q):
    l12, _ = ce_positive_first(normalize_rows(apply_s(params, a_q)), k2, queue, temperature)
    l21, logits = ce_positive_first(normalize_rows(apply_s(params, a_k)), k1, queue, temperature)
    return l12 + l21, logits

  (loss, logits), (g_server, g_smashed) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(server, a_q)
  accuracy = jnp.mean(jnp.argmax(logits, 1) == 0)

  queue = np.array(queue)
  for key in np.concatenate([np.asarray(k1), np.asarray(k2)]):
    queue[ptr] = key
    ptr = (ptr + 1) % len(queue)

  server_lr = lr * 0.5 * (1 + math.cos(math.pi * round_index / num_rounds))
  pairs = jax.tree.map(lambda p, g, m: torch_sgd(p, g, m, server_lr, momentum, weight_decay),
                       server, g_server, server_buf)
  is_pair = lambda x: isinstance(x, tuple)
  server = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
  server_buf = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)

  new_online, new_bufs, client_grads = [], [], []
  for j in range(n):
    (grad,) = vjps[j](g_smashed[j * b:(j + 1) * b])
    client_grads.append(grad)
    client_lr = lr * 0.5 * (1 + math.cos(math.pi * client_steps[j] / num_rounds))
    pairs = jax.tree.map(lambda p, g, m: torch_sgd(p, g, m, client_lr, momentum, weight_decay),
                         online[j], grad, bufs[j])
    new_online.append(jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair))
    new_bufs.append(jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair))
  return dict(online=new_online, ema=new_ema, bufs=new_bufs, server=server,
              server_ema=server_ema, server_buf=server_buf, queue=queue, ptr=ptr,
              loss=float(loss), accuracy=float(accuracy), client_grads=client_grads,
              client_steps=[s + 1 for s in client_steps])
