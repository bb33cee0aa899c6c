"""Random-access image sources with identity tables: prepared datasets and in-memory arrays.

An identity source holds images grouped by identity: identity i owns records offsets[i]..offsets[i+1]-1,
and its global label is `label_offset + i` (offsets follow the order of `config.data.identity_sources`, so
labels stay unique when datasets are mixed). A prepared dataset must have been prepared at
`config.model.resolution`; another resolution is an error rather than a silent resize (re-run
`python -m idenc_jax.data.prepare --resolution=...`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from idenc_jax.data import records as records_lib
from idenc_jax.data import synthetic


class ArraySource:
  """Images held in memory, uint8 [N, R, R, 3]."""

  def __init__(self, images: np.ndarray, name: str = 'arrays'):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or \
        images.shape[1] != images.shape[2]:
      raise ValueError(f'{name}: expected uint8 [N, R, R, 3] images, got {images.dtype} '
                       f'{images.shape}.')
    self.images = images
    self.name = name
    self.resolution = images.shape[1]

  def __len__(self) -> int:
    return len(self.images)

  def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """uint8 [n, R, R, 3] images at `indices`."""
    return self.images[np.asarray(indices, np.int64)]


class PreparedSource:
  """The records of one split of a prepared dataset (grain ArrayRecordDataSource + PNG/JPEG decoding)."""

  def __init__(self, directory: str | os.PathLike, split: str):
    import grain  # lazy: keeps this module importable without grain
    self.directory = Path(directory)
    self.index = records_lib.read_index(directory)
    if split not in self.index['splits']:
      raise ValueError(f'{directory} has no split {split!r}; it has {sorted(self.index["splits"])}.')
    self.split = split
    self.meta = self.index['splits'][split]
    self.name = f'{directory}[{split}]'
    self.resolution = int(self.index['resolution'])
    paths = [str(self.directory / s) for s in self.meta['shards']]
    for p in paths:
      if not os.path.isfile(p):
        raise FileNotFoundError(f'Shard {p} listed in {directory}/index.json is missing.')
    self._records = grain.sources.ArrayRecordDataSource(paths)
    if len(self._records) != self.meta['images']:
      raise ValueError(f'{directory}: shards hold {len(self._records)} records of split {split!r}, '
                       f'index.json says {self.meta["images"]}.')

  def __len__(self) -> int:
    return len(self._records)

  def read_records(self, indices: Sequence[int] | np.ndarray) -> list[tuple[int, str, bytes]]:
    """(label, name, encoded bytes) of the records at `indices`."""
    raw = self._records.__getitems__([int(i) for i in indices])
    return [records_lib.unpack_record(r) for r in raw]

  def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    images = [records_lib.decode_image(enc) for _, _, enc in self.read_records(indices)]
    r = self.resolution
    out = np.stack(images) if images else np.zeros((0, r, r, 3), np.uint8)
    if out.shape[1:] != (r, r, 3):
      raise ValueError(f'{self.name}: decoded images of shape {out.shape[1:]}, expected {(r, r, 3)}.')
    return out


class ConcatSource:
  """Several image sources read as one (the identity sources used as identity-agnostic data)."""

  def __init__(self, sources: Sequence[Any]):
    if not sources:
      raise ValueError('ConcatSource needs at least one source.')
    self.sources = list(sources)
    self.resolution = sources[0].resolution
    self.name = '+'.join(s.name for s in sources)
    self._starts = np.cumsum([0] + [len(s) for s in sources])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    r = self.resolution
    out = np.zeros((len(indices), r, r, 3), np.uint8)
    which = np.searchsorted(self._starts, indices, side='right') - 1
    for j, src in enumerate(self.sources):
      sel = np.nonzero(which == j)[0]
      if len(sel):
        out[sel] = src.read(indices[sel] - self._starts[j])
    return out


@dataclasses.dataclass
class IdentitySource:
  """Images grouped by identity: identity i owns records offsets[i] .. offsets[i+1]-1."""
  images: Any                 # ArraySource | PreparedSource
  offsets: np.ndarray         # int64 [num_identities + 1]
  names: list[str]
  label_offset: int = 0

  def __post_init__(self):
    self.offsets = np.asarray(self.offsets, np.int64)
    if len(self.offsets) != len(self.names) + 1 or self.offsets[0] != 0 or \
        self.offsets[-1] != len(self.images) or np.any(np.diff(self.offsets) < 1):
      raise ValueError(f'{self.images.name}: inconsistent identity table (offsets {self.offsets[:5]}..., '
                       f'{len(self.names)} identities, {len(self.images)} images).')

  @property
  def name(self) -> str:
    return self.images.name

  @property
  def num_identities(self) -> int:
    return len(self.names)

  @property
  def counts(self) -> np.ndarray:
    return np.diff(self.offsets)

  def identity_images(self, i: int) -> np.ndarray:
    return self.images.read(np.arange(self.offsets[i], self.offsets[i + 1]))

  @classmethod
  def from_prepared(cls, directory: str | os.PathLike, split: str) -> 'IdentitySource':
    src = PreparedSource(directory, split)
    if src.index['layout'] == 'unlabelled' or src.meta['identities'] == 0:
      raise ValueError(f'{directory} has no identity labels (layout {src.index["layout"]!r}); it can '
                       'only be an identity-agnostic source.')
    counts = np.asarray(src.meta['identity_counts'], np.int64)
    return cls(src, np.concatenate([[0], np.cumsum(counts)]), list(src.meta['identity_names']))

  @classmethod
  def from_arrays(cls, images: np.ndarray, labels: np.ndarray, name: str = 'arrays') -> 'IdentitySource':
    """Images whose int labels are grouped (contiguous runs) and numbered 0..n-1 in order."""
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
      raise ValueError(f'{name}: labels of shape {labels.shape} for {len(images)} images.')
    starts = np.concatenate([[0], np.nonzero(np.diff(labels))[0] + 1])
    if not np.array_equal(labels[starts], np.arange(len(starts))):
      raise ValueError(f'{name}: labels must be grouped and numbered 0..n-1 in order.')
    return cls(ArraySource(images, name), np.concatenate([starts, [len(labels)]]),
               [str(i) for i in range(len(starts))])


@dataclasses.dataclass
class Sources:
  """What the pipeline reads: identity sources with mixing weights, and the identity-agnostic images."""
  identity: list[IdentitySource]
  weights: np.ndarray          # float64, sums to 1
  agnostic: Any | None         # ArraySource | PreparedSource | ConcatSource | None
  resolution: int

  @property
  def num_identities(self) -> int:
    return sum(s.num_identities for s in self.identity)


def parse_weights(spec: str, n: int) -> np.ndarray:
  """'' -> equal weights; else n comma-separated non-negative numbers, normalised."""
  if not spec.strip():
    return np.full(n, 1.0 / n)
  try:
    w = np.array([float(x) for x in spec.split(',')], np.float64)
  except ValueError as e:
    raise ValueError(f'config.data.identity_weights={spec!r} is not comma-separated numbers.') from e
  if len(w) != n:
    raise ValueError(f'config.data.identity_weights has {len(w)} weights for {n} identity sources.')
  if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
    raise ValueError(f'config.data.identity_weights={spec!r} must be non-negative with a positive sum.')
  return w / w.sum()


def _synthetic_identities(config, split: str) -> IdentitySource:
  d = config.data
  n = d.synthetic_train_identities if split == 'train' else d.synthetic_test_identities
  images, labels = synthetic.render_identities(n, d.synthetic_images_per_identity,
                                               config.model.resolution, seed=config.seed, split=split)
  return IdentitySource.from_arrays(images, labels, name=f'synthetic[{split}]')


def _check_resolution(source: Any, resolution: int) -> None:
  if source.resolution != resolution:
    raise ValueError(f'{source.name} was prepared at {source.resolution}px but config.model.resolution is '
                     f'{resolution}; prepare it again with `python -m idenc_jax.data.prepare '
                     f'--resolution={resolution}`.')


def load_identity_sources(config, split: str) -> list[IdentitySource]:
  """The identity sources of `config.data.identity_sources` for `split`, with global label offsets."""
  entries = [s.strip() for s in config.data.identity_sources.split(',') if s.strip()]
  if not entries:
    raise ValueError('config.data.identity_sources is empty.')
  out = []
  for entry in entries:
    if entry == 'synthetic':
      src = _synthetic_identities(config, split)
    else:
      src = IdentitySource.from_prepared(entry, split)
    _check_resolution(src.images, config.model.resolution)
    out.append(src)
  offset = 0
  for src in out:
    src.label_offset = offset
    offset += src.num_identities
  return out


def load_agnostic_source(config, identity: Sequence[IdentitySource] | None = None) -> Any:
  """The identity-agnostic images of `config.data.agnostic_source` (always the train split)."""
  spec = config.data.agnostic_source.strip()
  if spec == 'synthetic':
    images = synthetic.render_agnostic(config.data.synthetic_agnostic_images, config.model.resolution,
                                       seed=config.seed)
    src = ArraySource(images, 'synthetic[agnostic]')
  elif spec == 'same':
    identity = identity if identity is not None else load_identity_sources(config, 'train')
    src = ConcatSource([s.images for s in identity])
  elif spec:
    src = PreparedSource(spec, 'train')
  else:
    raise ValueError('config.data.agnostic_source is empty (use "synthetic", "same" or a prepared dir).')
  _check_resolution(src, config.model.resolution)
  if len(src) == 0:
    raise ValueError(f'Identity-agnostic source {src.name} holds no images.')
  return src


def load_sources(config, split: str = 'train') -> Sources:
  """Identity sources of `split` with their weights; the agnostic source too when split == 'train'."""
  identity = load_identity_sources(config, split)
  weights = parse_weights(config.data.identity_weights, len(identity))
  agnostic = load_agnostic_source(config, identity) if split == 'train' else None
  return Sources(identity, weights, agnostic, config.model.resolution)
