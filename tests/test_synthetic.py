"""Tests of the synthetic identities dataset (idenc_jax/data/synthetic/)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idenc_jax.data import synthetic as S
from idenc_jax.data.synthetic import canvas, factors

REPO = Path(__file__).resolve().parents[1]


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
  monkeypatch.setattr(canvas, '_WINDOW_PAD', 10 ** 6)
  whole = [S.render_agnostic(300, 16, seed=4), S.render_agnostic(20, 96, seed=4)]
  for w, f in zip(windowed, whole):
    np.testing.assert_array_equal(w, f)


def test_uniforms_are_uniform_and_independent():
  u = factors._uniforms(3, 1, np.arange(4000), np.zeros(4000, int), 8)
  assert u.shape == (4000, 8) and u.min() >= 0 and u.max() < 1
  counts = np.histogram(u.ravel(), bins=10, range=(0, 1))[0]
  expected = u.size / 10
  assert ((counts - expected) ** 2 / expected).sum() < 30  # chi-square, 9 dof: p ~ 4e-4
  assert np.abs(np.corrcoef(u.T) - np.eye(8)).max() < 0.06
  # Neighbouring identities/slots/seeds are unrelated.
  v = factors._uniforms(4, 1, np.arange(4000), np.zeros(4000, int), 8)
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


def test_cli_writes_grid(tmp_path):
  out = tmp_path / 'grid.png'
  cmd = [sys.executable, '-m', 'idenc_jax.data.synthetic', f'--out={out}', '--resolution=32',
         '--identities=3', '--images=4']
  run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  img = np.asarray(Image.open(out))
  assert img.shape == (3 * 34 + 2, 4 * 34 + 2, 3)
  first, _ = S.render_identities(1, 1, 32, seed=0)
  np.testing.assert_array_equal(img[2:34, 2:34], first[0])
