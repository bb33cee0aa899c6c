"""Input layouts of the preparation: which images an input holds, under which identity; reading one.

Layouts (`layout=`):
  folders     one folder per identity (files may sit in sub-folders of it). If the input's sub-folders
              are split names (`train`, `test`, `val`, `validation`) holding identity folders, each is kept
              as its own split (`split_dirs='auto'`), so `--input=.../celeba_id128` keeps its train/test.
  celeba      CelebA: `identity_CelebA.txt` ("file identity" per line) beside or above the image folder
              (the input itself, or `img_align_celeba/` / `img_celeba/` inside it).
  unlabelled  every image under the input (recursively); one split, `train`, with no identities.
  tfds        a TFDS image dataset already present in `data_dir` (the input; default TFDS location when
              empty); unlabelled unless `tfds_label_key` names an integer identity feature. Nothing is
              downloaded unless `tfds_download=True`.

Listing is apart from processing so that a new source of raw images only has to say what it holds.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from idenc_jax.data import images as images_lib
from idenc_jax.data.images import IMAGE_EXTENSIONS
from idenc_jax.data.records import SPLIT_NAMES

LAYOUTS = ('folders', 'celeba', 'unlabelled', 'tfds')


@dataclasses.dataclass(frozen=True)
class Item:
  """One input image: its identity (None if unlabelled), name, and a path or a decoded array."""
  identity: str | None
  name: str
  payload: Path | np.ndarray | None   # None: listed but missing


def load_item(item: Item, max_pixels: int = images_lib.MAX_IMAGE_PIXELS) -> tuple[Image.Image | None, str | None]:
  """Decodes an item to an RGB PIL image (any mode, deeper samples scaled: images.rgb_array), or returns the
  skip reason; an image over `max_pixels` is 'too_large', refused before its pixels are decoded."""
  if item.payload is None:
    return None, 'missing'
  if isinstance(item.payload, np.ndarray):
    arr = item.payload
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = arr[..., 0]
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
      return None, 'not_an_image'
    return Image.fromarray(arr).convert('RGB'), None
  path = item.payload
  if path.suffix.lower() not in IMAGE_EXTENSIONS:
    return None, 'not_an_image'
  try:
    with Image.open(path) as im:
      try:
        images_lib.check_pixels(im.size, str(path), max_pixels)
      except images_lib.ImageReadError:
        return None, 'too_large'
      try:
        im.load()
      except (OSError, SyntaxError, ValueError) as e:
        return None, 'truncated' if 'truncated' in str(e).lower() else 'unreadable'
      im = ImageOps.exif_transpose(im)
      return Image.fromarray(images_lib.rgb_array(im, str(path))), None
  except Image.DecompressionBombError:
    return None, 'too_large'
  except images_lib.ImageReadError:
    return None, 'unreadable'
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
    return None, 'unreadable'


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a layout lists: the items (an iterable, since tfds streams them), their number when known,
  whether they carry identities, and the items of each split when the input's folders define the split."""
  items: Iterable[Item]
  total: int | None
  labelled: bool
  presplit: dict[str, list[Item]] | None = None


def list_inputs(layout: str, root: Path | None, *, split_dirs: str = 'auto', identity_file: str | None = None,
                tfds_name: str | None = None, tfds_split: str = 'train', tfds_image_key: str = 'image',
                tfds_label_key: str | None = None, tfds_download: bool = False) -> Inputs:
  """The input items of `layout` under `root` (for tfds: the data_dir, or None for the default)."""
  if layout == 'folders':
    found = folder_splits(root, split_dirs)
    if isinstance(found, dict):
      items = [it for split_items in found.values() for it in split_items]
      return Inputs(items, len(items), True, found)
    return Inputs(found, len(found), True)
  if layout == 'celeba':
    items = celeba_items(root, identity_file)
    return Inputs(items, len(items), True)
  if layout == 'unlabelled':
    items = unlabelled_items(root)
    return Inputs(items, len(items), False)
  if layout != 'tfds':
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}.')
  if not tfds_name:
    raise ValueError('layout=tfds needs tfds_name.')
  items, total = tfds_items(str(root) if root else None, tfds_name, tfds_split, tfds_image_key,
                            tfds_label_key, tfds_download)
  return Inputs(items, total, tfds_label_key is not None)


def _files_under(directory: Path) -> list[Path]:
  """Regular files below `directory`, sorted, hidden files and folders excluded."""
  out = []
  for root, dirs, files in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    out.extend(Path(root) / f for f in sorted(files) if not f.startswith('.'))
  return out


def _subdirs(directory: Path) -> list[Path]:
  return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith('.'))


def _identity_items(root: Path, identity_dirs: Sequence[Path]) -> list[Item]:
  items = []
  for d in identity_dirs:
    items.extend(Item(d.name, str(f.relative_to(root)), f) for f in _files_under(d))
  return items


def folder_splits(root: Path, split_dirs: str) -> dict[str, list[Item]] | list[Item]:
  """Items of a folder-per-identity tree: by split folder when it has them, else one flat list."""
  subdirs = _subdirs(root)
  if split_dirs not in ('auto', 'true', 'false'):
    raise ValueError(f'split_dirs must be "auto", "true" or "false", got {split_dirs!r}.')
  looks_split = bool(subdirs) and all(d.name in SPLIT_NAMES for d in subdirs)
  if split_dirs == 'true' and not looks_split:
    raise ValueError(f'split_dirs=true but the sub-folders of {root} are not all split names '
                     f'{sorted(SPLIT_NAMES)}: {[d.name for d in subdirs][:10]}.')
  if split_dirs == 'false' or not looks_split:
    return _identity_items(root, subdirs)
  splits = {d.name: _subdirs(d) for d in subdirs}
  seen: dict[str, str] = {}
  for split, dirs in splits.items():
    for d in dirs:
      if d.name in seen:
        raise ValueError(f'Identity folder {d.name!r} is in both {seen[d.name]}/ and {split}/ of {root}; '
                         'an identity must belong to one split.')
      seen[d.name] = split
  return {split: _identity_items(root, dirs) for split, dirs in splits.items()}


def celeba_items(root: Path, identity_file: str | None) -> list[Item]:
  ident = Path(identity_file) if identity_file else root / 'identity_CelebA.txt'
  if not ident.is_file():
    raise FileNotFoundError(f'CelebA identity file {ident} not found (pass identity_file=...).')
  lines = [ln.split() for ln in ident.read_text().splitlines() if ln.strip()]
  for i, parts in enumerate(lines):
    if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
      raise ValueError(f'{ident}, line {i + 1}: expected "<file> <identity number>", got {parts}.')
  image_dir = root
  for cand in ('img_align_celeba', 'img_celeba'):
    if (root / cand).is_dir() and not (root / lines[0][0]).exists():
      image_dir = root / cand
      break
  items = []
  for name, identity in lines:
    path = image_dir / name
    items.append(Item(identity, str(path.relative_to(root)), path if path.exists() else None))
  return items


def unlabelled_items(root: Path) -> list[Item]:
  return [Item(None, str(f.relative_to(root)), f) for f in _files_under(root)]


def tfds_items(data_dir: str | None, name: str, split: str, image_key: str, label_key: str | None,
                download: bool) -> tuple[Iterable[Item], int]:
  import tensorflow_datasets as tfds  # lazy: imports TensorFlow; only this layout needs it
  builder = tfds.builder(name, data_dir=data_dir or None)
  if download:
    builder.download_and_prepare()
  elif not builder.is_prepared():
    raise FileNotFoundError(f'TFDS dataset {name!r} is not prepared in {builder.data_dir}; prepare it '
                            'there first or pass tfds_download=True.')
  if split not in builder.info.splits:
    raise ValueError(f'TFDS dataset {name!r} has no split {split!r}; it has {list(builder.info.splits)}.')
  features = builder.info.features
  if image_key not in features:
    raise ValueError(f'TFDS dataset {name!r} has no feature {image_key!r}; it has {list(features)}.')
  if label_key is not None and label_key not in features:
    raise ValueError(f'TFDS dataset {name!r} has no feature {label_key!r}; it has {list(features)}.')
  total = builder.info.splits[split].num_examples

  def gen():
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            read_config=tfds.ReadConfig(add_tfds_id=True))
    for ex in tfds.as_numpy(ds):
      identity = None if label_key is None else str(int(ex[label_key]))
      yield Item(identity, ex['tfds_id'].decode(), np.asarray(ex[image_key]))

  return gen(), total

