"""Heads trained on frozen features: the linear probe and the MLP probe.

The linear probe follows spec 5.2; the MLP probe is the reference's
"semi-supervised" evaluation (spec 5.3), which trains a BatchNorm MLP on a
random labelled fraction of frozen features and fine-tunes nothing.

Both train with Adam on precomputed features in a fixed order, evaluate test
top-1 after every epoch and report the best epoch, as the reference does
(model selection on the test set, spec 9.13), next to the last epoch. A whole
run (epochs, batches and evaluations) is one jitted function, a scan over
epochs of a scan over batches, so it compiles once per shape and
configuration. As in PyTorch's DataLoader the last partial batch is kept: it is
padded to the batch size and the padding is masked out of the loss and the
BatchNorm statistics.
"""
from __future__ import annotations

import collections
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

# PyTorch's BatchNorm momentum 0.1 in flax's convention (weight of the old value).
_BN_MOMENTUM = 0.9


def _linear(in_features: int, out_features: int) -> nn.Module:
  """Linear layer with Xavier-uniform weight, zero bias, PyTorch's weight layout.

  The (out, in) layout is for speed: on XLA:CPU the weight gradient of flax's
  (in, out) Dense kernel contracts a transposed operand and made the linear
  probe's step about 3x slower.
  """
  return nn.Einsum(shape=(out_features, in_features), einsum_str='bi,oi->bo',
                   kernel_init=nn.initializers.xavier_uniform())


@dataclasses.dataclass(frozen=True)
class ProbeResult:
  """Outcome of one probe run; accuracies are test top-1 in percent.

  Attributes:
    best_test_accuracy: best accuracy over epochs, the number the reference
      reports.
    last_test_accuracy: accuracy after the last epoch, the number free of
      selection on the test set.
    best_epoch: 0-based epoch of best_test_accuracy (the first, if tied).
    per_epoch_test_accuracy: accuracy after every epoch.
    final_train_loss: mean cross-entropy over the last epoch's training
      examples, as seen during training (train-mode BatchNorm, pre-step
      weights).
    steps: optimiser steps taken, epochs x batches per epoch: the protocol
      counts epochs, but how far Adam moves the head depends on the steps.
  """
  best_test_accuracy: float
  last_test_accuracy: float
  best_epoch: int
  per_epoch_test_accuracy: list[float]
  final_train_loss: float
  steps: int


class LinearHead(nn.Module):
  """Linear(dim -> num_classes), Xavier-uniform weights and zero bias.

  ``train`` and ``mask`` only exist so that every head has the same interface.
  """
  num_classes: int

  @nn.compact
  def __call__(self, x, *, train: bool = False, mask=None):
    del train, mask
    return _linear(x.shape[-1], self.num_classes)(x)


class MLPHead(nn.Module):
  """Linear(dim -> 512) -> BatchNorm -> ReLU -> Linear(512 -> num_classes).

  BatchNorm uses batch statistics when ``train`` (over the rows where ``mask``
  is true) and the running averages otherwise, with PyTorch's momentum and
  epsilon.
  """
  num_classes: int
  hidden_dim: int = 512

  @nn.compact
  def __call__(self, x, *, train: bool = False, mask=None):
    x = _linear(x.shape[-1], self.hidden_dim)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=1e-5,
                     use_fast_variance=False)(x, mask=mask)
    x = nn.relu(x)
    return _linear(x.shape[-1], self.num_classes)(x)


def reference_cosine_schedule(learning_rate: float, horizon: int) -> optax.Schedule:
  """The reference linear probe's cosine, stepped per iteration past its horizon.

  PyTorch's CosineAnnealingLR keeps following the cosine after T_max, so with
  T_max = epochs // 4 stepped every iteration the rate oscillates between
  ``learning_rate`` and 0 with a period of ``2 * horizon`` iterations. optax's
  cosine_decay_schedule stays at its floor after the horizon instead, hence
  the formula here.

  Args:
    learning_rate: peak rate (at iterations 0, 2 * horizon, ...).
    horizon: PyTorch's T_max in iterations.

  Returns:
    count -> learning_rate * (1 + cos(pi * count / horizon)) / 2.
  """
  return lambda count: learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * count / horizon))


def epoch_cosine_schedule(learning_rate: float, epochs: int,
                          steps_per_epoch: int) -> optax.Schedule:
  """Cosine decay to 0 over the whole run, constant within each epoch."""
  per_epoch = optax.cosine_decay_schedule(learning_rate, decay_steps=epochs)
  return lambda count: per_epoch(count // steps_per_epoch)


def multistep_schedule(learning_rate: float, epochs: int) -> optax.Schedule:
  """The reference MLP probe's x0.1 decays, counted in iterations.

  The reference places MultiStepLR milestones at int(0.6 * epochs) and
  int(0.8 * epochs) (60 and 80 for 100 epochs) but steps the scheduler every
  iteration, so the rate drops after that many iterations, not epochs. Equal
  milestones (tiny ``epochs``) compound, as in PyTorch.
  """
  milestones = collections.Counter([int(0.6 * epochs), int(0.8 * epochs)])
  return optax.piecewise_constant_schedule(
      learning_rate, {step: 0.1**count for step, count in milestones.items()})


def _make_schedule(name, learning_rate, epochs, steps_per_epoch):
  if name == 'reference':
    # PyTorch would divide by zero below 4 epochs; one iteration is the
    # shortest meaningful horizon.
    return reference_cosine_schedule(learning_rate, max(epochs // 4, 1))
  if name == 'cosine_epoch':
    return epoch_cosine_schedule(learning_rate, epochs, steps_per_epoch)
  if name == 'multistep':
    return multistep_schedule(learning_rate, epochs)
  raise ValueError(f'unknown schedule {name!r}')


def label_fraction_indices(key: jax.Array, num_samples: int,
                           label_fraction: float) -> jax.Array:
  """Indices of a random labelled subset, as the reference draws it.

  The first int(label_fraction * num_samples) entries of a random permutation:
  not class-balanced, and in permuted order (which is the training order,
  since the MLP probe does not shuffle).
  """
  size = int(label_fraction * num_samples)
  if size < 1:
    raise ValueError(f'label_fraction {label_fraction} of {num_samples} samples is empty')
  return jax.random.permutation(key, num_samples)[:size]


def _pytorch_running_var(old_stats, new_stats, count):
  """Redoes flax's running-variance update with PyTorch's unbiased variance.

  flax averages the biased batch variance into ``var``; PyTorch uses it times
  n / (n - 1), and the reference's eval-mode test sees the latter. A batch of
  one has zero variance, so its factor does not matter.
  """
  factor = count / jnp.maximum(count - 1, 1)

  def fix(path, old, new):
    if path[-1].key != 'var':
      return new
    return _BN_MOMENTUM * old + (new - _BN_MOMENTUM * old) * factor

  return jax.tree_util.tree_map_with_path(fix, old_stats, new_stats)


@functools.partial(jax.jit,
                   static_argnames=('head', 'epochs', 'batch_size', 'schedule'))
def _fit(head, train_x, train_y, test_x, test_y, key, learning_rate, shuffle, *, epochs,
         batch_size, schedule):
  """Trains ``head``; returns its variables, per-epoch test hits and losses."""
  num_train = train_x.shape[0]
  steps_per_epoch = -(-num_train // batch_size)
  padding = steps_per_epoch * batch_size - num_train
  tx = optax.adam(_make_schedule(schedule, learning_rate, epochs, steps_per_epoch))
  init_key, order_key = jax.random.split(key)
  variables = head.init(init_key, train_x[:1])
  params = variables['params']
  stats = {name: value for name, value in variables.items() if name != 'params'}
  masks = (jnp.arange(steps_per_epoch * batch_size) < num_train).reshape(
      steps_per_epoch, batch_size)

  def loss_fn(params, stats, x, y, mask):
    logits, new_stats = head.apply({'params': params, **stats}, x, train=True,
                                   mask=mask[:, None], mutable=list(stats))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(losses, where=mask) / mask.sum(), new_stats

  def train_step(carry, batch):
    params, stats, opt_state = carry
    index, mask = batch
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats, train_x[index], train_y[index], mask)
    new_stats = _pytorch_running_var(stats, new_stats, mask.sum())
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_stats, opt_state), loss * mask.sum()

  def run_epoch(carry, epoch):
    # A traced switch, so shuffled and fixed runs share one compilation.
    order = jax.lax.cond(
        shuffle,
        lambda: jax.random.permutation(jax.random.fold_in(order_key, epoch), num_train),
        lambda: jnp.arange(num_train))
    # Padding slots read example 0 and are masked out.
    batches = jnp.pad(order, (0, padding)).reshape(steps_per_epoch, batch_size)
    carry, batch_losses = jax.lax.scan(train_step, carry, (batches, masks))
    params, stats, _ = carry
    logits = head.apply({'params': params, **stats}, test_x, train=False)
    hits = jnp.sum(jnp.argmax(logits, axis=-1) == test_y)
    return carry, (hits, batch_losses.sum() / num_train)

  (params, stats, _), (hits, losses) = jax.lax.scan(
      run_epoch, (params, stats, tx.init(params)), jnp.arange(epochs))
  return {'params': params, **stats}, hits, losses


def fit_head(head: nn.Module, train_x, train_y, test_x, test_y, *, key: jax.Array,
             epochs: int, batch_size: int, learning_rate: float, schedule: str,
             shuffle: bool) -> tuple[dict, ProbeResult]:
  """Trains a head on frozen features with Adam and tests it after every epoch.

  Args:
    head: a module called as ``head(x, train=..., mask=...)``.
    train_x: (N, D) training features, numpy or jax.
    train_y: (N,) integer labels.
    test_x: (M, D) test features.
    test_y: (M,) integer labels.
    key: PRNG key, split into (initialisation key, order key); the order key
      only matters with ``shuffle``.
    epochs: passes over the training features.
    batch_size: examples per step; the last partial batch is kept.
    learning_rate: Adam's peak learning rate (no weight decay).
    schedule: 'reference' (the linear probe's oscillating per-iteration
      cosine), 'cosine_epoch' (cosine over the run, per epoch) or 'multistep'
      (the MLP probe's x0.1 drops at iterations int(0.6 * epochs) and
      int(0.8 * epochs)).
    shuffle: reshuffle the training features every epoch; otherwise the given
      order is used every epoch.

  Returns:
    The trained variables and the run's ProbeResult.
  """
  variables, hits, losses = _fit(
      head, jnp.asarray(train_x, jnp.float32), jnp.asarray(train_y, jnp.int32),
      jnp.asarray(test_x, jnp.float32), jnp.asarray(test_y, jnp.int32), key,
      jnp.float32(learning_rate), jnp.bool_(shuffle), epochs=epochs, batch_size=batch_size,
      schedule=schedule)
  accuracy = 100.0 * np.asarray(hits, np.float64) / len(test_y)
  best_epoch = int(np.argmax(accuracy))
  return variables, ProbeResult(
      best_test_accuracy=float(accuracy[best_epoch]),
      last_test_accuracy=float(accuracy[-1]),
      best_epoch=best_epoch,
      per_epoch_test_accuracy=accuracy.tolist(),
      final_train_loss=float(losses[-1]),
      steps=epochs * -(-len(train_y) // batch_size))


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, *, key: jax.Array,
                 epochs: int = 100, batch_size: int = 128, learning_rate: float = 1e-3,
                 schedule: str = 'reference', shuffle: bool = False) -> ProbeResult:
  """Linear probe on frozen features (spec 5.2).

  The defaults are the reference protocol: Adam 1e-3, batch 128, 100 epochs
  in a fixed order, and a cosine with horizon epochs // 4 stepped every
  iteration (``reference_cosine_schedule``). ``schedule='cosine_epoch'`` with
  ``shuffle=True`` is the conventional alternative (spec 9.15).

  Args:
    train_x: (N, D) training features, numpy or jax.
    train_y: (N,) integer labels.
    test_x: (M, D) test features.
    test_y: (M,) integer labels.
    num_classes: number of classes.
    key: PRNG key for the initialisation and, with ``shuffle``, the order.
    epochs: passes over the training features.
    batch_size: examples per step; the last partial batch is kept.
    learning_rate: Adam's peak learning rate.
    schedule: 'reference' or 'cosine_epoch'.
    shuffle: reshuffle every epoch.

  Returns:
    The run's ProbeResult.
  """
  if schedule not in ('reference', 'cosine_epoch'):
    raise ValueError(f'unknown linear-probe schedule {schedule!r}')
  _, result = fit_head(LinearHead(num_classes), train_x, train_y, test_x, test_y, key=key,
                       epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                       schedule=schedule, shuffle=shuffle)
  return result


def mlp_probe(train_x, train_y, test_x, test_y, num_classes: int, *, key: jax.Array,
              label_fraction: float, epochs: int = 100, batch_size: int = 128,
              learning_rate: float = 1e-3) -> ProbeResult:
  """MLP probe on a labelled fraction: the reference's "semi-supervised" eval.

  Spec 5.3: an ``MLPHead`` on frozen features, trained on a random, not
  class-balanced, ``label_fraction`` of the training set (0.1 or 0.01 in the
  paper) in a fixed order, Adam with ``multistep_schedule``.

  Args:
    train_x: (N, D) training features, numpy or jax.
    train_y: (N,) integer labels.
    test_x: (M, D) test features.
    test_y: (M,) integer labels.
    num_classes: number of classes.
    key: PRNG key, split into (subset key, ``fit_head`` key); the subset is
      ``label_fraction_indices(subset_key, len(train_y), label_fraction)``.
    label_fraction: share of the training set that keeps its labels.
    epochs: passes over the labelled subset.
    batch_size: examples per step; the last partial batch is kept.
    learning_rate: Adam's initial learning rate.

  Returns:
    The run's ProbeResult.
  """
  subset_key, fit_key = jax.random.split(key)
  subset = label_fraction_indices(subset_key, len(train_y), label_fraction)
  _, result = fit_head(MLPHead(num_classes), jnp.take(jnp.asarray(train_x), subset, axis=0),
                       jnp.take(jnp.asarray(train_y), subset), test_x, test_y, key=fit_key,
                       epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                       schedule='multistep', shuffle=False)
  return result
