"""Optimisers and learning-rate schedules of the server and the clients (spec 4.6, 9.2)."""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax


def sgd(momentum: float, weight_decay: float) -> optax.GradientTransformation:
  """PyTorch's SGD: coupled weight decay on every parameter, then heavy-ball momentum.

  The learning rate is a hyper-parameter in the optimiser state, set before each
  update, so that one optimiser serves every schedule (server per epoch, client per
  own step or per epoch) and a stacked per-client state can hold one rate per client.
  """
  def make(learning_rate):
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum))
  return optax.inject_hyperparams(make)(learning_rate=0.0)


def with_learning_rate(opt_state, learning_rate):
  """The optimiser state with its learning rate replaced."""
  hyper = dict(opt_state.hyperparams, learning_rate=jnp.asarray(learning_rate, float))
  return opt_state._replace(hyperparams=hyper)


def cosine_per_epoch(base_lr: float, num_epochs: int):
  """Cosine annealing to zero over ``num_epochs``, stepped once per epoch (the server's)."""
  return optax.cosine_decay_schedule(base_lr, decay_steps=max(num_epochs, 1))


SCHEDULES = ('auto', 'cosine', 'multistep')


def schedule_kind(schedule: str, moco_version: str) -> str:
  """``optim.schedule`` resolved: 'auto' is the reference's choice, multi-step for V1 (spec 1.6)."""
  if schedule == 'auto':
    return 'multistep' if moco_version == 'V1' else 'cosine'
  return schedule


def multistep(base_lr: float, num_epochs: int, gamma: float):
  """PyTorch's MultiStepLR at 60% and 80% of ``num_epochs``: base x gamma^(milestones passed).

  The reference's V1 schedule (spec 4.6): gamma 0.1 for the server, per
  epoch; 0.2 for the clients, whose scheduler counts their own steps against
  the same epoch milestones.
  """
  scales = {}
  for milestone in (int(0.6 * num_epochs), int(0.8 * num_epochs)):
    scales[milestone] = scales.get(milestone, 1.0) * gamma
  return optax.piecewise_constant_schedule(base_lr, scales)


def client_base_lr(optim_config) -> float:
  """The clients' base rate: ``optim.client_lr``, or the server's ``optim.lr`` when negative."""
  return optim_config.lr if optim_config.client_lr < 0 else optim_config.client_lr


def frozen_clients(optim_config) -> bool:
  """The clients' base rate is 0: TAResSFL's frozen clients (spec 6.4).

  Every schedule scales the base rate, so the clients never move. The step
  then skips their backward and update, the round its FedAvg, and the
  overhead accounting their gradients and weights.
  """
  return client_base_lr(optim_config) == 0


# The reference's V1 multi-step factors (spec 4.6).
SERVER_MULTISTEP_GAMMA, CLIENT_MULTISTEP_GAMMA = 0.1, 0.2


def learning_rates(config):
  """(server_lr(round), client_lr(client_steps, round)) as a config resolves them.

  The one place that reads ``optim.schedule`` and ``optim.client_schedule``:
  the engine trains with these, and the LiteRT export's sidecar describes them.
  """
  base, rounds = client_base_lr(config.optim), config.num_rounds
  if schedule_kind(config.optim.schedule, config.moco.version) == 'multistep':
    server_lr = multistep(config.optim.lr, rounds, SERVER_MULTISTEP_GAMMA)
    per_step = per_round = multistep(base, rounds, CLIENT_MULTISTEP_GAMMA)
  else:
    server_lr = cosine_per_epoch(config.optim.lr, rounds)
    per_step = reference_client_cosine(base, rounds)
    per_round = cosine_per_epoch(base, rounds)
  if config.optim.client_schedule == 'per_client_step':
    return server_lr, lambda steps, rnd: per_step(steps)
  return server_lr, lambda steps, rnd: jnp.broadcast_to(per_round(rnd), jnp.shape(steps))


def reference_client_cosine(base_lr: float, num_epochs: int):
  """The reference's client schedule: a per-epoch cosine stepped after every client step.

  PyTorch's CosineAnnealingLR keeps going past its horizon, so in a client's own
  step count t the rate is base * (1 + cos(pi t / num_epochs)) / 2, which
  oscillates with period 2 * num_epochs (spec 4.6). optax's cosine clamps at its
  horizon, hence this closed form.
  """
  def schedule(t):
    return base_lr * 0.5 * (1.0 + jnp.cos(math.pi * t / max(num_epochs, 1)))
  return schedule
