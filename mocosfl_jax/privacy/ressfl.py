"""ResSFL's attacker-aware training (spec 6.3, fix 9.7): one simulated attacker per client.

Each pool client j holds its own decoder G_j (``decoders.simulated_attacker``)
and Adam state, stacked over clients like every other per-client field
(``Clients.attacker``). Every step, for every pool client at once:

1. G_j takes one Adam step maximising SSIM(G_j(a_j), x_j), the mean over the
   client's rows of each image's SSIM (``metrics.ssim``, the reference's zero
   padding), where a_j is its query view's smashed data, detached, and x_j
   the query view de-normalised to [0, 1];
2. with the updated G_j (BatchNorm in eval mode) s_j = SSIM(G_j(a_j), x_j)
   and the regulariser R_j = alpha max(s_j - target, 0) (alpha s_j when the
   target is <= 0, as the reference);
3. dR_j / da_j joins the client's slice of the server's gradient before the
   client's backward, so the client descends its contrastive loss plus R_j.

The reference uses the last pool client's smashed data and images for every
client's attacker and adds every regulariser gradient to that client's slice
(spec 9.7); this is the intended per-client version. Padding rows of ragged
batches count in no mean and no BatchNorm statistic. The attackers are never
averaged: FedAvg leaves them alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from mocosfl_jax.privacy import decoders, metrics

PyTree = Any


@flax.struct.dataclass
class Attackers:
  """Per-client attackers, each leaf with a leading client axis."""
  variables: PyTree  # {'params': ...} and, with BatchNorm, {'batch_stats': ...}
  opt: PyTree        # Adam's state


@dataclasses.dataclass(frozen=True)
class ResSFL:
  """What the step needs to train the attackers and regularise the clients.

  ``mean`` and ``std`` are the per-channel statistics the views were
  normalised with; ``lr`` is Adam's rate (constant: the reference's
  schedule for it is never stepped in run_sflmoco, spec 6.3).
  """
  decoder: nn.Module
  alpha: float
  target: float
  mean: tuple[float, ...]
  std: tuple[float, ...]
  lr: float = 1e-3

  @property
  def tx(self) -> optax.GradientTransformation:
    return optax.adam(self.lr)


def regularizer(ssim, alpha: float, target: float):
  """alpha max(ssim - target, 0) for a target > 0, else alpha ssim (the reference's rule)."""
  if target > 0:
    return alpha * jnp.maximum(ssim - target, 0.0)
  return alpha * ssim


def init_attackers(key: jax.Array, settings: ResSFL, smashed: jax.ShapeDtypeStruct,
                   num_clients: int) -> Attackers:
  """``num_clients`` attackers, each its own random draw, for smashed data shaped like ``smashed``'s rows."""
  def one(k):
    variables = settings.decoder.init(k, jnp.zeros((1,) + smashed.shape[1:], smashed.dtype))
    return Attackers(variables, settings.tx.init(variables['params']))
  return jax.vmap(one)(jax.random.split(key, num_clients))


def _mean(values, mask):
  if mask is None:
    return jnp.mean(values)
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _apply_train(decoder: nn.Module, variables, smashed, mask):
  if 'batch_stats' in variables:
    out, updates = decoder.apply(variables, smashed, train=True, mask=mask,
                                 mutable=['batch_stats'])
    return out, {**variables, **updates}
  return decoder.apply(variables, smashed, train=True, mask=mask), variables


def _client(settings: ResSFL, attacker: Attackers, smashed, images, mask):
  """One client's attacker step and regulariser: (attacker, dR/d smashed, SSIM, R)."""
  decoder = settings.decoder

  def attacker_loss(params):
    out, variables = _apply_train(decoder, {**attacker.variables, 'params': params}, smashed,
                                  mask)
    return -_mean(metrics.ssim(out, images), mask), variables

  params = attacker.variables['params']
  grads, variables = jax.grad(attacker_loss, has_aux=True)(params)
  updates, opt = settings.tx.update(grads, attacker.opt, params)
  variables = {**variables, 'params': optax.apply_updates(params, updates)}

  def privacy_loss(a):
    s = _mean(metrics.ssim(decoder.apply(variables, a, train=False), images), mask)
    return regularizer(s, settings.alpha, settings.target), s

  (r, s), grad = jax.value_and_grad(privacy_loss, has_aux=True)(smashed)
  return Attackers(variables, opt), grad, s, r


def attack_step(settings: ResSFL, attackers: Attackers, smashed: jax.Array, views: jax.Array,
                valid: jax.Array | None = None):
  """Every pool client's attacker step and regulariser gradient (module docstring).

  Args:
    settings: the attackers' decoder, alpha, target, Adam rate and the views'
      normalisation.
    attackers: the pool's attackers.
    smashed: (n, B, h, w, c) the clients' query smashed data.
    views: (n, B, H, W, 3) the normalised query views they came from.
    valid: (n, B) bool, the rows that count (ragged batches), or None.

  Returns:
    (the updated attackers, dR_j/d smashed as (n, B, h, w, c), metrics with
    the pool's mean SSIM after the attackers' step and mean regulariser).
  """
  mean = jnp.asarray(settings.mean, views.dtype)
  std = jnp.asarray(settings.std, views.dtype)
  images = jnp.clip(views * std + mean, 0.0, 1.0)
  smashed = jax.lax.stop_gradient(smashed)
  one = lambda a, s, x, m: _client(settings, a, s, x, m)
  if valid is None:
    attackers, grads, ssim, reg = jax.vmap(lambda a, s, x: one(a, s, x, None))(
        attackers, smashed, images)
  else:
    attackers, grads, ssim, reg = jax.vmap(one)(attackers, smashed, images, valid)
  return attackers, grads, {'attacker_ssim': jnp.mean(ssim), 'ressfl_regularizer': jnp.mean(reg)}


# Folded into the state's init key: the attackers get random draws of their
# own, and the rest of the state is that of a plain run of the same seed.
_ATTACKER_KEY = 0x7E55F1


def _decoder(config) -> nn.Module:
  p = config.privacy
  return decoders.simulated_attacker(p.attacker, config.model.image_size, config.batch_size,
                                     p.attacker_channels)


def from_config(config, mean, std) -> ResSFL | None:
  """The step's settings for ``config.privacy``, or None when ResSFL is off (alpha 0)."""
  p = config.privacy
  if not p.ressfl_alpha:
    return None
  return ResSFL(_decoder(config), float(p.ressfl_alpha), float(p.target_ssim),
                tuple(float(m) for m in mean), tuple(float(s) for s in std), float(p.attacker_lr))


def add_attackers(state, key: jax.Array, config, client_net):
  """``state`` with every client's attacker when ``config`` turns ResSFL on, else ``state``."""
  if not config.privacy.ressfl_alpha:
    return state
  settings = ResSFL(_decoder(config), 0.0, 0.0, (), (), float(config.privacy.attacker_lr))
  client0 = jax.tree.map(lambda x: x[0], state.clients.online)
  size = config.model.image_size
  smashed = jax.eval_shape(client_net.apply, {'params': client0},
                           jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  attackers = init_attackers(jax.random.fold_in(key, _ATTACKER_KEY), settings, smashed,
                             state.clients.steps.shape[0])
  return state.replace(clients=state.clients.replace(attacker=attackers))
