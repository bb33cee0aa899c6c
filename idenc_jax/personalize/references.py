"""Identity inputs of personalization: reference photos (a folder, files, PIL images or arrays of any size,
colour or grey) brought to the model's resolution, and identity embeddings saved as .npy files.

Each reference is aligned with dlib when asked (as `python -m idenc_jax.data.prepare --align` does), else its
largest centred square is taken; then it is resized to the model resolution with Lanczos.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from idenc_jax.data import align as align_lib
from idenc_jax.data import images as images_lib

ImageLike = Any   # str | os.PathLike | PIL.Image.Image | np.ndarray (uint8 [H, W], [H, W, 1|3|4])


def list_reference_files(folder: str | os.PathLike) -> list[str]:
  """Image files directly in `folder` (by extension, hidden files skipped), sorted by name."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'Reference folder not found: {folder}')
  files = sorted(f for f in os.listdir(folder)
                 if not f.startswith('.') and os.path.splitext(f)[1].lower() in images_lib.IMAGE_EXTENSIONS
                 and os.path.isfile(os.path.join(folder, f)))
  if not files:
    raise FileNotFoundError(f'Reference folder {folder} holds no images (looked for '
                            f'{", ".join(sorted(images_lib.IMAGE_EXTENSIONS))}).')
  return [os.path.join(folder, f) for f in files]


def _expand(images: ImageLike | Sequence[ImageLike]) -> tuple[list[Any], list[str]]:
  """A folder path, one image, a list of images or a uint8 batch [N, H, W, C] -> (items, names)."""
  if isinstance(images, (str, os.PathLike)):
    if os.path.isdir(images):
      files = list_reference_files(images)
      return files, files
    return [images], [os.fspath(images)]
  if isinstance(images, Image.Image):
    return [images], ['reference #0']
  if isinstance(images, np.ndarray):
    channels_ok = images.ndim >= 3 and images.shape[-1] in (1, 3, 4)
    if images.ndim == 2 or (images.ndim == 3 and channels_ok):
      return [images], ['reference #0']
    if images.ndim != 4 or not channels_ok:
      raise ValueError(f'A reference array of shape {images.shape} is ambiguous: give one image [H, W] or '
                       '[H, W, 1|3|4], or a batch [N, H, W, 1|3|4].')
  items = list(images)
  if not items:
    raise ValueError('No reference images given: embed() needs at least one.')
  names = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f'reference #{i}' for i, x in enumerate(items)]
  return items, names


def _to_rgb(item: Any, name: str, max_pixels: int) -> np.ndarray:
  if isinstance(item, (str, os.PathLike)):
    return images_lib.read_rgb(item, 'reference image', max_pixels)
  if isinstance(item, Image.Image):
    images_lib.check_pixels(item.size, name, max_pixels)
    return images_lib.rgb_array(item, name)
  try:
    return align_lib.as_rgb_uint8(np.asarray(item))
  except ValueError as e:
    raise ValueError(f'{name}: {e}') from e


def load_references(images: ImageLike | Sequence[ImageLike], resolution: int, *, align: bool = False,
                    aligner: Any = None, max_pixels: int = images_lib.MAX_IMAGE_PIXELS) -> np.ndarray:
  """References (a folder, paths, PIL images or uint8 arrays of any size, colour or grey) ->
  uint8 [R, resolution, resolution, 3].

  align: cut the largest face out with dlib as the training data was prepared (FaceAligner; `aligner` reuses
  one); a reference without a detectable face is a ValueError naming it. Otherwise the largest centred
  square is taken. Either way the result is resized to `resolution` with Lanczos. Files and PIL images of
  any mode are read by `images.rgb_array` (16-bit scaled, not clipped); one over `max_pixels` is refused.
  """
  items, names = _expand(images)
  if align and aligner is None:
    aligner = align_lib.FaceAligner(size=resolution)
  out = []
  for item, name in zip(items, names):
    rgb = _to_rgb(item, name, max_pixels)
    if align:
      aligned = aligner.align(rgb)
      if aligned is None:
        raise ValueError(f'No face found in reference {name} (config.sample.align=True); use a photo '
                         'where the face is clearly visible, or turn alignment off.')
      rgb = aligned
    out.append(np.asarray(images_lib.center_crop_resize(Image.fromarray(rgb), resolution)))
  return np.stack(out)


def model_record_path(path: str | os.PathLike) -> str:
  """The JSON beside an embedding file that names the model it came from: ME.npy -> ME.npy.json."""
  return os.fspath(path) + '.json'


def save_embedding(path: str | os.PathLike, z: np.ndarray, model: str | None = None) -> None:
  """Saves an identity embedding [D] as float32 .npy (reusable without the photos); with `model` (a Personalizer's
  fingerprint) also the record of the model that made it, which load_embedding checks."""
  z = np.asarray(z, np.float32)
  if z.ndim != 1:
    raise ValueError(f'An identity embedding is a vector [D], got shape {z.shape}.')
  if not np.all(np.isfinite(z)):
    raise ValueError(f'Not saving {os.fspath(path)}: the embedding contains NaN or inf (a damaged checkpoint or '
                     'reference?).')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.save(path, z)
  if model is not None:
    with open(model_record_path(path), 'w') as f:
      json.dump({'model': model, 'embed_dim': int(z.shape[0])}, f)


def check_embedding_model(path: str | os.PathLike, model: str) -> None:
  """ValueError when the embedding file's record names another model than `model` (a file without a record, e.g.
  one written by hand, is taken as it is)."""
  record = model_record_path(path)
  if not os.path.isfile(record):
    return
  try:
    with open(record) as f:
      theirs = json.load(f).get('model')
  except (OSError, ValueError, AttributeError) as e:
    raise ValueError(f'Cannot read {record}, the record of the model that made {os.fspath(path)}: {e}') from e
  if theirs != model:
    raise ValueError(f'{os.fspath(path)} was made by another model ({theirs}, per {record}) than this one ({model}): '
                     'embeddings of different models are not interchangeable; embed the reference photos again.')


def load_embedding(path: str | os.PathLike, embed_dim: int | None = None, model: str | None = None) -> np.ndarray:
  """Loads an embedding saved by `save_embedding`; checks it is a finite vector of `embed_dim` entries and, with
  `model`, that it came from that model."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Embedding file not found: {path}')
  try:
    z = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ValueError(f'Cannot read embedding {path} as a .npy array: {e}') from e
  if z.ndim != 1 or (embed_dim is not None and z.shape[0] != embed_dim):
    want = f'[{embed_dim}]' if embed_dim is not None else '[D]'
    raise ValueError(f'Embedding {path} has shape {z.shape}; this model takes {want} (config.model.embed_dim).')
  if not np.all(np.isfinite(z)):
    raise ValueError(f'Embedding {path} contains NaN or inf.')
  if model is not None:
    check_embedding_model(path, model)
  return z.astype(np.float32)
