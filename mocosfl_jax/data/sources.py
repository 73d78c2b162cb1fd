"""Dataset sources: every source yields uint8 NHWC images, int labels and class names.

A source is chosen by ``config.data.source``. The trainer only ever sees a
:class:`Split`; where the pixels came from is this module's business.
"""
from __future__ import annotations

import dataclasses

import numpy as np


class DataError(ValueError):
  """Bad or missing data; its message is one line that says what to do."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a dataset, held in host memory."""
  images: np.ndarray  # uint8, (n, H, W, 3)
  labels: np.ndarray  # int32, (n,)
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.labels)


# Normalisation statistics exactly as the reference uses them (spec 2.1, 9.26):
# the CIFAR-10 std is the widely copied (0.2023, 0.1994, 0.2010), not the true one.
NORMALIZATION = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'cifar100': ((0.50708, 0.48655, 0.44092), (0.26733, 0.25644, 0.27615)),
    'svhn_cropped': ((0.3522, 0.4004, 0.4463), (0.1189, 0.1377, 0.1784)),
    'stl10': ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    'digits': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel for a dataset name; ImageNet statistics otherwise."""
  return NORMALIZATION.get(name, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))


def _digits(split: str, image_size: int = 32) -> Split:
  """scikit-learn's bundled 8x8 digits (1,797 real images, no download).

  Upsampled to ``image_size`` and repeated over three channels so the CIFAR
  network applies unchanged. The last 20% (a fixed, seeded choice) is the test split.
  """
  from PIL import Image
  from sklearn.datasets import load_digits

  digits = load_digits()
  pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
  order = np.random.default_rng(0).permutation(len(pixels))
  cut = int(0.8 * len(pixels))
  chosen = order[:cut] if split == 'train' else order[cut:]
  images = np.stack([
      np.asarray(Image.fromarray(pixels[i]).resize((image_size, image_size), Image.BILINEAR))
      for i in chosen])
  images = np.repeat(images[..., None], 3, axis=-1)
  return Split(images, digits.target[chosen].astype(np.int32),
               tuple(str(c) for c in range(10)))


def load_split(data_config, split: str) -> Split:
  """Loads ``split`` ('train' or 'test') of the source named by ``data_config.source``."""
  if split not in ('train', 'test'):
    raise DataError(f"unknown split {split!r}: use 'train' or 'test'")
  source = data_config.source
  if source == 'digits':
    return _digits(split)
  raise DataError(f"unknown data.source {source!r}: use one of ['digits']")
