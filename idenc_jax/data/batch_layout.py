"""Sizes of the training batch's two parts, identity groups and identity-agnostic images, per process.

Apart from the grain pipeline (pipeline.py) so that what needs only the sizes (the benchmark's synthetic
batches) imports without grain.
"""

from __future__ import annotations

import dataclasses
import math

import jax


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Sizes of the global and per-process parts of the batch."""
  batch_size: int           # B (global)
  images_per_identity: int  # M
  process_index: int
  process_count: int
  agnostic_size: int        # B_ag (global)

  @property
  def id_size(self) -> int:           # B_id
    return self.batch_size - self.agnostic_size

  @property
  def num_groups(self) -> int:        # K
    return self.id_size // self.images_per_identity

  @property
  def local_groups(self) -> int:      # K / P
    return self.num_groups // self.process_count

  @property
  def local_agnostic(self) -> int:    # B_ag / P
    return self.agnostic_size // self.process_count


def batch_spec(config, process_index: int | None = None, process_count: int | None = None, *,
               training: bool = True) -> BatchSpec:
  """Validates the batch layout against the config and the process count. `training=False` (benchmarks,
  which time the step at any batch, e.g. 1 group of 2 + 2 agnostic for the 128-px model) allows a single
  identity group with the identity loss on; a training run must not have one."""
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  b, m = config.train.batch_size, config.data.images_per_identity
  b_ag = agnostic_size(config)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, process_count={process_count}).')
  if m < 2:
    raise ValueError(f'config.data.images_per_identity={m} must be >= 2 (the identity loss needs pairs).')
  if (b - b_ag) % m:
    raise ValueError(f'The identity part of the batch, {b - b_ag} images (config.train.batch_size minus its '
                     f'{b_ag} agnostic), is not divisible by config.data.images_per_identity={m}.')
  k = (b - b_ag) // m
  if training and k < 2 and config.stage == 1 and config.loss.use_id_loss:
    # The soft nearest-neighbour loss contrasts groups: with one, every partner shares the label and it is 0.
    raise ValueError(f'K = {k} identity group per batch: the identity loss (config.loss.use_id_loss) needs at '
                     'least 2 to compare; raise config.train.batch_size or lower data.images_per_identity / '
                     'data.agnostic_fraction.')
  if k % process_count:
    raise ValueError(f'K = {k} identity groups per batch (identity images / images_per_identity) is not '
                     f'divisible by the {process_count} processes; each process needs whole groups.')
  if b_ag % process_count:
    raise ValueError(f'The agnostic part of the batch, {b_ag} images, is not divisible by the {process_count} '
                     'processes.')
  return BatchSpec(b, m, process_index, process_count, b_ag)


def agnostic_size(config) -> int:
  """B_ag = train.batch_size * data.agnostic_fraction: a whole number from 1 to B - 2 (one line if not)."""
  b, f = config.train.batch_size, config.data.agnostic_fraction
  if not (math.isfinite(f) and 0 < f < 1):
    raise ValueError(f'config.data.agnostic_fraction={f} must lie strictly between 0 and 1.')
  b_ag = round(b * f)
  if abs(b * f - b_ag) > 1e-6:
    raise ValueError(f'config.train.batch_size={b} x config.data.agnostic_fraction={f} = {b * f:g} is not a whole '
                     'number of identity-agnostic images.')
  if not 1 <= b_ag <= b - 2:
    raise ValueError(f'config.train.batch_size={b} x config.data.agnostic_fraction={f} leaves {b - b_ag} identity '
                     f'image(s) and {b_ag} agnostic; each part needs images (the identity part at least 2).')
  return b_ag
