"""The JSON sidecar of an exported client: what the device needs besides the model.

The flatbuffer is read with ``ai_edge_litert`` (in the ``export`` extra, as
on the device), never TensorFlow.
"""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

from mocosfl_jax.data import augment, sources
from mocosfl_jax.export import litert
from mocosfl_jax.sfl import optim

FORMAT_VERSION = 1
INPUT = ('images: float32 (B, H, W, 3), RGB, values in [0, 1] (pixel / 255) before '
         'normalisation; the model subtracts the mean and divides by the std itself')


def ops(model: bytes) -> list[str]:
  """The distinct operators of a .tflite model, sorted; a custom op as ``CUSTOM:<name>``.

  Flex (TensorFlow) ops are custom ops named ``Flex...``.
  """
  schema = litert.litert_module('schema_py_generated')
  builtin_names = {code: name for name, code in vars(schema.BuiltinOperator).items()
                   if not name.startswith('_')}
  root = schema.Model.GetRootAs(model, 0)
  names = set()
  for i in range(root.OperatorCodesLength()):
    code = root.OperatorCodes(i)
    # The schema keeps codes below 127 in the deprecated field too; the larger wins.
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    if builtin == schema.BuiltinOperator.CUSTOM:
      names.add(f'CUSTOM:{code.CustomCode().decode()}')
    else:
      names.add(builtin_names[builtin])
  return sorted(names)


def _tensors(details: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  return {name: {'shape': [int(d) for d in detail['shape']],
                 'dtype': np.dtype(detail['dtype']).name}
          for name, detail in sorted(details.items())}


def signatures(model: bytes) -> dict[str, dict[str, Any]]:
  """``{signature: {'inputs': {name: {shape, dtype}}, 'outputs': {...}}}``, as LiteRT reads them."""
  interpreter = litert.litert_module('interpreter').Interpreter(model_content=model)
  described = {}
  for name in sorted(interpreter.get_signature_list()):
    runner = interpreter.get_signature_runner(name)
    described[name] = {'inputs': _tensors(runner.get_input_details()),
                       'outputs': _tensors(runner.get_output_details())}
  return described


def optimizer(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The client optimiser and learning-rate schedule as ``train.build`` resolves them."""
  o = config.optim
  return {
      'momentum': o.momentum,
      'weight_decay': o.weight_decay,
      'client_lr': optim.client_base_lr(o),
      'schedule': optim.schedule_kind(o.schedule, config.moco.version),
      'client_schedule': o.client_schedule,
      'num_rounds': config.num_rounds,
      'multistep_gamma': optim.CLIENT_MULTISTEP_GAMMA,
      'ema_decay': config.moco.ema_decay,
  }


def augmentation(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The views' augmentation as ``train.build`` resolves it."""
  return {'version': augment.resolve_version(config.moco), 'crop_scale_min': config.moco.crop_scale_min}


def build(config: ml_collections.ConfigDict, model: bytes, *, batch: int, trainable: bool,
          quantize: str, source: Mapping[str, Any] | None) -> dict[str, Any]:
  """The sidecar of ``model``, exported from ``config`` (``source``: its checkpoint, or None)."""
  mean, std = sources.normalization(config.data.name)
  return {
      'format_version': FORMAT_VERSION,
      'cut_layer': config.cut_layer,
      'bottleneck': config.model.get('bottleneck', ''),
      'width': config.model.width,
      'image_size': config.model.image_size,
      'normalization': {'mean': list(mean), 'std': list(std)},
      'input': INPUT,
      'batch': batch,
      'trainable': trainable,
      'quantize': quantize,
      'optimizer': optimizer(config),
      'augmentation': augmentation(config),
      'signatures': signatures(model),
      'ops': ops(model),
      'size_bytes': len(model),
      'source': None if source is None else dict(source),
  }
