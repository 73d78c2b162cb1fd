"""An exported client model (``.tflite`` + sidecar) in the LiteRT interpreter.

Imports only numpy, json and ``ai_edge_litert``: this runs on the device.
``python -m mocosfl_jax.export`` writes the files; README "Edge client:
export" describes the signatures. Weight names are the signatures':
``online__stem__Conv_0__kernel`` (group, then the flax parameter path, joined
by double underscores), for the groups ``online``, ``ema`` and ``momentum``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
from ai_edge_litert import interpreter as litert_interpreter

TRAINING_SIGNATURES = ('ema_infer', 'train', 'ema_update', 'get_weights', 'set_weights')


def sidecar_path(model_path: str) -> str:
  """The sidecar of a model file: ``.json`` in place of ``.tflite``."""
  return os.path.splitext(model_path)[0] + '.json'


class ClientModel:
  """One client's model: its forward passes, its update and its weights.

  A trainable model holds its online, EMA and momentum weights inside the
  interpreter; ``train`` and ``ema_update`` change them in place. An
  inference-only model (a frozen or quantized client) has ``infer`` only.
  """

  def __init__(self, model_path: str, num_threads: int = 1):
    """Loads ``model_path`` and its sidecar; ``num_threads`` for the interpreter's kernels."""
    path = sidecar_path(model_path)
    try:
      with open(path) as f:
        self._sidecar = json.load(f)
    except FileNotFoundError:
      raise ValueError(f'{model_path}: no sidecar {path} beside it; export the two together'
                       ) from None
    self._interpreter = litert_interpreter.Interpreter(model_path=model_path,
                                                       num_threads=num_threads)
    self._runners = {name: self._interpreter.get_signature_runner(name)
                     for name in self._interpreter.get_signature_list()}
    self._inputs = {name: {key: (tuple(int(n) for n in d['shape']), np.dtype(d['dtype']))
                           for key, d in runner.get_input_details().items()}
                    for name, runner in self._runners.items()}

  @property
  def sidecar(self) -> dict[str, Any]:
    """The parsed JSON sidecar."""
    return self._sidecar

  @property
  def batch(self) -> int:
    return int(self._sidecar['batch'])

  @property
  def image_size(self) -> int:
    return int(self._sidecar['image_size'])

  @property
  def smashed_shape(self) -> tuple[int, ...]:
    """(h, w, c) of one row of smashed data."""
    return tuple(self._sidecar['signatures']['infer']['outputs']['smashed']['shape'][1:])

  @property
  def trainable(self) -> bool:
    return 'train' in self._runners

  def _run(self, signature: str, **inputs) -> dict[str, np.ndarray]:
    if signature not in self._runners:
      raise ValueError(f'{signature}: this model is inference-only (exported without '
                       'training signatures); it has infer alone')
    expected = self._inputs[signature]
    for name, value in inputs.items():
      shape, dtype = expected[name]
      if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != shape:
        got = (f'{value.dtype} {value.shape}' if isinstance(value, np.ndarray)
               else type(value).__name__)
        raise ValueError(f'{signature}: {name} must be {dtype.name} of shape {shape}, got {got}')
    # Copies: the interpreter reuses its output buffers on the next call.
    return {name: np.array(value) for name, value in self._runners[signature](**inputs).items()}

  @staticmethod
  def _scalar(value) -> np.ndarray:
    return np.asarray(value, np.float32).reshape(1)

  def infer(self, images: np.ndarray) -> np.ndarray:
    """The online model's smashed data (B, h, w, c) of float32 images (B, H, W, 3) in [0, 1]."""
    return self._run('infer', images=images)['smashed']

  def ema_infer(self, images: np.ndarray) -> np.ndarray:
    """As ``infer``, with the EMA model."""
    return self._run('ema_infer', images=images)['smashed']

  def train(self, images: np.ndarray, smashed_grad: np.ndarray, lr: float) -> int:
    """One client-optimiser step with the gradient of the loss w.r.t. ``infer(images)``.

    Returns the number of train steps the model has taken (its int32 counter).
    """
    outputs = self._run('train', images=images, smashed_grad=smashed_grad,
                        lr=self._scalar(lr))
    return int(outputs['step'][0])

  def ema_update(self, decay: float) -> int:
    """ema <- decay * ema + (1 - decay) * online; returns the train step count."""
    return int(self._run('ema_update', decay=self._scalar(decay))['step'][0])

  def get_weights(self) -> dict[str, np.ndarray]:
    """Every weight by signature name (``online__...``, ``ema__...``, ``momentum__...``)."""
    return self._run('get_weights')

  def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
    """Replaces the named weights; names left out keep their values (e.g. online only)."""
    if 'set_weights' not in self._runners:
      self._run('set_weights')
    expected = self._inputs['set_weights']
    unknown = sorted(set(weights) - set(expected))
    if unknown:
      raise ValueError(f'set_weights: unknown weight names {", ".join(unknown[:3])}'
                       f'{" ..." if len(unknown) > 3 else ""}; expected names like '
                       f'{next(iter(sorted(expected)))}')
    merged = {**self.get_weights(), **weights} if set(weights) != set(expected) else dict(weights)
    self._run('set_weights', **merged)
