"""One client's weights -> ``<name>.tflite`` and its sidecar ``<name>.json``."""
from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from mocosfl_jax.export import client as client_lib
from mocosfl_jax.export import litert, sidecar


def is_frozen(config: ml_collections.ConfigDict) -> bool:
  """Whether the clients never train (``optim.client_lr`` resolves to 0, as in TAResSFL)."""
  return sidecar.optimizer(config)['client_lr'] == 0


def default_filename(config: ml_collections.ConfigDict, batch: int, quantize: str) -> str:
  """``client_c{cut}_b{batch}[_{quantize}].tflite``."""
  suffix = '' if quantize == 'none' else f'_{quantize}'
  return f'client_c{config.cut_layer}_b{batch}{suffix}.tflite'


def sidecar_path(model_path: str | pathlib.Path) -> pathlib.Path:
  """The sidecar of a model file: the same name with ``.json`` for ``.tflite``."""
  return pathlib.Path(model_path).with_suffix('.json')


def export_client(config: ml_collections.ConfigDict, client_params, ema_params, momentum,
                  out_path: str | pathlib.Path, *, batch: int, quantize: str = 'none',
                  trainable: bool | None = None, step: int = 0,
                  source: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Converts one client and writes the model and its sidecar; returns the sidecar.

  Args:
    config: the run's config (model, data, optimiser fields).
    client_params: the online client model's flax parameters.
    ema_params: the EMA client model's (unused by an inference-only model).
    momentum: the client optimiser's momentum buffers, shaped as the parameters.
    out_path: the .tflite file; the sidecar goes beside it (:func:`sidecar_path`).
    batch: the fixed batch size of every signature.
    quantize: 'none', 'float16' or 'int8'; a quantized model is inference-only.
    trainable: export the training signatures; None: unless the client is
      frozen or ``quantize`` is set.
    step: the train steps the client has already taken.
    source: where the weights came from, recorded in the sidecar (None: not a run).

  Raises:
    litert.ExportError: TensorFlow is missing, or the request is inconsistent.
  """
  if batch < 1:
    raise litert.ExportError(f'batch={batch}: use at least 1')
  if trainable is None:
    trainable = not is_frozen(config) and quantize == 'none'
  elif trainable and is_frozen(config):
    raise litert.ExportError('the clients are frozen (optim.client_lr resolves to 0): '
                             'they export inference only')
  fns = client_lib.make(config)
  weights = {group: client_lib.flatten(jax.tree.map(np.asarray, tree))
             for group, tree in zip(client_lib.GROUPS, (client_params, ema_params, momentum))}
  size = config.model.image_size
  smashed = jax.eval_shape(fns.forward, weights['online'],
                           jax.ShapeDtypeStruct((batch, size, size, 3), np.float32))
  model = litert.convert(fns, weights, step=step, batch=batch, image_size=size,
                         smashed_shape=tuple(smashed.shape[1:]), trainable=trainable,
                         quantize=quantize)
  described = sidecar.build(config, model, batch=batch, trainable=trainable, quantize=quantize,
                            source=source)
  out_path = pathlib.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_bytes(model)
  sidecar_path(out_path).write_text(json.dumps(described, indent=2) + '\n')
  return described
