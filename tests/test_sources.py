"""Tests of the random-access sources (idenc_jax/data/sources.py)."""

import numpy as np
import pytest
from PIL import Image

from configs.base import get_config
from idenc_jax.data import prepare as prepare_lib
from idenc_jax.data import sources as sources_lib
from idenc_jax.data import synthetic

R = 8


def _raw_tree(root, counts, seed, splits=True):
  """Identity folders (under train/ when `splits`); returns {identity: uint8 images in file order}."""
  rng = np.random.default_rng(seed)
  out = {}
  for j, n in enumerate(counts):
    ident = f'p{seed}_{j}'
    d = (root / 'train' / ident) if splits else (root / ident)
    d.mkdir(parents=True)
    out[ident] = rng.integers(0, 256, (n, R, R, 3), dtype=np.uint8)
    for i, img in enumerate(out[ident]):
      Image.fromarray(img).save(d / f'{i:02d}.png')
  return out


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('sources')
  a = _raw_tree(tmp / 'a_raw', (4, 6, 5), 0)
  b = _raw_tree(tmp / 'b_raw', (5, 4), 1)
  prepare_lib.prepare(tmp / 'a_raw', tmp / 'a', resolution=R, log=lambda s: None)
  prepare_lib.prepare(tmp / 'b_raw', tmp / 'b', resolution=R, log=lambda s: None)
  prepare_lib.prepare(tmp / 'b_raw', tmp / 'b16', resolution=2 * R, log=lambda s: None)
  flat = _raw_tree(tmp / 'u_raw', (3, 4), 2, splits=False)
  prepare_lib.prepare(tmp / 'u_raw', tmp / 'u', layout='unlabelled', resolution=R, log=lambda s: None)
  return tmp, a, b, flat


def _config(identity_sources, agnostic='synthetic', weights=''):
  c = get_config('tiny')
  c.model.resolution = R
  c.data.identity_sources = identity_sources
  c.data.identity_weights = weights
  c.data.agnostic_source = agnostic
  return c


def test_identity_table_from_arrays():
  images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
  src = sources_lib.IdentitySource.from_arrays(images, np.array([0, 0, 1, 1, 1, 2]))
  np.testing.assert_array_equal(src.offsets, [0, 2, 5, 6])
  np.testing.assert_array_equal(src.counts, [2, 3, 1])
  np.testing.assert_array_equal(src.identity_images(1), images[2:5])
  for bad in ([0, 1, 0, 1, 2, 2], [1, 1, 2, 2, 3, 3], [0, 0, 2, 2, 3, 3]):
    with pytest.raises(ValueError, match='grouped'):
      sources_lib.IdentitySource.from_arrays(images, np.array(bad))
  with pytest.raises(ValueError, match=r'uint8 \[N, R, R, 3\]'):
    sources_lib.ArraySource(images.astype(np.float32))


def test_prepared_identity_source_reads_the_images(prepared):
  tmp, a, _, _ = prepared
  src = sources_lib.IdentitySource.from_prepared(tmp / 'a', 'train')
  assert src.names == sorted(a) and list(src.counts) == [len(a[n]) for n in sorted(a)]
  for i, name in enumerate(sorted(a)):
    np.testing.assert_array_equal(src.identity_images(i), a[name])
  flat = np.concatenate([a[n] for n in sorted(a)])
  idx = np.array([14, 0, 7, 7, 3])
  np.testing.assert_array_equal(src.images.read(idx), flat[idx])
  labels = [lab for lab, _, _ in src.images.read_records(range(len(flat)))]
  assert labels == [0] * 4 + [1] * 6 + [2] * 5
  with pytest.raises(ValueError, match="no split 'test'"):
    sources_lib.PreparedSource(tmp / 'a', 'test')


def test_load_sources_mixes_prepared_datasets(prepared):
  tmp, a, b, flat = prepared
  s = sources_lib.load_sources(_config(f'{tmp / "a"}, {tmp / "b"}', agnostic='same', weights='3,1'))
  np.testing.assert_allclose(s.weights, [0.75, 0.25])
  assert [x.label_offset for x in s.identity] == [0, 3] and s.num_identities == 5
  both = np.concatenate([a[n] for n in sorted(a)] + [b[n] for n in sorted(b)])
  assert len(s.agnostic) == len(both) == 24
  idx = np.array([23, 0, 15, 14, 16, 2])           # across the boundary between the two datasets
  np.testing.assert_array_equal(s.agnostic.read(idx), both[idx])
  s = sources_lib.load_sources(_config(str(tmp / 'a'), agnostic=str(tmp / 'u')))
  np.testing.assert_allclose(s.weights, [1.0])
  assert len(s.agnostic) == 7
  unl = np.concatenate([flat[n] for n in sorted(flat)])
  np.testing.assert_array_equal(s.agnostic.read(np.arange(7)), unl)


def test_load_sources_errors(prepared):
  tmp = prepared[0]
  with pytest.raises(ValueError, match='prepared at 16px but config.model.resolution is 8'):
    sources_lib.load_sources(_config(str(tmp / 'b16')))
  with pytest.raises(ValueError, match='prepared at 16px'):
    sources_lib.load_sources(_config(str(tmp / 'a'), agnostic=str(tmp / 'b16')))
  with pytest.raises(ValueError, match='2 weights for 1 identity sources'):
    sources_lib.load_sources(_config(str(tmp / 'a'), agnostic='same', weights='1,2'))
  with pytest.raises(ValueError, match='non-negative'):
    sources_lib.load_sources(_config(f'{tmp / "a"},{tmp / "b"}', agnostic='same', weights='1,-1'))
  with pytest.raises(ValueError, match='not comma-separated numbers'):
    sources_lib.load_sources(_config(str(tmp / 'a'), agnostic='same', weights='one'))
  with pytest.raises(ValueError, match='no identity labels'):
    sources_lib.load_sources(_config(str(tmp / 'u'), agnostic='same'))
  with pytest.raises(FileNotFoundError, match='not a complete prepared dataset'):
    sources_lib.load_sources(_config(str(tmp / 'missing'), agnostic='same'))
  with pytest.raises(ValueError, match='identity_sources is empty'):
    sources_lib.load_sources(_config(' ', agnostic='same'))


def test_synthetic_sources():
  c = get_config('tiny')
  s = sources_lib.load_sources(c, 'train')
  d = c.data
  assert s.num_identities == d.synthetic_train_identities and s.resolution == c.model.resolution
  images, labels = synthetic.render_identities(d.synthetic_train_identities, d.synthetic_images_per_identity,
                                               c.model.resolution, seed=c.seed, split='train')
  np.testing.assert_array_equal(s.identity[0].identity_images(3), images[labels == 3])
  assert len(s.agnostic) == d.synthetic_agnostic_images
  np.testing.assert_array_equal(s.agnostic.read([5]),
                                synthetic.render_agnostic(d.synthetic_agnostic_images, c.model.resolution,
                                                          seed=c.seed)[5:6])
  test = sources_lib.load_sources(c, 'test')
  assert test.num_identities == d.synthetic_test_identities and test.agnostic is None
