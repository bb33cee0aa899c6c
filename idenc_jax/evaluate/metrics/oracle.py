"""The identity oracle of the synthetic identities: which identity an image shows, from its pixels alone.

The yardstick of identity preservation on synthetic data, so it never reads the generating factors: it
finds the head from its contrast with the background, samples colours on a grid in that head-centred
frame, and classifies by nearest identity centroid under a metric whitened against nuisance variation.
Its calibration identities come from the renderer's own calibration stream, apart from every train/test
split.
"""

from __future__ import annotations

import numpy as np

from idenc_jax.data.synthetic.factors import _SPLIT_CODES, MIN_RESOLUTION
from idenc_jax.data.synthetic.render import _render

_WORK = 32           # every image is resampled to this size before features are taken
_GRID = 12           # canonical sampling grid (G x G points) over the head
_GRID_EXTENT = 1.6   # half-width of the grid in units of the head radius estimate
_HIST_BINS = 4       # per channel, for the foreground colour histogram
# Foreground mask: a soft ramp of width _MASK_W starting _MASK_LO + _MASK_K * (background texture) away
# from the fitted background colour.
_MASK_LO, _MASK_K, _MASK_W = 0.04, 2.0, 0.1


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] linear resampling with a triangle filter widened when downsampling (antialiased)."""
  scale = n_in / n_out
  support = max(scale, 1.0)
  centres = (np.arange(n_out) + 0.5) * scale - 0.5
  taps = np.arange(n_in)[None, :]
  wts = np.maximum(0.0, 1 - np.abs(taps - centres[:, None]) / support)
  return (wts / wts.sum(1, keepdims=True)).astype(np.float32)


def _to_work(images: np.ndarray) -> np.ndarray:
  """float32 [N, WORK, WORK, 3] in [0, 1] from uint8 or float [0, 255] NHWC images of any size."""
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'images must be [N, H, W, 3] RGB, got shape {x.shape}.')
  if x.shape[0] == 0:
    raise ValueError('images must not be empty.')
  if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
    raise ValueError(f'images must be integer or float, got {x.dtype}.')
  if np.issubdtype(x.dtype, np.floating):
    if not np.all(np.isfinite(x)):
      raise ValueError('images contain non-finite values.')
    if x.min() < -1.0 or x.max() > 256.0:
      raise ValueError(f'float images must be in [0, 255], got range [{x.min():.3g}, {x.max():.3g}].')
  x = x.astype(np.float32) / 255.0
  h, w = x.shape[1:3]
  if (h, w) != (_WORK, _WORK):
    # Separable resampling as two large matrix products: columns, then rows.
    n = len(x)
    x = x.transpose(0, 1, 3, 2).reshape(-1, w) @ _resample_matrix(w, _WORK).T        # [N*H*C, WORK]
    x = x.reshape(n, h, 3 * _WORK).transpose(0, 2, 1).reshape(-1, h) @ _resample_matrix(h, _WORK).T
    x = x.reshape(n, 3, _WORK, _WORK).transpose(0, 3, 2, 1)                           # [N, o, p, C]
  return np.clip(x, 0, 1)


def _box3(x: np.ndarray) -> np.ndarray:
  """3x3 box blur with edge replication on [N, H, W, C]."""
  p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
  h, w = x.shape[1:3]
  return sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _bilinear(img: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
  """Sample img [N, H, W, C] at pixel coordinates xs, ys [N, P] (edge clamped) -> [N, P, C]."""
  n, h, w = img.shape[:3]
  xs = np.clip(xs, 0, w - 1)
  ys = np.clip(ys, 0, h - 1)
  x0 = np.minimum(np.floor(xs).astype(np.int64), w - 2)
  y0 = np.minimum(np.floor(ys).astype(np.int64), h - 2)
  fx, fy = (xs - x0)[..., None], (ys - y0)[..., None]
  b = np.arange(n)[:, None]
  top = img[b, y0, x0] * (1 - fx) + img[b, y0, x0 + 1] * fx
  bot = img[b, y0 + 1, x0] * (1 - fx) + img[b, y0 + 1, x0 + 1] * fx
  return top * (1 - fy) + bot * fy


def head_frame(images: np.ndarray) -> dict[str, np.ndarray]:
  """Where the head is, from pixels alone.

  Fits a planar colour background per image to its border pixels (robustly: three rounds keeping the
  60% best-fitting pixels, since hair and hats may reach the border), marks as foreground the pixels
  that depart from it by more than the background's own texture, and returns the mask's centroid
  (cx, cy) and equivalent-disc radius in work-resolution pixels, with the work-resolution images
  ('images', [N, 32, 32, 3] in [0, 1]), the soft 'mask' and the fitted 'background'.
  """
  x = _to_work(images)
  coords = np.arange(_WORK, dtype=np.float32)
  yy, xx = np.meshgrid(coords, coords, indexing='ij')
  border = np.zeros((_WORK, _WORK), bool)
  border[:2], border[-2:], border[:, :2], border[:, -2:] = True, True, True, True
  full = np.stack([np.ones_like(xx), xx / _WORK - 0.5, yy / _WORK - 0.5], -1)   # [H, W, 3]
  design = full[border]                                                         # [P, 3]
  values = x[:, border]                                                         # [N, P, 3]
  weights = np.ones(values.shape[:2], np.float32)
  for _ in range(3):
    weighted = np.swapaxes(weights[..., None] * design, 1, 2)                 # [N, 3, P]
    a = weighted @ design + 1e-4 * np.eye(3, dtype=np.float32)
    coef = np.linalg.solve(a, weighted @ values)                                # [N, 3, 3 channels]
    resid = np.linalg.norm(values - design @ coef, axis=-1)
    weights = (resid <= np.quantile(resid, 0.6, axis=1, keepdims=True)).astype(np.float32)
  bg = (full.reshape(-1, 3) @ coef).reshape(x.shape)
  diff = np.linalg.norm(x - bg, axis=-1)
  texture = np.sqrt((weights * resid ** 2).sum(1) / weights.sum(1))[:, None, None]
  mask = np.clip((diff - _MASK_LO - _MASK_K * texture) / _MASK_W, 0, 1)
  mass = mask.sum((1, 2)) + 1e-3
  return {
      'images': x, 'mask': mask, 'background': bg,
      'cx': (mask * xx).sum((1, 2)) / mass,
      'cy': (mask * yy).sum((1, 2)) / mass,
      'radius': np.sqrt(mass / np.pi),
  }


def _colour_histogram(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Mask-weighted joint RGB histogram with linear (soft) binning, L1-normalised, square-rooted
  (Hellinger) so frequent colours do not swamp rare ones. [N, bins^3]."""
  n, b = len(images), _HIST_BINS
  centres = np.linspace(0, 1, b, dtype=np.float32)
  # Triangle weights of each pixel's channel value to each bin centre: [N, P, 3, b], summing to 1.
  tri = np.maximum(0, 1 - np.abs(images.reshape(n, -1, 3, 1) - centres) * (b - 1))
  rg = (tri[:, :, 0, :, None] * tri[:, :, 1, None, :]).reshape(n, -1, b * b)
  rg *= mask.reshape(n, -1, 1)
  hist = (np.swapaxes(rg, 1, 2) @ tri[:, :, 2, :]).reshape(n, -1)             # [N, b^3]
  return np.sqrt(hist / (hist.sum(1, keepdims=True) + 1e-6)).astype(np.float32)


def identity_features(images: np.ndarray) -> np.ndarray:
  """Nuisance-tolerant appearance features [N, D] from pixels: the (lightly blurred) colours and the
  foreground mask sampled on a grid in the head-centred, size-normalised frame, the head size, and the
  foreground colour histogram (position invariant)."""
  fr = head_frame(images)
  g = np.linspace(-1, 1, _GRID, dtype=np.float32) * _GRID_EXTENT
  gy, gx = np.meshgrid(g, g, indexing='ij')
  r = fr['radius'][:, None]
  xs = fr['cx'][:, None] + r * gx.reshape(1, -1)
  ys = fr['cy'][:, None] + r * gy.reshape(1, -1)
  # Blur before sampling so each sample summarises its neighbourhood (tolerates residual misalignment).
  colours = _bilinear(_box3(fr['images']), xs, ys)                            # [N, P, 3]
  mask = _bilinear(_box3(fr['mask'][..., None]), xs, ys)[..., 0]              # [N, P]
  # At half resolution (2x2 means): four times cheaper, and colour amounts hardly change.
  pool = lambda z: z.reshape(len(z), _WORK // 2, 2, _WORK // 2, 2, -1).mean((2, 4))
  hist = _colour_histogram(pool(fr['images']), pool(fr['mask'][..., None])[..., 0])
  return np.concatenate([colours.reshape(len(xs), -1), mask, r / _WORK, hist], 1).astype(np.float32)


def _degrade(images: np.ndarray, seed: int) -> np.ndarray:
  """Mild blur, colour cast and noise, like samples of a small generative model (float [0, 255])."""
  rng = np.random.default_rng(seed)
  x = np.asarray(images, np.float32)
  k = rng.uniform(0, 1, (len(x), 1, 1, 1)).astype(np.float32)
  x = x * (1 - k) + _box3(x) * k
  x = x * rng.uniform(0.93, 1.07, (len(x), 1, 1, 3)) + rng.normal(0, 5, (len(x), 1, 1, 3))
  x = x + rng.normal(0, 4, x.shape)
  return np.clip(x, 0, 255).astype(np.float32)


_CALIBRATION_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _calibration_residuals(num_identities: int, per_identity: int, resolution: int) -> np.ndarray:
  """Within-identity feature residuals [N, D] of identities drawn apart from every train/test split,
  every other image mildly degraded so the metric also discounts generator-like blur and colour cast."""
  key = (num_identities, per_identity, resolution)
  if key not in _CALIBRATION_CACHE:
    labels = np.repeat(np.arange(num_identities), per_identity)
    image = np.tile(np.arange(per_identity), num_identities)
    imgs = _render(0, _SPLIT_CODES['calibration'], labels, image, resolution).astype(np.float32)
    odd = image % 2 == 1
    imgs[odd] = _degrade(imgs[odd], seed=resolution)
    feats = identity_features(imgs).reshape(num_identities, per_identity, -1)
    _CALIBRATION_CACHE[key] = (feats - feats.mean(1, keepdims=True)).reshape(len(labels), -1)
  return _CALIBRATION_CACHE[key]


class IdentityOracle:
  """Which synthetic identity an image shows, measured from its pixels (never from factors).

  `identity_features` are whitened by a within-identity covariance, pooled from the gallery's own
  spread (when it has several images per identity) and a fixed calibration set of other identities
  (half of them mildly degraded), shrunk towards a multiple of the identity; an image's distance to an
  identity is the Euclidean distance, in that whitened space scaled by 1/sqrt(D), to the mean of the
  identity's gallery features. Distances are thus of order 1 for the nuisance spread within an identity
  (about 0.7 for fresh images of a gallery identity with 4 gallery images each, 32 to 64 px) and larger
  between identities (about 1.1 to the nearest other identity, 1.6 to a random one). Classification is
  by nearest identity.
  """

  def __init__(self, gallery_images: np.ndarray, gallery_labels: np.ndarray, *,
               calibration_identities: int = 128, calibration_images: int = 4, shrinkage: float = 0.02):
    images = np.asarray(gallery_images)
    labels = np.asarray(gallery_labels)
    if images.ndim != 4:
      raise ValueError(f'gallery_images must be [N, H, W, 3], got shape {images.shape}.')
    if labels.ndim != 1 or len(labels) != len(images):
      raise ValueError(f'gallery_labels must be [N] matching gallery_images, got {labels.shape} for '
                       f'{len(images)} images.')
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'gallery_labels must be integers, got {labels.dtype}.')
    if not 0 < shrinkage < 1:
      raise ValueError(f'shrinkage must be in (0, 1), got {shrinkage}.')
    if calibration_identities and (calibration_identities < 2 or calibration_images < 2):
      raise ValueError('calibration needs at least 2 identities of at least 2 images each.')
    feats = identity_features(images)
    self.identities, inverse = np.unique(labels, return_inverse=True)
    if len(self.identities) < 2:
      raise ValueError('the gallery needs at least two identities.')
    counts = np.bincount(inverse)
    sums = np.zeros((len(self.identities), feats.shape[1]), np.float64)
    np.add.at(sums, inverse, feats)
    centroids = sums / counts[:, None]
    covs = []
    if (counts > 1).any():
      resid = (feats - centroids[inverse]).astype(np.float64)
      covs.append(resid.T @ resid / (len(labels) - len(self.identities)))
    if calibration_identities:
      res = int(np.clip(images.shape[1], MIN_RESOLUTION, 64))
      cal = _calibration_residuals(calibration_identities, calibration_images, res).astype(np.float64)
      covs.append(cal.T @ cal / (len(cal) - calibration_identities))
    if not covs:
      raise ValueError('with one gallery image per identity the metric needs calibration '
                       '(calibration_identities > 0).')
    cov = sum(covs) / len(covs)
    dim = len(cov)
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / dim * np.eye(dim)
    # cov = L L^T, so x @ inv(L)^T has unit covariance within an identity (a Cholesky factor is several
    # times cheaper than an eigendecomposition); / sqrt(D) makes its squared norm about 1.
    chol = np.linalg.cholesky(cov)
    self._whiten = (np.linalg.inv(chol).T / np.sqrt(dim)).astype(np.float32)
    self.centroids = (centroids @ self._whiten).astype(np.float32)
    self.gallery_counts = counts

  def embed(self, images: np.ndarray) -> np.ndarray:
    """Identity features [N, D], whitened: Euclidean distances between them are identity distances."""
    return identity_features(images) @ self._whiten

  def _label_positions(self, labels, n: int) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n:
      raise ValueError(f'labels must have one entry per image ({n}), got {labels.shape[0]}.')
    pos = np.clip(np.searchsorted(self.identities, labels), 0, len(self.identities) - 1)
    bad = self.identities[pos] != labels
    if bad.any():
      raise ValueError(f'labels not in the gallery: {sorted(set(labels[bad].tolist()))[:10]}.')
    return pos

  def all_distances(self, images: np.ndarray) -> np.ndarray:
    """[N, K] distance of each image to each gallery identity (columns ordered as self.identities)."""
    e = self.embed(images)
    c = self.centroids
    d2 = (e * e).sum(1, keepdims=True) - 2 * e @ c.T + (c * c).sum(1)[None]
    return np.sqrt(np.maximum(d2, 0))

  def distance(self, images: np.ndarray, labels) -> np.ndarray:
    """[N] distance of each image to its labelled identity's gallery mean."""
    d = self.all_distances(images)
    return d[np.arange(len(d)), self._label_positions(labels, len(d))]

  def evaluate(self, images: np.ndarray, labels) -> dict[str, float]:
    """accuracy: fraction whose nearest gallery identity is the labelled one; top5_accuracy; chance:
    1 / gallery identities; mean_distance: to the labelled identity; mean_other_distance: to the
    nearest other identity; num_images, num_identities."""
    d = self.all_distances(images)
    rows = np.arange(len(d))
    pos = self._label_positions(labels, len(d))
    own = d[rows, pos]
    rank = (d < own[:, None]).sum(1)
    others = d.copy()
    others[rows, pos] = np.inf
    return {
        'accuracy': float((rank == 0).mean()),
        'top5_accuracy': float((rank < 5).mean()),
        'chance': 1.0 / len(self.identities),
        'mean_distance': float(own.mean()),
        'mean_other_distance': float(others.min(1).mean()),
        'num_images': int(len(d)),
        'num_identities': int(len(self.identities)),
    }
