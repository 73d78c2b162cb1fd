"""A client's own images, from a folder or an npz archive, as one uint8 array.

Two inputs, both read with Pillow:

- a folder of image files (.png, .jpg, .jpeg, .bmp, .webp), directly in it or in
  class subfolders one level down (the labels are not needed: the client learns
  without them);
- an ``.npz`` in the simulator's ``npz`` source format: ``jpeg`` (uint8, every
  encoded image concatenated), ``offsets`` (n + 1 cut points into it, from 0 to
  its length), ``labels`` (n) and ``classes``.

Every image becomes RGB (grayscale, palette and alpha images are converted; a
JPEG's EXIF orientation is applied). An image that is already
``image_size`` x ``image_size`` is kept as it is; any other is resized so that
its shorter side is ``image_size`` (Pillow's antialiased bilinear filter) and
cropped to the central square, as torchvision's Resize + CenterCrop, so photos
of any size fit one array and a small device never holds full-resolution
photos. The simulator instead crops its views from the stored resolution; the
two agree whenever the data is stored at the model's image size (CIFAR-10 at
32, the paper's setting). ``image_size=None`` keeps every image as it is and
then requires them all to be one size.
"""
from __future__ import annotations

import io
import os
import zipfile

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
NPZ_ARRAYS = ('jpeg', 'offsets', 'labels', 'classes')
# Modes that become RGB without inventing information (alpha is dropped).
_CONVERTIBLE_MODES = ('RGB', 'RGBA', 'L', 'LA', 'P', 'PA', 'CMYK', 'YCbCr')


class DataError(ValueError):
  """Missing or unreadable client data; the message is one line naming the file."""


def load_images(path: str, image_size: int | None) -> np.ndarray:
  """The client's images at ``path`` (a folder or an .npz) as uint8 (n, H, W, 3)."""
  if not os.path.exists(path):
    raise DataError(f'{path} does not exist: give a folder of images or an .npz archive')
  if os.path.isdir(path):
    files = image_files(path)
    images = [_read_file(file, image_size) for file in files]
    return _stack(images, files)
  if path.lower().endswith('.npz'):
    return _load_npz(path, image_size)
  raise DataError(f'{path} is neither a folder nor an .npz archive: give a folder of images '
                  'or an .npz in the npz source format')


def image_files(folder: str) -> list[str]:
  """Image files in ``folder`` and its immediate subfolders, sorted; hidden entries skipped."""
  files = []
  for name in sorted(os.listdir(folder)):
    entry = os.path.join(folder, name)
    if name.startswith('.'):
      continue
    if os.path.isdir(entry):
      files.extend(os.path.join(entry, f) for f in sorted(os.listdir(entry))
                   if not f.startswith('.') and f.lower().endswith(IMAGE_SUFFIXES))
    elif name.lower().endswith(IMAGE_SUFFIXES):
      files.append(entry)
  if not files:
    raise DataError(f'{folder} holds no {"/".join(IMAGE_SUFFIXES)} files, directly or in '
                    'class subfolders: put the client\'s images there')
  return files


def fit(image: Image.Image, image_size: int | None) -> Image.Image:
  """The image as is at image_size x image_size (or None), else shorter side scaled, centre crop."""
  width, height = image.size
  if image_size is None or (width, height) == (image_size, image_size):
    return image
  scale = image_size / min(width, height)
  new_w, new_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
  image = image.resize((new_w, new_h), Image.BILINEAR)
  left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
  return image.crop((left, top, left + image_size, top + image_size))


def decode(data: bytes, where: str, image_size: int | None) -> np.ndarray:
  """One encoded image as uint8 (H, W, 3); ``where`` names it in errors."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f'{where}: cannot decode the image ({e}): replace or remove it') from None
  if image.mode not in _CONVERTIBLE_MODES:
    raise DataError(f'{where}: image mode {image.mode} cannot become RGB: convert it to RGB')
  image = ImageOps.exif_transpose(image).convert('RGB')
  return np.asarray(fit(image, image_size), np.uint8)


def _read_file(file: str, image_size: int | None) -> np.ndarray:
  try:
    with open(file, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise DataError(f'{file}: cannot read the file ({e.strerror}): check its permissions') from None
  return decode(data, file, image_size)


def _stack(images: list[np.ndarray], names: list[str]) -> np.ndarray:
  for name, image in zip(names, images):
    if image.shape != images[0].shape:
      raise DataError(f'{name}: image is {image.shape[1]}x{image.shape[0]} but {names[0]} is '
                      f'{images[0].shape[1]}x{images[0].shape[0]}: give an image size to '
                      'resize them to')
  return np.stack(images)


def _load_npz(file: str, image_size: int | None) -> np.ndarray:
  try:
    with np.load(file, allow_pickle=False) as archive:
      arrays = {key: archive[key] for key in archive.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f'{file}: unreadable archive ({e}): replace the truncated or '
                    'corrupt file') from None
  missing = sorted(set(NPZ_ARRAYS) - set(arrays))
  if missing:
    raise DataError(f'{file}: missing arrays {missing}: the archive needs '
                    f'{", ".join(NPZ_ARRAYS)}')
  encoded, offsets, labels = arrays['jpeg'], arrays['offsets'], arrays['labels']
  if (encoded.dtype != np.uint8 or encoded.ndim != 1 or offsets.ndim != 1
      or not np.issubdtype(offsets.dtype, np.integer) or len(offsets) != len(labels) + 1
      or offsets[0] != 0 or offsets[-1] != len(encoded) or np.any(np.diff(offsets) <= 0)):
    raise DataError(f'{file}: offsets {offsets.shape} do not cut jpeg {encoded.shape} into '
                    f'{len(labels)} images: regenerate the archive')
  if len(labels) == 0:
    raise DataError(f'{file}: the archive holds no images: give the client some data')
  buffer = encoded.tobytes()
  names = [f'{file} image {i}' for i in range(len(labels))]
  images = [decode(buffer[a:b], name, image_size)
            for name, a, b in zip(names, offsets[:-1], offsets[1:])]
  return _stack(images, names)
