"""Tests for idenc_jax.evaluate.diversity against hand-computed values."""

import numpy as np
import pytest

from idenc_jax.evaluate.metrics import diversity


def _constant(values, h=2, w=3, c=3):
  return np.stack([np.full((h, w, c), v) for v in values])


def test_hand_computed():
  # Identity A: image means 0.2, 0.4 -> std 0.1. Identity B: 0.5, 0.5 -> std 0. Average: 0.05.
  a, b = _constant([0.2, 0.4]), _constant([0.5, 0.5])
  assert diversity.identity_diversity(a) == pytest.approx(0.1, abs=1e-12)
  assert diversity.diversity(np.stack([a, b])) == pytest.approx(0.05, abs=1e-12)
  # Non-constant image: the mean runs over pixels and channels. [[0, 1]] has mean 0.5; a zero image 0.
  half = np.array([[[0.0], [1.0]]])
  assert diversity.identity_diversity(np.stack([half, np.zeros_like(half)])) == pytest.approx(0.25, abs=1e-12)
  # Means 0.1, 0.2, 0.6: mean 0.3, deviations -0.2, -0.1, 0.3 -> sqrt(0.14 / 3).
  c = _constant([0.1, 0.2, 0.6])
  assert diversity.identity_diversity(c) == pytest.approx(np.sqrt(0.14 / 3), abs=1e-12)
  # Identities with different numbers of images, and grouped by labels in any order.
  assert diversity.diversity([a, c]) == pytest.approx((0.1 + np.sqrt(0.14 / 3)) / 2, abs=1e-12)
  images = np.concatenate([c[:1], a[:1], c[1:], a[1:]])
  labels = np.array(['c', 'a', 'c', 'c', 'a'])
  assert diversity.diversity_from_labels(images, labels) == pytest.approx((0.1 + np.sqrt(0.14 / 3)) / 2, abs=1e-12)


def test_bad_input():
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    diversity.identity_diversity(_constant([0.0, 255.0]))
  with pytest.raises(ValueError, match='at least 2'):
    diversity.identity_diversity(_constant([0.3]))
  with pytest.raises(ValueError, match=r'\[I, G, H, W, C\]'):
    diversity.diversity(_constant([0.1, 0.2]))
  with pytest.raises(ValueError, match='at least one identity'):
    diversity.diversity([])
  with pytest.raises(ValueError, match='labels'):
    diversity.diversity_from_labels(_constant([0.1, 0.2]), np.zeros(3))
