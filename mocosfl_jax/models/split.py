"""Splitting the backbone at a cut layer into a client model and a server model.

``cut_layer`` counts modules of the flat ResNet list, as the reference's
``--cutlayer`` does: the client runs modules ``[0, cut_layer)``, the server the
rest, global average pooling and the projection head. In the paper's naming,
cut 1 is MocoSFL-1 (one conv on the client), cut 2 is MocoSFL-3 and cut 3 is
MocoSFL-5 (spec section 0).

``bottleneck`` (spec 1.5, ``bottleneck.py``) adds a compressing conv pair at the
cut: the client's last layers and the server's first; '' leaves both models,
and their parameter trees, exactly as without it.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mocosfl_jax.compilation import materialize
from mocosfl_jax.models import bottleneck as bottleneck_lib
from mocosfl_jax.models import heads, resnet

PAPER_NAMES = {1: 'MocoSFL-1', 2: 'MocoSFL-3', 3: 'MocoSFL-5'}


def paper_name(cut_layer: int, depth: int = 18) -> str:
  """The paper's name of a ResNet-18 cut ('MocoSFL-1'), else 'cut <n>': it names no other."""
  return PAPER_NAMES.get(cut_layer, f'cut {cut_layer}') if depth == 18 else f'cut {cut_layer}'


def smashed_channels(cut_layer: int, width: float, depth: int = 18) -> int:
  """Channels of module ``cut_layer - 1``'s output: the smashed data without a bottleneck."""
  # The stem (module 0) outputs the first stage's channels.
  stage = resnet.stage_of(cut_layer - 1, depth)[0] if cut_layer > 1 else 0
  return resnet.channels(width)[stage]


def smashed_hw(cut_layer: int, width: float, image_size: int,
               depth: int = 18) -> tuple[int, int]:
  """Height and width of the smashed data without a bottleneck (shapes only, nothing runs)."""
  net = ClientNet(cut_layer, width, image_size, depth=depth)
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  out = jax.eval_shape(lambda x: net.init_with_output(jax.random.key(0), x)[0], image)
  return out.shape[1:3]


class ClientNet(nn.Module):
  """Modules ``[0, cut_layer)`` and the bottleneck's compression, if any.

  Its output is the smashed data (after a ReLU unless the bottleneck has noRELU).
  """
  cut_layer: int = 1
  width: float = 1.0
  image_size: int = 32
  weight_standardization: bool = True
  as_matmul: bool = False
  bottleneck: str = ''
  dtype: str = 'float32'  # of activations and convolutions (model.dtype); parameters are float32
  depth: int = 18  # model.depth: 10, 18 or 34 (resnet.STAGE_BLOCKS)

  @nn.compact
  def __call__(self, x):
    for i in range(self.cut_layer):
      x = resnet.make_module(i, self.width, self.image_size, self.weight_standardization,
                             self.as_matmul, self.dtype, self.depth)(x)
    if self.bottleneck:
      x = bottleneck_lib.Compress(self.bottleneck, self.as_matmul, name='bottleneck')(x)
    return x


class ServerNet(nn.Module):
  """The bottleneck's decompression, if any, modules ``[cut_layer, num_modules(depth))``,
  global average pooling and the MoCo head."""
  cut_layer: int = 1
  width: float = 1.0
  moco_version: str = 'V2'
  image_size: int = 32
  weight_standardization: bool = True
  bottleneck: str = ''
  dtype: str = 'float32'  # as ClientNet's; the head and the loss stay float32
  depth: int = 18

  @nn.compact
  def __call__(self, smashed, train: bool = True, features_only: bool = False, mask=None):
    """``mask`` (rows,): the rows that count in the head's BatchNorm statistics (all if None)."""
    # The smashed data's GroupNorm chain would otherwise be recomputed inside the
    # first kernel gradient's transpose (compilation.materialize).
    x = materialize(resnet.to_compute_dtype(smashed, self.dtype))
    if self.bottleneck:
      channels = smashed_channels(self.cut_layer, self.width, self.depth)
      x = bottleneck_lib.Decompress(self.bottleneck, channels, name='bottleneck')(x)
    for i in range(self.cut_layer, resnet.num_modules(self.depth)):
      x = resnet.make_module(i, self.width, self.image_size, self.weight_standardization,
                             dtype=self.dtype, depth=self.depth)(x)
    # Pooled in float32, so the head, the features and the loss are float32 whatever the dtype.
    features = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
    # The head is defined even when unused so that the parameter tree is one shape.
    projected = heads.ProjectionHead(self.moco_version, name='head')(features, train, mask)
    return features if features_only else projected


def build(config, as_matmul: bool = False) -> tuple[ClientNet, ServerNet]:
  """The client and server modules for a config's model fields."""
  m = config.model
  client = ClientNet(config.cut_layer, m.width, m.image_size, m.weight_standardization,
                     as_matmul, m.bottleneck, m.dtype, m.depth)
  server = ServerNet(config.cut_layer, m.width, config.moco.version, m.image_size,
                     m.weight_standardization, m.bottleneck, m.dtype, m.depth)
  return client, server
