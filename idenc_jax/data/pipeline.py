"""The grain input pipeline: identity-grouped and identity-agnostic parts of each batch, sharded by process.

Global batch of B = config.train.batch_size images at step s (sizes: batch_layout.py):
  identity part  B_id = B - B_ag images: K = B_id / M groups of M = config.data.images_per_identity images
                 of one identity each, group g in rows g*M .. g*M+M-1;
  agnostic part  B_ag = B * config.data.agnostic_fraction images (the paper: half).
Process p of P gets groups p*K/P .. (p+1)*K/P - 1 (their group ids stay global) and agnostic rows
p*B_ag/P .. (p+1)*B_ag/P - 1, and reads only those images.

The plan of step s (which identities, images and flips) is a pure function of (config.seed, s), computed the
same way on every process whatever P, so the P processes' batches, concatenated in process order, are
exactly the batch a single process (P=1) reads at step s. Within a step:
  - each group picks a source by `identity_weights`, then an identity uniformly among that source's
    identities (not by image count); the groups drawn from one source get distinct identities when the
    source has at least that many (else identities repeat);
  - a group's M images are distinct when its identity has >= M images; an identity with n < M images
    contributes all n once plus M - n more drawn with replacement among them (order shuffled);
  - agnostic images walk through a fresh seeded permutation of the agnostic source each epoch, so none
    repeats within an epoch;
  - each image is flipped horizontally with probability 1/2 when config.data.random_flip.
Within a step the processes therefore read disjoint records (distinct identities; distinct agnostic
images, except when the step straddles the end of an agnostic epoch).
Stage 2 (config.stage == 2) adds the condition of every image, made from the (flipped) clean image by
`degrade.Degradation` with random parameters (mask positions) drawn from a stream of their own seeded by
(config.seed, s), over the global batch as the plan is, so they too do not depend on P:
  id_condition [B_id/P, R, R, C], agnostic_condition [B_ag/P, R, R, C], float32 in [-1, 1].
Batch s is element s of a grain MapDataset, so the iterator's state is its position, saved and restored
exactly (also with worker processes), and batches do not depend on config.data.num_workers. With workers,
in-memory sources (the synthetic data) are pickled into each worker; prepared datasets are reopened there.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from idenc_jax.data import degrade as degrade_lib
from idenc_jax.data import sources as sources_lib
from idenc_jax.data.batch_layout import BatchSpec, batch_spec

_NUM_STEPS = 2**62          # the stream is effectively endless
_PLAN_TAG = 0x1D5EED        # separates the plan's random streams from other users of the seed
_AGNOSTIC_TAG = 0xA65EED
_DEGRADE_TAG = 0xDE64AD


class BatchPlanner:
  """The global plan of a step: records and flips of every slot of the global batch."""

  def __init__(self, spec: BatchSpec, identity_offsets: list[np.ndarray], weights: np.ndarray,
               label_offsets: list[int], num_agnostic: int, seed: int, random_flip: bool,
               degradation: degrade_lib.Degradation | None = None):
    self.spec = spec
    self.offsets = [np.asarray(o, np.int64) for o in identity_offsets]
    self.weights = np.asarray(weights, np.float64)
    self.label_offsets = list(label_offsets)
    self.num_agnostic = num_agnostic
    self.seed = seed
    self.random_flip = random_flip
    self.degradation = degradation
    self._permutations: dict[int, np.ndarray] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_permutations'] = {}   # a cache; workers rebuild it
    return state

  def _agnostic_permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      if len(self._permutations) >= 2:
        self._permutations.pop(min(self._permutations))
      rng = np.random.default_rng([self.seed, _AGNOSTIC_TAG, epoch])
      self._permutations[epoch] = rng.permutation(self.num_agnostic)
    return self._permutations[epoch]

  def plan(self, step: int) -> dict[str, np.ndarray]:
    """Global plan: id_source/id_record/id_label/id_flip [K*M], ag_record/ag_flip [B_ag]."""
    spec = self.spec
    k, m = spec.num_groups, spec.images_per_identity
    rng = np.random.default_rng([self.seed, _PLAN_TAG, step])
    group_source = rng.choice(len(self.weights), size=k, p=self.weights)
    group_identity = np.zeros(k, np.int64)
    for j, offsets in enumerate(self.offsets):
      sel = np.nonzero(group_source == j)[0]
      n_ids = len(offsets) - 1
      if len(sel):
        group_identity[sel] = rng.choice(n_ids, size=len(sel), replace=len(sel) > n_ids)
    records = np.zeros((k, m), np.int64)
    for g in range(k):
      offsets = self.offsets[group_source[g]]
      start, count = offsets[group_identity[g]], offsets[group_identity[g] + 1] - offsets[group_identity[g]]
      if count >= m:
        picks = rng.choice(count, size=m, replace=False)
      else:
        picks = rng.permutation(np.concatenate([np.arange(count), rng.choice(count, size=m - count)]))
      records[g] = start + picks
    labels = np.asarray(self.label_offsets)[group_source] + group_identity
    id_flip = rng.random(k * m) < 0.5 if self.random_flip else np.zeros(k * m, bool)
    positions = step * spec.agnostic_size + np.arange(spec.agnostic_size, dtype=np.int64)
    epochs, within = np.divmod(positions, self.num_agnostic)
    ag_record = np.empty(spec.agnostic_size, np.int64)
    for e in np.unique(epochs):
      ag_record[epochs == e] = self._agnostic_permutation(int(e))[within[epochs == e]]
    ag_flip = rng.random(spec.agnostic_size) < 0.5 if self.random_flip else np.zeros(spec.agnostic_size,
                                                                                      bool)
    out = {
        'id_source': np.repeat(group_source, m),
        'id_record': records.reshape(-1),
        'id_label': np.repeat(labels, m).astype(np.int32),
        'id_flip': id_flip,
        'ag_record': ag_record,
        'ag_flip': ag_flip,
    }
    if self.degradation is not None:
      # A stream of its own, so stage-2 batches show the same images as stage-1 batches of the same seed.
      deg_rng = np.random.default_rng([self.seed, _DEGRADE_TAG, step])
      out['id_degrade'] = self.degradation.draw(deg_rng, k * m)
      out['ag_degrade'] = self.degradation.draw(deg_rng, spec.agnostic_size)
    return out

  def local_plan(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global plan, plus its global group ids."""
    spec = self.spec
    plan = self.plan(step)
    rows = spec.local_groups * spec.images_per_identity
    lo = spec.process_index * rows
    alo = spec.process_index * spec.local_agnostic
    out = {key: v[lo:lo + rows] for key, v in plan.items() if key.startswith('id_')}
    out.update({key: v[alo:alo + spec.local_agnostic] for key, v in plan.items() if key.startswith('ag_')})
    groups = spec.process_index * spec.local_groups + np.arange(spec.local_groups, dtype=np.int32)
    out['id_group'] = np.repeat(groups, spec.images_per_identity)
    return out


def _flip(images: np.ndarray, flip: np.ndarray) -> np.ndarray:
  images = images.copy() if flip.any() else images
  images[flip] = images[flip][:, :, ::-1]
  return images


class MakeBatch(grain.transforms.Map):
  """step -> this process's batch (module-level so that grain workers can unpickle it)."""

  def __init__(self, planner: BatchPlanner, identity: list[Any], agnostic: Any):
    self.planner = planner
    self.identity = identity     # image sources, one per identity source
    self.agnostic = agnostic

  def map(self, step: int) -> dict[str, np.ndarray]:
    plan = self.planner.local_plan(int(step))
    r = self.agnostic.resolution
    id_images = np.zeros((len(plan['id_record']), r, r, 3), np.uint8)
    for j, src in enumerate(self.identity):
      sel = np.nonzero(plan['id_source'] == j)[0]
      if len(sel):
        id_images[sel] = src.read(plan['id_record'][sel])
    batch = {
        'id_images': _flip(id_images, plan['id_flip']),
        'id_labels': plan['id_label'],
        'id_groups': plan['id_group'],
        'agnostic_images': _flip(self.agnostic.read(plan['ag_record']), plan['ag_flip']),
    }
    deg = self.planner.degradation
    if deg is not None:
      batch['id_condition'] = deg(batch['id_images'], plan['id_degrade'])
      batch['agnostic_condition'] = deg(batch['agnostic_images'], plan['ag_degrade'])
    return batch


class ToPlainArrays(grain.transforms.Map):
  """Copies worker output out of grain's shared memory, so that memory is freed as soon as possible."""

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in batch.items()}


def make_planner(config, sources: sources_lib.Sources, spec: BatchSpec) -> BatchPlanner:
  if sources.agnostic is None:
    raise ValueError('The training pipeline needs an identity-agnostic source (load_sources(config, '
                     '"train")).')
  degradation = degrade_lib.Degradation.from_config(config) if config.stage == 2 else None
  return BatchPlanner(spec, [s.offsets for s in sources.identity], sources.weights,
                      [s.label_offset for s in sources.identity], len(sources.agnostic), config.seed,
                      config.data.random_flip, degradation)


def make_train_dataset(config, *, process_index: int | None = None, process_count: int | None = None,
                       sources: sources_lib.Sources | None = None,
                       read_threads: int = 2) -> grain.IterDataset:
  """The endless grain dataset of this process's batches (see the module docstring)."""
  spec = batch_spec(config, process_index, process_count)
  if config.data.num_workers < 0:
    raise ValueError(f'config.data.num_workers={config.data.num_workers} must be >= 0.')
  sources = sources if sources is not None else sources_lib.load_sources(config, 'train')
  planner = make_planner(config, sources, spec)
  ds = grain.MapDataset.range(0, _NUM_STEPS).map(
      MakeBatch(planner, [s.images for s in sources.identity], sources.agnostic))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=2 * max(read_threads, 1)))
  if config.data.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers,
                                                     per_worker_buffer_size=2))
    ds = ds.map(ToPlainArrays())
  return ds


def make_train_iterator(config, *, process_index: int | None = None, process_count: int | None = None,
                        sources: sources_lib.Sources | None = None,
                        read_threads: int = 2) -> grain.DatasetIterator:
  """Iterator of this process's numpy batches, with get_state()/set_state().

  Each batch: id_images uint8 [B_id/P, R, R, 3], id_labels int32 [B_id/P] (global identity labels),
  id_groups int32 [B_id/P] (group ids unique in the global batch), agnostic_images uint8 [B_ag/P, R, R, 3];
  in stage 2 also id_condition / agnostic_condition float32 [., R, R, C] (see the module docstring).
  process_index/process_count default to jax.process_index()/jax.process_count(). `sources` (default:
  `load_sources(config, 'train')`) lets callers reuse loaded data.
  """
  return iter(make_train_dataset(config, process_index=process_index, process_count=process_count,
                                 sources=sources, read_threads=read_threads))


def make_eval_identities(config, split: str = 'test', *, max_identities: int | None = None,
                         max_images: int | None = None) -> dict[int, np.ndarray]:
  """Held-out identities' images: global label -> uint8 [n, R, R, 3], labels in increasing order.

  The first `max_identities` identities (in label order) and the first `max_images` images of each, when
  given.
  """
  out: dict[int, np.ndarray] = {}
  for src in sources_lib.load_identity_sources(config, split):
    for i in range(src.num_identities):
      if max_identities is not None and len(out) >= max_identities:
        return out
      lo, hi = src.offsets[i], src.offsets[i + 1]
      if max_images is not None:
        hi = min(hi, lo + max_images)
      out[src.label_offset + i] = src.images.read(np.arange(lo, hi))
  return out
