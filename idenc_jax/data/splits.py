"""The identity-level train/test split of `prepare`: named test identities, or a seeded fraction of them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np


def parse_test_dirs(test_dirs: str | Sequence[str] | None) -> list[str] | None:
  """Test identity names from a comma-separated string (folder paths give their last part), a list, or a text
  file with one per line; None when not given."""
  if test_dirs is None or (isinstance(test_dirs, str) and not test_dirs.strip()):
    return None
  if isinstance(test_dirs, str):
    if os.path.isfile(test_dirs):
      return [ln.strip() for ln in Path(test_dirs).read_text().splitlines() if ln.strip()]
    return [s.strip().rstrip('/').split('/')[-1] for s in test_dirs.split(',') if s.strip()]
  return list(test_dirs)


def split_identities(names: list[str], test_names: list[str] | None, test_fraction: float,
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
