"""One edge client: its data walk, its views, its forward passes, its updates.

A training step on the device, in the engine's order (mocosfl_jax/sfl/step.py):

1. ``forward()`` takes the next batch of the client's own images, makes the two
   views, runs the online model on view 1, moves the EMA model towards the
   online weights (which the step has not changed yet) and runs the EMA model
   on view 2; both smashed batches go to the server.
2. ``apply_gradient(smashed_grad, round_index)`` takes the server's gradient
   with respect to the view-1 smashed data and updates the online model with
   the engine's client rate for this step and round.

The data walk is the engine's (mocosfl_jax/sfl/rounds.py ``sample_batches``):
whole batches through a shuffle of the client's images (``n // batch`` a pass,
the remainder skipped), a fresh shuffle when a pass runs out; a client with
fewer images than a batch wraps around its shuffle. Pass p is shuffled by a
generator seeded with (seed, 0, p) and step t's views come from one seeded
with (seed, 1, t), so the step count is the whole random position: the same
seed and step give the same batch and the same views, and a checkpoint needs
to hold only the weights, the seed and the step count.

A frozen client (exported without ``train``) never changes, so its EMA model
is its online model: ``forward()`` runs ``infer`` on both views and completes
the step itself.

Driven by a server (mocosfl_jax/edge/remote.py), the server draws the batch:
``forward(ids)`` takes those positions in the client's images instead of its
own walk's, so that the run is the simulation's.
"""
from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from typing import Any, Mapping

import numpy as np

from mocosfl_jax.edge import augment
from mocosfl_jax.edge.schedule import ClientSchedule

CHECKPOINT_FORMAT = 1
_WEIGHT_PREFIX = 'weight:'
_ORDER_STREAM, _VIEW_STREAM = 0, 1


class EdgeClient:
  """Composes a ClientModel (mocosfl_jax/edge/model.py) with the client's data.

  Args:
    model: the exported client model; its sidecar gives the batch, the
      augmentation, the optimiser schedule and the EMA decay.
    images: uint8 (n, H, W, 3), the client's own images (edge.data.load_images).
    seed: fixes the data order and the views; a non-negative integer.
    steps: the client's own steps so far; the data walk and a per-client-step
      schedule go on from there. None: the steps it had taken in the
      simulation run it was exported from (the sidecar's
      ``source.client_steps``), else 0.
    augmentation: overrides the sidecar's ``{'version', 'crop_scale_min'}``.
  """

  def __init__(self, model, images: np.ndarray, *, seed: int = 0, steps: int | None = None,
               augmentation: Mapping[str, Any] | None = None):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
      raise ValueError(f'images have dtype {images.dtype} and shape {images.shape}, '
                       'expected uint8 (n, H, W, 3) with n >= 1')
    sidecar = model.sidecar
    if steps is None:
      steps = (sidecar.get('source') or {}).get('client_steps') or 0
    for name, value in (('seed', seed), ('steps', steps)):
      if int(value) != value or value < 0:
        raise ValueError(f'{name} {value!r} must be a non-negative integer')
    self.model = model
    self.images = images
    self.seed = int(seed)
    self.steps = int(steps)
    aug = dict(sidecar['augmentation'] if augmentation is None else augmentation)
    self.version = aug['version']
    augment.check_version(self.version)
    self.crop_scale = (float(aug.get('crop_scale_min', augment.CROP_SCALE[0])), 1.0)
    self.trainable = bool(model.trainable)
    optimizer = sidecar.get('optimizer', {})
    self.schedule = ClientSchedule(optimizer) if self.trainable else None
    self.ema_decay = float(optimizer['ema_decay']) if self.trainable else None
    self._pending = None  # view 1 of a forward() whose gradient has not come yet
    # The round of the last FedAvg broadcast applied (-1: none), kept in the checkpoint.
    self.round = -1

  @property
  def batch(self) -> int:
    return int(self.model.batch)

  # -------------------------------------------------------------------------
  # Data and views.

  def batch_ids(self, step: int) -> np.ndarray:
    """Indices into ``images`` of the batch the client takes at its ``step``."""
    count = len(self.images)
    per_pass = max(count // self.batch, 1)
    order = np.random.default_rng([self.seed, _ORDER_STREAM, step // per_pass]).permutation(count)
    within = (step % per_pass) * self.batch + np.arange(self.batch)
    return order[within % count]

  def views(self, step: int, ids=None) -> tuple[np.ndarray, np.ndarray]:
    """(view1, view2) of the batch at ``step``: float32 (B, S, S, 3) in [0, 1].

    ``ids``: the batch's positions in ``images`` (B integers); None: the walk's.
    """
    rng = np.random.default_rng([self.seed, _VIEW_STREAM, step])
    ids = self.batch_ids(step) if ids is None else self.check_ids(ids)
    return augment.pair_views(rng, self.images[ids], self.version,
                              int(self.model.image_size), self.crop_scale)

  def check_ids(self, ids) -> np.ndarray:
    """``ids`` as an int64 array of one batch of positions in ``images``; else ValueError."""
    ids = np.asarray(ids)
    if (ids.shape != (self.batch,) or not np.issubdtype(ids.dtype, np.integer)
        or ids.min() < 0 or ids.max() >= len(self.images)):
      raise ValueError(f'sample ids {ids.tolist()} are not {self.batch} positions in the '
                       f'client\'s {len(self.images)} images')
    return ids.astype(np.int64)

  # -------------------------------------------------------------------------
  # A step.

  def forward(self, ids=None) -> tuple[np.ndarray, np.ndarray]:
    """(online smashed data of view 1, EMA smashed data of view 2) for the next batch.

    ``ids``: the batch's positions in ``images``; None: the next of the walk.
    """
    if self._pending is not None:
      raise RuntimeError('forward() called twice: apply the gradient of the last step first')
    view1, view2 = self.views(self.steps, ids)
    query = self.model.infer(view1)
    if not self.trainable:
      key = self.model.infer(view2)
      self.steps += 1
      return query, key
    # The EMA moves before its forward pass, towards the pre-step online weights.
    self.model.ema_update(self.ema_decay)
    key = self.model.ema_infer(view2)
    self._pending = view1
    return query, key

  @property
  def step_in_progress(self) -> bool:
    """Whether a forward() waits for its gradient."""
    return self._pending is not None

  def end_step(self, advance: bool) -> None:
    """Ends a step that gets no gradient: a frozen step (``advance``) or one the server dropped."""
    self._pending = None
    self.steps += int(advance)

  def learning_rate(self, round_index: int) -> float:
    """The rate the next gradient will be applied with, in round ``round_index`` (from 0)."""
    if not self.trainable:
      raise ValueError('this client model is frozen (exported without train): it has no rate')
    return self.schedule.lr(self.steps, round_index)

  def apply_gradient(self, smashed_grad: np.ndarray, round_index: int) -> float:
    """Updates the online model with the server's gradient; returns the rate used."""
    if not self.trainable:
      raise ValueError('this client model is frozen (exported without train): '
                       'it takes no gradient')
    if self._pending is None:
      raise RuntimeError('no step in progress: call forward() first')
    smashed_grad = np.asarray(smashed_grad, np.float32)
    want = (self.batch,) + tuple(self.model.smashed_shape)
    if smashed_grad.shape != want:
      raise ValueError(f'smashed-data gradient has shape {smashed_grad.shape}, expected {want}')
    lr = self.learning_rate(round_index)
    self.model.train(self._pending, smashed_grad, lr)
    self._pending = None
    self.steps += 1
    return lr

  # -------------------------------------------------------------------------
  # Weights and the local checkpoint.

  def get_weights(self) -> dict[str, np.ndarray]:
    return self.model.get_weights()

  def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
    """Replaces the weights (FedAvg's broadcast); a step in progress is dropped."""
    self.model.set_weights(dict(weights))
    self._pending = None

  def save(self, path: str) -> None:
    """Writes weights, seed, step count and round to ``path`` (npz) atomically.

    The file is written beside ``path`` and renamed over it, so a power cut
    leaves either the old checkpoint or the new one.
    """
    arrays = {_WEIGHT_PREFIX + name: np.asarray(value)
              for name, value in self.get_weights().items()}
    arrays.update(format=np.int64(CHECKPOINT_FORMAT), seed=np.int64(self.seed),
                  steps=np.int64(self.steps), round=np.int64(self.round))
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix='.edge-ckpt-', suffix='.npz')
    try:
      with os.fdopen(handle, 'wb') as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
      os.replace(temporary, path)
    except BaseException:
      if os.path.exists(temporary):
        os.remove(temporary)
      raise

  def load(self, path: str) -> None:
    """Restores what ``save`` wrote: the weights, the seed, the step count and the round."""
    try:
      with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
      raise ValueError(f'{path} does not exist: no local checkpoint to resume from') from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      raise ValueError(f'{path}: unreadable checkpoint ({e}): delete it to start afresh') from None
    if int(arrays.get('format', -1)) != CHECKPOINT_FORMAT or not {'seed', 'steps'} <= set(arrays):
      raise ValueError(f'{path}: not an edge client checkpoint of format {CHECKPOINT_FORMAT}')
    weights = {key[len(_WEIGHT_PREFIX):]: value for key, value in arrays.items()
               if key.startswith(_WEIGHT_PREFIX)}
    current = self.get_weights()
    shapes = {name: np.shape(value) for name, value in current.items()}
    if {name: value.shape for name, value in weights.items()} != shapes:
      raise ValueError(f'{path}: its weights do not fit this client model '
                       '(another cut, width or export): delete it to start afresh')
    self.set_weights(weights)
    self.seed = int(arrays['seed'])
    self.steps = int(arrays['steps'])
    self.round = int(arrays.get('round', -1))  # absent from checkpoints written before it


if __name__ == '__main__':
  # The edge-client process (mocosfl_jax/edge/remote.py), kept out of this
  # module's imports so that the library needs no grpcio.
  from mocosfl_jax.edge import remote
  status = remote.main()
  # Its checkpoint is saved and its log written: leave without the interpreter's
  # teardown, which can wait on gRPC's threads (grpc/grpc#4969, #6891); once in
  # about seven test runs a finished client did not exit.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)
