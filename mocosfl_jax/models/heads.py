"""MoCo projection heads (spec 1.6), chosen by ``moco_version``."""
from __future__ import annotations

import flax.linen as nn

from mocosfl_jax.models.resnet import xavier

# moco_version -> (hidden widths, output dim K_dim, BatchNorm after the hidden layer)
HEADS = {
    'V1': ((), 128, False),
    'smallV2': ((512,), 512, False),
    'V2': ((1024,), 1024, False),
    'largeV2': ((4096,), 2048, True),
}


def key_dim(moco_version: str) -> int:
  """Dimension of queries, keys and queue entries for a head."""
  return HEADS[moco_version][1]


class ProjectionHead(nn.Module):
  """Linear layers with ReLU between them; all linears have biases and Xavier init.

  ``mask`` (rows,) limits a BatchNorm's batch statistics to the rows it marks.
  """
  moco_version: str = 'V2'

  @nn.compact
  def __call__(self, x, train: bool = True, mask=None):
    hidden, out_dim, batch_norm = HEADS[self.moco_version]
    for width in hidden:
      x = nn.Dense(width, kernel_init=xavier)(x)
      if batch_norm:
        # PyTorch BatchNorm1d: momentum 0.1 (flax's 0.9), eps 1e-5.
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(
            x, mask=None if mask is None else mask[:, None])
      x = nn.relu(x)
    return nn.Dense(out_dim, kernel_init=xavier)(x)
