"""The prepared-dataset format: what `python -m idenc_jax.data.prepare` writes and the sources read.

Kept apart from the preparation so that a reader (data/sources.py, inside every grain worker) needs only
this small module, not the layouts, threads and writers of the preparation.

Record format (one ArrayRecord record per image):
  int32 little-endian label (the identity's index within its split, in `identity_names` order; -1 for
  unlabelled data) | uint16 little-endian length L of the name | L bytes UTF-8 name (the source file, relative
  to the input) | encoded image bytes (PNG or JPEG, RGB, resolution x resolution).
Records are grouped by identity in label order, so identity i occupies records
sum(identity_counts[:i]) .. sum(identity_counts[:i+1]) - 1 of the concatenated shards.

`index.json` (written last; the dataset is built in a temporary folder beside the output and renamed into
place only when complete):
  {"format": "idenc_jax.prepared/1", "source", "layout", "resolution", "image_format", "aligned",
   "min_images", "seed", "split_method", "record_format",
   "splits": {split: {"identities", "images", "identity_names", "identity_counts", "shards",
                      "shard_sizes"}},
   "skipped": {"images": {reason: count}, "identities": {"too_few_images": count},
               "images_in_dropped_identities": count, "examples": [[path, reason], ...]}}
Skip reasons for images: `not_an_image` (extension not an image type), `unreadable` (cannot be decoded),
`truncated` (the file ends early), `no_face` (alignment found no face), `missing` (listed in
identity_CelebA.txt but absent).
"""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FORMAT = 'idenc_jax.prepared/1'
INDEX_FILE = 'index.json'
# The names a prepared split may carry besides 'train' and 'test': input sub-folders with these names are
# kept as splits of their own.
SPLIT_NAMES = frozenset({'train', 'test', 'val', 'validation'})
IMAGE_SKIP_REASONS = ('not_an_image', 'unreadable', 'truncated', 'too_large', 'no_face', 'missing')
RECORD_FORMAT = ('<i label><H name length><name utf-8><encoded image>; label -1 = unlabelled; records '
                 'grouped by identity in identity_names order')
_HEADER = struct.Struct('<iH')


def pack_record(label: int, name: str, encoded: bytes) -> bytes:
  """Serialises one image record (see the module docstring)."""
  name_bytes = name.encode('utf-8')[:65535]
  return _HEADER.pack(label, len(name_bytes)) + name_bytes + encoded


def unpack_record(record: bytes) -> tuple[int, str, bytes]:
  """Inverse of `pack_record`: (label, name, encoded image bytes)."""
  label, n = _HEADER.unpack_from(record, 0)
  start = _HEADER.size
  return label, record[start:start + n].decode('utf-8'), record[start + n:]


def encode_image(image: Image.Image, image_format: str, jpeg_quality: int = 95) -> bytes:
  """A PIL image -> stored bytes: PNG (lossless, the default) or JPEG."""
  buf = io.BytesIO()
  if image_format == 'png':
    image.save(buf, format='PNG', compress_level=3)
  elif image_format == 'jpeg':
    image.save(buf, format='JPEG', quality=jpeg_quality)
  else:
    raise ValueError(f'image_format must be "png" or "jpeg", got {image_format!r}.')
  return buf.getvalue()


def decode_image(encoded: bytes) -> np.ndarray:
  """PNG/JPEG bytes -> uint8 [H, W, 3]."""
  with Image.open(io.BytesIO(encoded)) as im:
    return np.asarray(im.convert('RGB'))


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
  """Loads `index.json` of a prepared dataset, with a clear error when it is not one."""
  path = Path(directory) / INDEX_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: {directory} is not a complete prepared dataset '
                            '(run `python -m idenc_jax.data.prepare`).')
  index = json.loads(path.read_text())
  if index.get('format') != FORMAT:
    raise ValueError(f'{path}: format {index.get("format")!r}, expected {FORMAT!r}.')
  return index
