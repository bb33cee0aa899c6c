"""Frechet distance between Gaussians fitted to feature sets (FID and its face-descriptor variant).

  d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric positive
semi-definite matrix sqrt(S1) S2 sqrt(S1), which has the same eigenvalues as S1 S2. Both square roots come
from `numpy.linalg.eigh` in float64 with tiny negative eigenvalues (round-off) clipped to zero, so the result is
real and finite even for singular covariances (fewer samples than feature dimensions), where the usual
`scipy.linalg.sqrtm(S1 @ S2)` turns complex or needs an epsilon added to the diagonal.
"""

from __future__ import annotations

import numpy as np


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1:
    raise ValueError(f'{name}: mean must be a vector, got shape {mu.shape}')
  if sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f'{name}: covariance must have shape {(mu.shape[0], mu.shape[0])}, got {sigma.shape}')
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f'{name}: statistics contain NaN or inf')
  return mu, 0.5 * (sigma + sigma.T)  # exact symmetry for eigh


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix; round-off negative eigenvalues become 0."""
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((sigma1 sigma2)^(1/2)) for symmetric PSD matrices."""
  s1 = _psd_sqrt(sigma1)
  m = s1 @ sigma2 @ s1
  w = np.linalg.eigvalsh(0.5 * (m + m.T))
  return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
  mu1, sigma1 = _check_stats(mu1, sigma1, 'first')
  mu2, sigma2 = _check_stats(mu2, sigma2, 'second')
  if mu1.shape != mu2.shape:
    raise ValueError(f'feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}')
  diff = mu1 - mu2
  d = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
  return float(max(d, 0.0))  # a true distance is >= 0; round-off may give -1e-12


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and unbiased covariance (ddof=1, as in pytorch-fid) of features [N, D], in float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2:
    raise ValueError(f'features must have shape [N, D], got {f.shape}')
  if f.shape[0] < 2:
    raise ValueError(f'need at least 2 feature vectors for a covariance, got {f.shape[0]}')
  return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to two feature sets [N1, D] and [N2, D]."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
