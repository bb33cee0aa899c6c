"""The paper's generation diversity (section 4): higher means more varied outputs for one identity.

For each identity, take the mean pixel value of each of its generated images (images in [0, 1], mean over
height, width and channels) and the population standard deviation (ddof=0) of those means; the diversity is the
average of that standard deviation over identities.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def identity_diversity(images: np.ndarray) -> float:
  """Std over one identity's images [G, H, W, C] (values in [0, 1]) of each image's mean value."""
  x = np.asarray(images, np.float64)
  if x.ndim != 4:
    raise ValueError(f'expected images of shape [G, H, W, C], got {x.shape}')
  if x.shape[0] < 2:
    raise ValueError(f'diversity needs at least 2 images per identity, got {x.shape[0]}')
  if x.size and (x.min() < 0.0 or x.max() > 1.0):
    raise ValueError(f'images must be in [0, 1], got values in [{x.min()}, {x.max()}]')
  return float(x.mean(axis=(1, 2, 3)).std())


def diversity(images_per_identity: np.ndarray | Sequence[np.ndarray]) -> float:
  """Mean over identities of `identity_diversity`.

  `images_per_identity`: an array [I, G, H, W, C] or a sequence of I arrays [G_i, H, W, C], values in [0, 1].
  """
  if isinstance(images_per_identity, np.ndarray) and images_per_identity.ndim != 5:
    raise ValueError(f'expected an array of shape [I, G, H, W, C], got {images_per_identity.shape}')
  if len(images_per_identity) == 0:
    raise ValueError('diversity needs at least one identity')
  return float(np.mean([identity_diversity(x) for x in images_per_identity]))


def diversity_from_labels(images: np.ndarray, labels: np.ndarray) -> float:
  """`diversity` for images [N, H, W, C] in [0, 1] grouped by integer/string identity labels [N]."""
  images = np.asarray(images)
  labels = np.asarray(labels)
  if labels.shape != images.shape[:1]:
    raise ValueError(f'labels must have shape [{images.shape[0]}], got {labels.shape}')
  return diversity([images[labels == u] for u in np.unique(labels)])
