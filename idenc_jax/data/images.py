"""Image conventions shared by every layer: reading files, uint8 <-> [-1, 1] floats, square crops, grids.

Models see float images in [-1, 1], NHWC; files and datasets hold uint8 RGB. Works on numpy and jax
arrays alike (only `.astype` and arithmetic are used), so the same conversion runs inside jit.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm',
                              '.pgm'})


def to_float(images, dtype=np.float32):
  """uint8 [0, 255] -> float [-1, 1] (float32 unless `dtype`); float inputs pass through as `dtype`. Numpy or
  jax arrays."""
  if images.dtype == np.uint8:
    return images.astype(dtype) / 127.5 - 1.0
  return images.astype(dtype)


def to_uint8(images) -> np.ndarray:
  """Float images in [-1, 1] -> uint8 [0, 255] (rounded, clipped)."""
  return np.asarray(np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255), np.uint8)


def open_image(path: str | os.PathLike, what: str = 'image') -> Image.Image:
  """A loaded PIL image with its EXIF rotation applied; FileNotFoundError or ValueError naming the file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what.capitalize()} not found: {path}')
  try:
    with Image.open(path) as im:
      im.load()
      return ImageOps.exif_transpose(im)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ValueError(f'Cannot read {what} {path}: {e}') from e


def read_rgb(path: str | os.PathLike, what: str = 'image') -> np.ndarray:
  """An image file -> uint8 RGB [H, W, 3]."""
  return np.asarray(open_image(path, what).convert('RGB'))


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
  """Largest centred square, resized to resolution x resolution with Lanczos."""
  w, h = image.size
  s = min(w, h)
  left, top = (w - s) // 2, (h - s) // 2
  image = image.crop((left, top, left + s, top + s))
  if s != resolution:
    image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
  return image


def image_grid(rows: list[np.ndarray], gap: int = 2, border: int = 0) -> np.ndarray:
  """Rows of uint8 images [n_i, H, W, 3] -> one uint8 grid image on white; short rows end early."""
  h, w = rows[0].shape[1:3]
  cols = max(len(r) for r in rows)
  grid = np.full((len(rows) * (h + gap) - gap + 2 * border, cols * (w + gap) - gap + 2 * border, 3), 255,
                 np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      y, x = border + i * (h + gap), border + j * (w + gap)
      grid[y:y + h, x:x + w] = img
  return grid


def tile(images: np.ndarray, cols: int, gap: int = 2, border: int = 0) -> np.ndarray:
  """Images [N, H, W, 3] row-major in rows of `cols` -> one uint8 grid image."""
  return image_grid([images[i:i + cols] for i in range(0, len(images), cols)], gap, border)
