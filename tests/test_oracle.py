"""Tests of the identity oracle of the synthetic identities (idenc_jax/evaluate/metrics/oracle.py)."""

import numpy as np
import pytest

from idenc_jax.data import synthetic as S
from idenc_jax.data.synthetic import factors
from idenc_jax.evaluate.metrics import oracle as O

NUM_TEST_IDS = 48


# ---------------------------------------------------------------------------------------------------------
# Oracle.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module', params=[32, 64])
def oracle_setup(request):
  res = request.param
  gallery, gallery_labels = S.render_identities(NUM_TEST_IDS, 4, res, seed=0, split='test')
  oracle = O.IdentityOracle(gallery, gallery_labels)
  # Fresh images: indices never in the gallery.
  queries, labels = S.render_identities(NUM_TEST_IDS, 5, res, seed=0, split='test', first_image=100)
  return res, oracle, queries, labels


def test_oracle_recognises_fresh_images(oracle_setup):
  res, oracle, queries, labels = oracle_setup
  ev = oracle.evaluate(queries, labels)
  assert ev['accuracy'] >= 0.95, (res, ev)
  assert ev['chance'] == pytest.approx(1 / NUM_TEST_IDS)
  assert ev['num_images'] == len(labels) and ev['num_identities'] == NUM_TEST_IDS
  # Nuisance-only changes keep the identity: distances to the own identity are well below the
  # distance to the nearest other identity.
  d = oracle.all_distances(queries)
  own = d[np.arange(len(d)), labels]
  d[np.arange(len(d)), labels] = np.inf
  other = d.min(1)
  assert np.median(own) < 0.75 * np.median(other), (np.median(own), np.median(other))
  assert ev['mean_distance'] == pytest.approx(own.mean(), rel=1e-5)
  assert ev['mean_other_distance'] == pytest.approx(other.mean(), rel=1e-5)
  # The accuracy agrees with a direct nearest-centroid computation from the embeddings.
  e = oracle.embed(queries)
  nearest = np.argmin(((e[:, None, :] - oracle.centroids[None]) ** 2).sum(-1), 1)
  assert ev['accuracy'] == pytest.approx((oracle.identities[nearest] == labels).mean())


def test_oracle_tells_identities_apart(oracle_setup):
  res, oracle, queries, labels = oracle_setup
  true = oracle.evaluate(queries, labels)
  # Images of identity A labelled as identity B (a derangement of the identities).
  wrong = (labels + 1 + np.random.default_rng(0).integers(0, NUM_TEST_IDS - 1, 1)[0]) % NUM_TEST_IDS
  assert (wrong != labels).all()
  ev = oracle.evaluate(queries, wrong)
  assert ev['accuracy'] <= 0.02
  assert ev['mean_distance'] > 1.5 * true['mean_distance']
  # Shuffled labels: accuracy near chance.
  shuffled = np.random.default_rng(1).permutation(labels)
  assert oracle.evaluate(queries, shuffled)['accuracy'] < 4 * true['chance'] + 0.03
  # Per image: the labelled distance of the true identity is below that of a wrong one.
  assert (oracle.distance(queries, labels) < oracle.distance(queries, wrong)).mean() > 0.97


def test_oracle_robust_to_generator_like_degradation(oracle_setup):
  """Blur, colour cast and noise (like samples of a small diffusion model), float input, mirrored
  images and another resolution than the gallery's."""
  res, oracle, queries, labels = oracle_setup
  rng = np.random.default_rng(3)
  x = queries.astype(np.float32)
  blurred = np.clip(0.5 * x + 0.5 * O._box3(x) * rng.uniform(0.95, 1.05, (len(x), 1, 1, 3))
                    + rng.normal(0, 6, x.shape), 0, 255)
  assert oracle.evaluate(blurred, labels)['accuracy'] >= 0.9
  assert oracle.evaluate(queries[:, :, ::-1], labels)['accuracy'] >= 0.9
  other_res, _ = S.render_identities(NUM_TEST_IDS, 5, 48, seed=0, split='test', first_image=100)
  assert oracle.evaluate(other_res, labels)['accuracy'] >= 0.9


def test_head_frame_tracks_true_head_position():
  """The pixel-estimated head centre follows the rendered head's shift (from the generating nuisance
  factors, read here only to check the estimate) within each identity."""
  k, m = 40, 6
  ident, image = np.repeat(np.arange(k), m), np.tile(np.arange(m), k)
  x = S.render_images(ident, image, 32, seed=0, split='test')
  f = factors._identity_arrays(0, factors._SPLIT_CODES['test'], ident)
  n = factors._image_arrays(0, factors._SPLIT_CODES['test'], ident, image, (f['skin'], f['hair']))
  frame = O.head_frame(x)
  centre = lambda a: (a.reshape(k, m) - a.reshape(k, m).mean(1, keepdims=True)).ravel()
  for est, true in ((frame['cx'], (n['dx'] + 1) * 16), (frame['cy'], (n['dy'] + 1) * 16)):
    assert np.corrcoef(centre(est), centre(true))[0, 1] > 0.8
  assert np.corrcoef(centre(frame['radius']), centre(n['scale']))[0, 1] > 0.6


def test_colour_histogram_matches_loop():
  rng = np.random.default_rng(0)
  imgs = rng.uniform(0, 1, (2, 5, 6, 3)).astype(np.float32)
  mask = rng.uniform(0, 1, (2, 5, 6)).astype(np.float32)
  got = O._colour_histogram(imgs, mask)
  b = O._HIST_BINS
  centres = np.linspace(0, 1, b)
  for n in range(2):
    ref = np.zeros((b, b, b))
    for i in range(5):
      for j in range(6):
        w = [np.maximum(0, 1 - np.abs(imgs[n, i, j, c] - centres) * (b - 1)) for c in range(3)]
        ref += mask[n, i, j] * np.einsum('a,b,c->abc', *w)
    np.testing.assert_allclose(got[n], np.sqrt(ref.ravel() / ref.sum()), atol=1e-5)


def test_resample_to_work_resolution():
  # Downsampling by an integer factor with the triangle filter of that width, against a direct formula.
  x = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
  got = O._to_work(x)
  w = np.array([0.25, 0.75, 0.75, 0.25])  # source pixels 2o-1 .. 2o+2 at distances 1.5, 0.5, 0.5, 1.5
  p = np.pad(x[0] / 255, ((1, 1), (1, 1), (0, 0)), mode='edge')
  ref = np.zeros((32, 32, 3))
  for o in range(32):
    for q in range(32):
      block = p[2 * o:2 * o + 4, 2 * q:2 * q + 4]
      ref[o, q] = np.einsum('i,j,ijc->c', w, w, block) / 4
  # Edge outputs renormalise the missing tap; compare the interior.
  np.testing.assert_allclose(got[0, 1:-1, 1:-1], ref[1:-1, 1:-1], atol=1e-5)
  np.testing.assert_allclose(O._to_work(np.zeros((2, 32, 32, 3), np.uint8) + 255), 1.0)


def test_oracle_bad_arguments(oracle_setup):
  _, oracle, queries, labels = oracle_setup
  g, gl = S.render_identities(3, 2, 16, seed=0, split='test')
  with pytest.raises(ValueError, match='two identities'):
    O.IdentityOracle(g[:2], gl[:2])
  with pytest.raises(ValueError, match='gallery_labels'):
    O.IdentityOracle(g, gl[:-1])
  with pytest.raises(ValueError, match='calibration'):
    O.IdentityOracle(g[::2], gl[::2], calibration_identities=0)  # one image per identity
  with pytest.raises(ValueError, match='not in the gallery'):
    oracle.evaluate(queries[:2], [0, NUM_TEST_IDS + 3])
  with pytest.raises(ValueError, match='one entry per image'):
    oracle.distance(queries[:4], labels[:3])
  with pytest.raises(ValueError, match=r'\[0, 255\]'):
    oracle.embed(queries[:2].astype(np.float32) / 127.5 - 2)
  with pytest.raises(ValueError, match='RGB'):
    oracle.embed(queries[:2, ..., :1])




def test_top5_accuracy_by_hand_and_against_a_sort(oracle_setup, monkeypatch):
  _, oracle, queries, labels = oracle_setup
  # On heavily degraded images (top-1 well below 1): top-5 = own identity among the 5 nearest, by argsort.
  rng = np.random.default_rng(7)
  noisy = np.clip(queries.astype(np.float32) + rng.normal(0, 60, queries.shape), 0, 255)
  ev = oracle.evaluate(noisy, labels)
  nearest5 = oracle.identities[np.argsort(oracle.all_distances(noisy), axis=1)[:, :5]]
  want = (nearest5 == labels[:, None]).any(1).mean()
  assert ev['accuracy'] < want < 1.0, (ev['accuracy'], want)
  assert ev['top5_accuracy'] == pytest.approx(want)
  # Hand-made distances to 7 identities: the own identity ranks 0th, 4th (top-5) and 5th (not top-5).
  d = np.array([[0.1, 1, 2, 3, 4, 5, 6], [5, 1, 2, 3, 4, 0.5, 6], [6, 1, 2, 3, 4, 5, 0.2]], float) + 1.0
  d[1, 0], d[2, 6] = 4.5, 6.5           # image 1's identity 0: 4 nearer (rank 4); image 2's identity 6: 5 nearer
  small = O.IdentityOracle.__new__(O.IdentityOracle)
  small.identities = np.arange(7)
  monkeypatch.setattr(small, 'all_distances', lambda images: d)
  ev = small.evaluate(np.zeros((3, 32, 32, 3), np.uint8), [0, 0, 6])
  assert ev['accuracy'] == pytest.approx(1 / 3) and ev['top5_accuracy'] == pytest.approx(2 / 3)


def test_whitening_gives_unit_within_identity_covariance(oracle_setup):
  """As the docstring says: the pooled within-identity covariance (the gallery's own spread and the
  calibration identities', averaged, shrunk towards a multiple of the identity), recomputed here from the raw
  features, becomes I / D in the embedding."""
  res, oracle, _, _ = oracle_setup
  gallery, gallery_labels = S.render_identities(NUM_TEST_IDS, 4, res, seed=0, split='test')
  feats = O.identity_features(gallery).astype(np.float64)
  means = np.stack([feats[gallery_labels == k].mean(0) for k in oracle.identities])
  resid = feats - means[np.searchsorted(oracle.identities, gallery_labels)]
  within = resid.T @ resid / (len(feats) - NUM_TEST_IDS)
  cal = O._calibration_residuals(128, 4, int(np.clip(res, factors.MIN_RESOLUTION, 64))).astype(np.float64)
  cov = (within + cal.T @ cal / (len(cal) - 128)) / 2
  dim = len(cov)
  cov = 0.98 * cov + 0.02 * np.trace(cov) / dim * np.eye(dim)
  w = oracle._whiten.astype(np.float64)
  np.testing.assert_allclose(w.T @ cov @ w, np.eye(dim) / dim, atol=2e-4 / dim)
  # The centroids are the identities' mean features, embedded.
  np.testing.assert_allclose(oracle.centroids, means @ w, rtol=1e-4, atol=1e-5)
