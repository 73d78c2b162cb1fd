"""The client functions converted to one LiteRT (.tflite) model with named signatures.

``jax2tf.convert`` writes each JAX function as one StableHLO ``XlaCallModule``
op, and the TFLite converter lowers that to builtin ops: the backward pass is
ordinary forward ops, so the device needs neither gradient kernels nor Flex
(TensorFlow) ops (design/edge-notes.md).

A trainable client keeps its online, EMA and momentum weights in resource
variables inside the model: ``train`` and ``ema_update`` update them in place,
``get_weights`` / ``set_weights`` move them for FedAvg, and nothing but
images, gradients and two scalars crosses the interpreter's boundary per
step. An inference-only model (a frozen client, or a quantized one) has its
weights folded into constants, the form XNNPACK accelerates. README "Edge
client: export" has the measurements behind both choices.

TensorFlow is imported here only, and only when converting (the ``export``
extra); the rest of the package never needs it.
"""
from __future__ import annotations

import importlib
import os
import tempfile
from types import ModuleType
from typing import Any, Mapping

import numpy as np

from mocosfl_jax.export import client as client_lib

EXTRA = "pip install -e '.[export]'"
QUANTIZE = ('none', 'float16', 'int8')
# Scalars travel as shape (1,): a 0-d input crashed the aarch64 interpreter.
SCALAR = (1,)


class ExportError(ValueError):
  """A client that cannot be exported as asked; the message is one line."""


def _tensorflow():
  """(tensorflow, jax2tf), or ExportError naming the extra to install."""
  # TensorFlow's C++ start-up logging is noise on a command line.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ExportError(f'exporting needs TensorFlow ({e}): {EXTRA}') from e
  return tf, jax2tf


def litert_module(name: str) -> ModuleType:
  """``ai_edge_litert.<name>``, or ExportError naming the extra to install."""
  try:
    return importlib.import_module(f'ai_edge_litert.{name}')
  except ImportError as e:
    raise ExportError(f'exporting needs ai-edge-litert ({e}): {EXTRA}') from e


def weight_name(group: str, name: str) -> str:
  """The signature name of a weight: ``online__stem__Conv_0__kernel``."""
  return f'{group}{client_lib.SEPARATOR}{name}'


def _folded(tf, to_tf, fns: client_lib.ClientFunctions, online: Mapping[str, Any], images):
  """An empty module and ``infer`` with the online weights as constants."""
  online = {n: np.asarray(v) for n, v in online.items()}

  @tf.function(autograph=False, input_signature=[images])
  def infer(images):
    return {'smashed': to_tf(lambda x: fns.forward(online, x))(images)}
  return tf.Module(), {'infer': infer.get_concrete_function()}


def _with_variables(tf, to_tf, fns: client_lib.ClientFunctions, weights: Mapping[str, Any],
                    step: int, images, smashed_shape: tuple[int, ...]):
  """A module holding the weights and step counter, and the six signatures over them."""
  batch = images.shape[0]
  module = tf.Module()
  module.weights = {group: {name: tf.Variable(np.asarray(value), name=weight_name(group, name))
                            for name, value in weights[group].items()}
                    for group in client_lib.GROUPS}
  module.step = tf.Variable(np.full(SCALAR, step, np.int32), name='step')
  read = lambda group: {n: v.read_value() for n, v in module.weights[group].items()}

  def assign(group, values):
    for name, variable in module.weights[group].items():
      variable.assign(values[name])

  def forward(group):
    @tf.function(autograph=False, input_signature=[images])
    def run(images):
      return {'smashed': to_tf(fns.forward)(read(group), images)}
    return run

  grad = tf.TensorSpec((batch,) + smashed_shape, tf.float32, name='smashed_grad')
  lr = tf.TensorSpec(SCALAR, tf.float32, name='lr')

  @tf.function(autograph=False, input_signature=[images, grad, lr])
  def train(images, smashed_grad, lr):
    online, momentum = to_tf(fns.train)(read('online'), read('momentum'), images,
                                        smashed_grad, lr)
    assign('online', online)
    assign('momentum', momentum)
    module.step.assign_add(tf.ones(SCALAR, tf.int32))
    return {'step': module.step.read_value()}

  @tf.function(autograph=False, input_signature=[tf.TensorSpec(SCALAR, tf.float32, name='decay')])
  def ema_update(decay):
    assign('ema', to_tf(fns.ema_update)(read('online'), read('ema'), decay))
    return {'step': module.step.read_value()}

  @tf.function(autograph=False, input_signature=[])
  def get_weights():
    return {weight_name(g, n): v.read_value()
            for g in client_lib.GROUPS for n, v in module.weights[g].items()}

  @tf.function(autograph=False)
  def set_weights(**values):
    for group in client_lib.GROUPS:
      assign(group, {n: values[weight_name(group, n)] for n in module.weights[group]})
    return {'step': module.step.read_value()}

  specs = {weight_name(g, n): tf.TensorSpec(v.shape, tf.float32, name=weight_name(g, n))
           for g in client_lib.GROUPS for n, v in module.weights[g].items()}
  return module, {
      'infer': forward('online').get_concrete_function(),
      'ema_infer': forward('ema').get_concrete_function(),
      'train': train.get_concrete_function(),
      'ema_update': ema_update.get_concrete_function(),
      'get_weights': get_weights.get_concrete_function(),
      'set_weights': set_weights.get_concrete_function(**specs),
  }


def _signatures(tf, jax2tf, fns: client_lib.ClientFunctions, weights: Mapping[str, Any],
                step: int, batch: int, image_size: int, smashed_shape: tuple[int, ...],
                trainable: bool):
  """(tf.Module holding the variables, its concrete functions by signature name)."""
  to_tf = lambda f: jax2tf.convert(f, with_gradient=False)
  images = tf.TensorSpec((batch, image_size, image_size, 3), tf.float32, name='images')
  if not trainable:
    return _folded(tf, to_tf, fns, weights['online'], images)
  return _with_variables(tf, to_tf, fns, weights, step, images, smashed_shape)


def convert(fns: client_lib.ClientFunctions, weights: Mapping[str, Any], *, step: int,
            batch: int, image_size: int, smashed_shape: tuple[int, ...], trainable: bool,
            quantize: str = 'none') -> bytes:
  """The .tflite flatbuffer of a client.

  Args:
    fns: the client's JAX functions.
    weights: ``{'online': flat, 'ema': flat, 'momentum': flat}``; an
      inference-only model uses 'online' only.
    step: the train steps the client has taken (the ``step`` variable's start).
    batch: the fixed batch of every signature.
    image_size: H = W of the images.
    smashed_shape: (h, w, c) of one smashed-data row.
    trainable: all six signatures with weights in variables; otherwise
      ``infer`` alone with the weights folded in.
    quantize: 'none', 'float16' (float16 weights) or 'int8' (dynamic-range
      int8 weights); inference-only models only.
  """
  if quantize not in QUANTIZE:
    raise ExportError(f'quantize={quantize!r}: use one of {", ".join(QUANTIZE)}')
  if trainable and quantize != 'none':
    raise ExportError('a quantized model is inference-only: weights in variables stay float32')
  tf, jax2tf = _tensorflow()
  module, functions = _signatures(tf, jax2tf, fns, weights, step, batch, image_size,
                                  smashed_shape, trainable)
  # Through a SavedModel: from_concrete_functions names one function's
  # signature 'serving_default' and the others by their graphs' names.
  with tempfile.TemporaryDirectory() as saved:
    tf.saved_model.save(module, saved, signatures=functions)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=list(functions))
    if quantize != 'none':
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == 'float16':
      converter.target_spec.supported_types = [tf.float16]
    return converter.convert()
