"""Tests for idenc_jax.evaluate.frechet against closed forms and the scipy.linalg.sqrtm formula."""

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import ortho_group

from idenc_jax.evaluate.metrics import frechet


def _random_spd(rng, d, cond=100.0):
  q = ortho_group.rvs(d, random_state=rng)
  w = np.exp(rng.uniform(0, np.log(cond), d))
  return (q * w) @ q.T


def _scipy_fd(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def test_matches_scipy_sqrtm_formula():
  rng = np.random.default_rng(0)
  for d in (1, 3, 16, 64):
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    np.testing.assert_allclose(frechet.frechet_distance(mu1, s1, mu2, s2), _scipy_fd(mu1, s1, mu2, s2),
                               rtol=1e-9, atol=1e-9)


def test_closed_form_diagonal_and_commuting():
  rng = np.random.default_rng(1)
  d = 12
  a, b = rng.uniform(0.1, 5, d), rng.uniform(0.1, 5, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected, rtol=1e-12)
  # Commuting covariances share eigenvectors: the distance only sees the eigenvalues.
  q = ortho_group.rvs(d, random_state=rng)
  np.testing.assert_allclose(frechet.frechet_distance(q @ mu1, (q * a) @ q.T, q @ mu2, (q * b) @ q.T), expected,
                             rtol=1e-10)
  # Scalar case by hand: N(0, 4) vs N(3, 1) -> 9 + (2 - 1)^2 = 10.
  assert frechet.frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(10.0, abs=1e-12)


def test_singular_covariances():
  # Rank-deficient covariances (N < D) stay real and finite; commuting closed form with zero eigenvalues.
  rng = np.random.default_rng(2)
  d = 10
  a = np.concatenate([rng.uniform(0.5, 2, 4), np.zeros(6)])
  b = np.concatenate([rng.uniform(0.5, 2, 7), np.zeros(3)])
  q = ortho_group.rvs(d, random_state=rng)
  mu = rng.normal(size=d)
  expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  # sqrt of a round-off eigenvalue (1e-16) is 1e-8: that bounds the accuracy near singularity.
  np.testing.assert_allclose(frechet.frechet_distance(mu, (q * a) @ q.T, mu, (q * b) @ q.T), expected,
                             rtol=1e-6)
  f = rng.normal(size=(5, 32))  # 5 samples in 32 dims
  assert frechet.frechet_distance_from_features(f, f) == pytest.approx(0.0, abs=1e-9)
  g = rng.normal(size=(6, 32)) + 1.0
  value = frechet.frechet_distance_from_features(f, g)
  assert np.isfinite(value) and value > 0


def test_from_features_uses_unbiased_covariance():
  rng = np.random.default_rng(3)
  f1 = rng.normal(size=(200, 8))
  f2 = rng.normal(size=(150, 8)) @ rng.normal(size=(8, 8)) + 0.5
  expected = _scipy_fd(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
  np.testing.assert_allclose(frechet.frechet_distance_from_features(f1, f2), expected, rtol=1e-9)
  # Symmetric in its arguments.
  np.testing.assert_allclose(frechet.frechet_distance_from_features(f2, f1), expected, rtol=1e-9)
  # float32 inputs are promoted to float64 first.
  np.testing.assert_allclose(frechet.frechet_distance_from_features(f1.astype(np.float32), f2.astype(np.float32)),
                             frechet.frechet_distance_from_features(f1.astype(np.float32).astype(np.float64),
                                                                    f2.astype(np.float32).astype(np.float64)),
                             rtol=1e-12)


def test_bad_input():
  with pytest.raises(ValueError, match='at least 2'):
    frechet.frechet_distance_from_features(np.zeros((1, 4)), np.zeros((3, 4)))
  with pytest.raises(ValueError, match=r'\[N, D\]'):
    frechet.frechet_distance_from_features(np.zeros(4), np.zeros((3, 4)))
  with pytest.raises(ValueError, match='dimensions differ'):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match='covariance'):
    frechet.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match='NaN'):
    frechet.frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))
