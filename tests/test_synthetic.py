"""Tests of the synthetic identities dataset and its pixel-based identity oracle."""

import numpy as np
import pytest
from PIL import Image

from idenc_jax.data import synthetic as S

NUM_TEST_IDS = 48


# ---------------------------------------------------------------------------------------------------------
# Rendering: shapes, determinism, independence of what else is rendered.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('resolution', [16, 32, 128])
def test_shapes_dtypes_ranges(resolution):
  images, labels = S.render_identities(5, 3, resolution, seed=1)
  assert images.shape == (15, resolution, resolution, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4])
  # Not blank: the full range is used and every image has structure.
  assert images.min() < 60 and images.max() > 180
  assert (images.reshape(15, -1).std(1) > 10).all()
  agn = S.render_agnostic(4, resolution, seed=1)
  assert agn.shape == (4, resolution, resolution, 3) and agn.dtype == np.uint8


def test_deterministic_and_seed_dependent():
  a, _ = S.render_identities(4, 3, 32, seed=7, split='test')
  b, _ = S.render_identities(4, 3, 32, seed=7, split='test')
  c, _ = S.render_identities(4, 3, 32, seed=8, split='test')
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c).mean() > 10
  np.testing.assert_array_equal(S.render_agnostic(5, 32, seed=3), S.render_agnostic(5, 32, seed=3))


def test_independent_of_count_and_batching():
  """Image j of identity i is the same pixels whatever else is rendered, across chunk boundaries."""
  small, small_labels = S.render_identities(3, 2, 128, seed=5, split='test')
  big, big_labels = S.render_identities(20, 4, 128, seed=5, split='test')  # several render chunks
  keep = np.isin(np.tile(np.arange(4), 20), [0, 1]) & (big_labels < 3)
  np.testing.assert_array_equal(small, big[keep])
  np.testing.assert_array_equal(small_labels, big_labels[keep])
  # Any (identity, image) pair alone, and later image indices via first_image.
  one = S.render_images([17], [3], 128, seed=5, split='test')
  np.testing.assert_array_equal(one[0], big[17 * 4 + 3])
  later, _ = S.render_identities(20, 2, 128, seed=5, split='test', first_image=2)
  np.testing.assert_array_equal(later, big[np.tile(np.arange(4), 20) >= 2])
  # Agnostic images: a longer list starts with the shorter one.
  np.testing.assert_array_equal(S.render_agnostic(3, 32, seed=2), S.render_agnostic(300, 32, seed=2)[:3])


def test_windowed_rasteriser_matches_whole_canvas(monkeypatch):
  """Each shape is drawn only inside its pixel window; drawing every shape over the whole canvas (a
  second evaluation of the same scene) must give the same pixels."""
  windowed = [S.render_agnostic(300, 16, seed=4), S.render_agnostic(20, 96, seed=4)]
  monkeypatch.setattr(S, '_WINDOW_PAD', 10 ** 6)
  whole = [S.render_agnostic(300, 16, seed=4), S.render_agnostic(20, 96, seed=4)]
  for w, f in zip(windowed, whole):
    np.testing.assert_array_equal(w, f)


def test_uniforms_are_uniform_and_independent():
  u = S._uniforms(3, 1, np.arange(4000), np.zeros(4000, int), 8)
  assert u.shape == (4000, 8) and u.min() >= 0 and u.max() < 1
  counts = np.histogram(u.ravel(), bins=10, range=(0, 1))[0]
  expected = u.size / 10
  assert ((counts - expected) ** 2 / expected).sum() < 30  # chi-square, 9 dof: p ~ 4e-4
  assert np.abs(np.corrcoef(u.T) - np.eye(8)).max() < 0.06
  # Neighbouring identities/slots/seeds are unrelated.
  v = S._uniforms(4, 1, np.arange(4000), np.zeros(4000, int), 8)
  assert abs(np.corrcoef(u[:, 0], v[:, 0])[0, 1]) < 0.06
  assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.06


# ---------------------------------------------------------------------------------------------------------
# Factors.
# ---------------------------------------------------------------------------------------------------------


def _factor_matrix(factors):
  """Numeric factor vectors (discrete factors as indices) for comparisons."""
  rows = []
  for f in factors:
    row = []
    for key, val in sorted(f.items()):
      if key == 'identity':
        continue
      if isinstance(val, str):
        row.append(float({**{n: i for i, n in enumerate(S.HAIR_STYLES)}, **{n: i for i, n in enumerate(
            S.BEARDS)}, **{n: i for i, n in enumerate(S.GLASSES)}, **{n: i for i, n in enumerate(
                S.HATS)}}[val]) * 10)
      elif isinstance(val, tuple):
        row.extend(val)
      else:
        row.append(float(val))
    rows.append(row)
  return np.array(rows)


def test_factors_valid_and_splits_disjoint():
  train = S.identity_factors(512, seed=0, split='train')
  test = S.identity_factors(64, seed=0, split='test')
  assert len(train) == 512 and train[5]['identity'] == 5
  for f in train[:50]:
    assert f['hair_style'] in S.HAIR_STYLES and f['hat'] in S.HATS and f['glasses'] in S.GLASSES
    assert all(0 <= c <= 1 for c in f['skin'] + f['hair'])
  # Same count-independence as the pixels.
  assert S.identity_factors(3, seed=0, split='train') == train[:3]
  # Every discrete value occurs among 512 identities (the factors are rich).
  for key, names in (('hair_style', S.HAIR_STYLES), ('beard', S.BEARDS), ('glasses', S.GLASSES),
                     ('hat', S.HATS)):
    assert {f[key] for f in train} == set(names)
  a, b = _factor_matrix(train), _factor_matrix(test)
  cross = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
  assert cross.min() > 0.1  # no test identity repeats a train identity
  within = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1)) + np.eye(len(a)) * 1e9
  assert within.min() > 0.1  # 512 train identities are mutually distinct
  # Different seeds give different train identities.
  other_seed = _factor_matrix(S.identity_factors(8, seed=1, split='train'))
  assert np.sqrt(((other_seed - a[:8]) ** 2).sum(-1)).min() > 0.1


def test_train_and_test_images_differ():
  tr, _ = S.render_identities(8, 1, 32, seed=0, split='train')
  te, _ = S.render_identities(8, 1, 32, seed=0, split='test')
  assert (np.abs(tr.astype(int) - te).reshape(8, -1).mean(1) > 5).all()


# ---------------------------------------------------------------------------------------------------------
# Oracle.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module', params=[32, 64])
def oracle_setup(request):
  res = request.param
  gallery, gallery_labels = S.render_identities(NUM_TEST_IDS, 4, res, seed=0, split='test')
  oracle = S.IdentityOracle(gallery, gallery_labels)
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
  blurred = np.clip(0.5 * x + 0.5 * S._box3(x) * rng.uniform(0.95, 1.05, (len(x), 1, 1, 3))
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
  f = S._identity_arrays(0, S._SPLIT_CODES['test'], ident)
  n = S._image_arrays(0, S._SPLIT_CODES['test'], ident, image, (f['skin'], f['hair']))
  frame = S.head_frame(x)
  centre = lambda a: (a.reshape(k, m) - a.reshape(k, m).mean(1, keepdims=True)).ravel()
  for est, true in ((frame['cx'], (n['dx'] + 1) * 16), (frame['cy'], (n['dy'] + 1) * 16)):
    assert np.corrcoef(centre(est), centre(true))[0, 1] > 0.8
  assert np.corrcoef(centre(frame['radius']), centre(n['scale']))[0, 1] > 0.6


def test_colour_histogram_matches_loop():
  rng = np.random.default_rng(0)
  imgs = rng.uniform(0, 1, (2, 5, 6, 3)).astype(np.float32)
  mask = rng.uniform(0, 1, (2, 5, 6)).astype(np.float32)
  got = S._colour_histogram(imgs, mask)
  b = S._HIST_BINS
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
  got = S._to_work(x)
  w = np.array([0.25, 0.75, 0.75, 0.25])  # source pixels 2o-1 .. 2o+2 at distances 1.5, 0.5, 0.5, 1.5
  p = np.pad(x[0] / 255, ((1, 1), (1, 1), (0, 0)), mode='edge')
  ref = np.zeros((32, 32, 3))
  for o in range(32):
    for q in range(32):
      block = p[2 * o:2 * o + 4, 2 * q:2 * q + 4]
      ref[o, q] = np.einsum('i,j,ijc->c', w, w, block) / 4
  # Edge outputs renormalise the missing tap; compare the interior.
  np.testing.assert_allclose(got[0, 1:-1, 1:-1], ref[1:-1, 1:-1], atol=1e-5)
  np.testing.assert_allclose(S._to_work(np.zeros((2, 32, 32, 3), np.uint8) + 255), 1.0)


# ---------------------------------------------------------------------------------------------------------
# Errors and the CLI.
# ---------------------------------------------------------------------------------------------------------


def test_bad_arguments():
  with pytest.raises(ValueError, match='resolution'):
    S.render_identities(2, 2, 15, seed=0)
  with pytest.raises(ValueError, match='resolution'):
    S.render_agnostic(2, 8, seed=0)
  with pytest.raises(ValueError, match='num_identities'):
    S.render_identities(0, 2, 32, seed=0)
  with pytest.raises(ValueError, match='images_per_identity'):
    S.render_identities(2, 0, 32, seed=0)
  with pytest.raises(ValueError, match='num_images'):
    S.render_agnostic(0, 32, seed=0)
  with pytest.raises(ValueError, match='split'):
    S.render_identities(2, 2, 32, seed=0, split='val')
  with pytest.raises(ValueError, match='split'):
    S.identity_factors(2, seed=0, split='validation')
  with pytest.raises(ValueError, match='seed'):
    S.render_identities(2, 2, 32, seed=-1)
  with pytest.raises(ValueError, match='seed'):
    S.identity_factors(2, seed=1.5)
  with pytest.raises(ValueError, match='same length'):
    S.render_images([0, 1], [0], 32, seed=0)


def test_oracle_bad_arguments(oracle_setup):
  _, oracle, queries, labels = oracle_setup
  g, gl = S.render_identities(3, 2, 16, seed=0, split='test')
  with pytest.raises(ValueError, match='two identities'):
    S.IdentityOracle(g[:2], gl[:2])
  with pytest.raises(ValueError, match='gallery_labels'):
    S.IdentityOracle(g, gl[:-1])
  with pytest.raises(ValueError, match='calibration'):
    S.IdentityOracle(g[::2], gl[::2], calibration_identities=0)  # one image per identity
  with pytest.raises(ValueError, match='not in the gallery'):
    oracle.evaluate(queries[:2], [0, NUM_TEST_IDS + 3])
  with pytest.raises(ValueError, match='one entry per image'):
    oracle.distance(queries[:4], labels[:3])
  with pytest.raises(ValueError, match=r'\[0, 255\]'):
    oracle.embed(queries[:2].astype(np.float32) / 127.5 - 2)
  with pytest.raises(ValueError, match='RGB'):
    oracle.embed(queries[:2, ..., :1])


def test_cli_writes_grid(tmp_path):
  out = tmp_path / 'grid.png'
  S.main([f'--out={out}', '--resolution=32', '--identities=3', '--images=4'])
  img = np.asarray(Image.open(out))
  assert img.shape == (3 * 34 + 2, 4 * 34 + 2, 3)
  first, _ = S.render_identities(1, 1, 32, seed=0)
  np.testing.assert_array_equal(img[2:34, 2:34], first[0])
