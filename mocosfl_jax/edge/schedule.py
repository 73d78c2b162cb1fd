"""The client's learning rate, computed as the engine computes it, in NumPy.

mocosfl_jax/train.py ``build`` gives the engine's clients ``client_lr(steps,
round)`` (steps: the client's own steps before this one; round: rounds
finished before this one):

- ``schedule='cosine'``: ``client_schedule='per_round'`` anneals by round with
  optax's cosine, which holds at zero past ``num_rounds``;
  ``'per_client_step'`` is the reference's cosine stepped after every client
  step, base * (1 + cos(pi t / num_rounds)) / 2, which keeps oscillating.
- ``schedule='multistep'``: base x gamma (0.2, the sidecar's
  ``multistep_gamma``) for each of the milestones int(0.6 N)
  and int(0.8 N) reached (optax's piecewise constant: at the milestone the
  rate is already scaled), counted in rounds (``per_round``) or in the
  client's own steps (``per_client_step``, the reference's quirk).

The engine computes in float32; these are float64, equal to within 1e-7 of
the rate.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

KINDS = ('cosine', 'multistep')
CLIENT_SCHEDULES = ('per_round', 'per_client_step')
CLIENT_GAMMA = 0.2
MILESTONES = (0.6, 0.8)


def cosine_per_epoch(base_lr: float, num_epochs: int, epoch: int) -> float:
  """optax.cosine_decay_schedule(base_lr, max(num_epochs, 1)) at ``epoch``: clamped at the end."""
  horizon = max(num_epochs, 1)
  return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch, horizon) / horizon))


def reference_cosine(base_lr: float, num_epochs: int, step: int) -> float:
  """PyTorch's CosineAnnealingLR stepped past its horizon: oscillates with period 2N."""
  return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(num_epochs, 1)))


def multistep(base_lr: float, num_epochs: int, count: int, gamma: float = CLIENT_GAMMA) -> float:
  """base x gamma for every milestone int(0.6 N), int(0.8 N) that ``count`` has reached."""
  reached = sum(count >= int(fraction * num_epochs) for fraction in MILESTONES)
  return base_lr * gamma ** reached


def _require(optimizer: Mapping[str, Any], key: str):
  if key not in optimizer:
    raise ValueError(f'the sidecar\'s optimizer has no {key!r}: re-export the model')
  return optimizer[key]


class ClientSchedule:
  """``lr(client_steps, round)`` from the sidecar's ``optimizer`` entry.

  Reads ``client_lr`` (the resolved base rate), ``schedule``,
  ``client_schedule``, ``num_rounds`` and, if present, ``multistep_gamma``.
  """

  def __init__(self, optimizer: Mapping[str, Any]):
    self.base_lr = float(_require(optimizer, 'client_lr'))
    self.kind = _require(optimizer, 'schedule')
    self.client_schedule = _require(optimizer, 'client_schedule')
    self.num_rounds = int(_require(optimizer, 'num_rounds'))
    self.gamma = float(optimizer.get('multistep_gamma', CLIENT_GAMMA))
    if self.kind not in KINDS:
      raise ValueError(f'unknown schedule {self.kind!r}; allowed: {", ".join(KINDS)}')
    if self.client_schedule not in CLIENT_SCHEDULES:
      raise ValueError(f'unknown client_schedule {self.client_schedule!r}; '
                       f'allowed: {", ".join(CLIENT_SCHEDULES)}')

  def lr(self, client_steps: int, round_index: int) -> float:
    """The rate of the next step: after ``client_steps`` of its own, in round ``round_index``."""
    per_step = self.client_schedule == 'per_client_step'
    count = client_steps if per_step else round_index
    if self.kind == 'multistep':
      return multistep(self.base_lr, self.num_rounds, count, self.gamma)
    if per_step:
      return reference_cosine(self.base_lr, self.num_rounds, count)
    return cosine_per_epoch(self.base_lr, self.num_rounds, count)
