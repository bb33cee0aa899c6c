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


# Images above this many pixels are refused before they are decoded (config.data.max_image_pixels): well below
# Pillow's decompression-bomb limits (a warning at 89 MP, an error at 179 MP), and above any camera photo a face
# model needs. A 12000 x 12000 reference decoded in full took 2.7 GB.
MAX_IMAGE_PIXELS = 50_000_000


class ImageReadError(ValueError):
  """An image that cannot be used, with a one-line message naming the file and what to do."""


def check_pixels(size: tuple[int, int], name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
  """ImageReadError when width x height is over `max_pixels` (0: no limit)."""
  w, h = size
  if max_pixels and w * h > max_pixels:
    raise ImageReadError(f'{name} is {w} x {h} = {w * h / 1e6:.0f} MP, over the limit of {max_pixels / 1e6:g} MP '
                         '(config.data.max_image_pixels): downscale it, or raise the limit.')


def rgb_array(image: Image.Image, name: str = 'image') -> np.ndarray:
  """Any PIL image -> uint8 RGB [H, W, 3], scaling (never clipping) deeper samples to 8 bits.

  16-bit grey (I;16*) and 32-bit integer grey (I, values 0-65535, as 16-bit PNG and TIFF decode) map 65535 to
  255; float grey (F) maps 1.0 to 255 when its values lie in [0, 1], else is read as 0-255 (0-65535 beyond
  255). Palette, LA, CMYK and the rest go through Pillow's own conversion (palette transparency dropped).
  Pillow's convert('RGB') would clip I;16 and I at 255 (a white silhouette) and F likewise.
  """
  mode = image.mode
  if mode.startswith('I') or mode == 'F':
    a = np.asarray(image).astype(np.float64)
    if a.ndim != 2:
      raise ImageReadError(f'{name}: unsupported {mode} image of shape {a.shape}.')
    if not np.isfinite(a).all():
      raise ImageReadError(f'{name}: {mode} image with non-finite values.')
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo < 0 or hi > 65535:
      raise ImageReadError(f'{name}: {mode} image with values in [{lo:g}, {hi:g}], outside 0-65535; convert it '
                           'to 8-bit RGB first.')
    if mode == 'F' and hi <= 1.0:
      scale = 255.0
    elif mode == 'F' and hi <= 255.0:
      scale = 1.0
    else:
      scale = 255.0 / 65535.0
    grey = np.clip(np.round(a * scale), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  if mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  return np.asarray(image.convert('RGB'))


def open_image(path: str | os.PathLike, what: str = 'image', max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
  """A loaded PIL image with its EXIF rotation applied; FileNotFoundError or ImageReadError (a ValueError)
  naming the file. Images over `max_pixels` are refused before their pixels are decoded."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what.capitalize()} not found: {path}')
  try:
    with Image.open(path) as im:
      check_pixels(im.size, f'{what.capitalize()} {path}', max_pixels)
      im.load()
      return ImageOps.exif_transpose(im)
  except ImageReadError:
    raise
  except Image.DecompressionBombError as e:
    raise ImageReadError(f'{what.capitalize()} {path} is too large to decode safely ({e}).') from e
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ImageReadError(f'Cannot read {what} {path}: {e}') from e


def read_rgb(path: str | os.PathLike, what: str = 'image', max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
  """An image file -> uint8 RGB [H, W, 3] (any mode, see rgb_array)."""
  return rgb_array(open_image(path, what, max_pixels), f'{what} {os.fspath(path)}')


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
