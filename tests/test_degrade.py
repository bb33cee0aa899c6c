"""Tests of the stage-2 degradations (idenc_jax/data/degrade.py) against numpy loops, PIL and closed forms."""

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from configs.base import get_config
from idenc_jax.data import degrade


def _images(n=3, r=16, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, r, r, 3), dtype=np.uint8)


@pytest.mark.parametrize('factor', [2, 4, 8])
def test_downsample_is_block_means(factor):
  x = _images(r=16)
  out = degrade.downsample_area(x, factor)
  xf = x.astype(np.float64) / 127.5 - 1.0
  lr = 16 // factor
  assert out.shape == (3, lr, lr, 3) and out.dtype == np.float32
  ref = np.zeros((3, lr, lr, 3))
  for i in range(lr):
    for j in range(lr):
      ref[:, i, j] = xf[:, i * factor:(i + 1) * factor, j * factor:(j + 1) * factor].mean(axis=(1, 2))
  np.testing.assert_allclose(out, ref, atol=1e-6)


def test_downsample_rejects_indivisible_size():
  with pytest.raises(ValueError, match='sr_factor=3'):
    degrade.downsample_area(_images(r=16), 3)


def test_nearest_sr_condition_keeps_the_low_resolution_pixels():
  x = _images(r=32)
  cond = degrade.sr_condition(x, 4, 'nearest')
  assert cond.shape == (3, 32, 32, 3)
  low = degrade.downsample_area(x, 4)
  # Every 4x4 block of the condition is constant and equals the block mean of the clean image.
  blocks = cond.reshape(3, 8, 4, 8, 4, 3)
  np.testing.assert_array_equal(blocks, np.broadcast_to(low[:, :, None, :, None], blocks.shape))


@pytest.mark.parametrize('size', [5, 16, 32])
def test_bicubic_matches_pil(size):
  x = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  out = degrade.resize_bicubic(x, size)
  for n in range(2):
    for c in range(3):
      ref = np.asarray(Image.fromarray(x[n, :, :, c], mode='F').resize((size, size), Image.Resampling.BICUBIC))
      np.testing.assert_allclose(out[n, :, :, c], ref, atol=1e-5)


def test_bicubic_reproduces_constants_and_clipped_upsample():
  const = np.full((1, 4, 4, 3), 0.25, np.float32)
  np.testing.assert_allclose(degrade.resize_bicubic(const, 16), 0.25, atol=1e-6)
  up = degrade.upsample(np.ones((1, 4, 4, 3), np.float32) * np.array([1, -1, 1], np.float32), 4, 'bicubic')
  assert up.min() >= -1 and up.max() <= 1


@pytest.mark.parametrize('r,fraction', [(32, 0.6), (128, 0.6), (16, 0.5), (17, 0.3)])
def test_mask_area_is_fraction_squared_up_to_rounding(r, fraction):
  side = degrade.mask_side(r, fraction)
  assert abs(side - fraction * r) <= 0.5
  pos = degrade.mask_positions(np.random.default_rng(0), 50, r, side)
  masks = degrade.square_masks(r, side, pos)
  areas = masks.sum(axis=(1, 2))
  np.testing.assert_array_equal(areas, side * side)
  # Area fraction within the rounding of the side: |side/r - f| <= 1/(2r).
  lo, hi = (fraction - 0.5 / r) ** 2, (fraction + 0.5 / r) ** 2
  assert np.all((areas / r**2 >= lo - 1e-12) & (areas / r**2 <= hi + 1e-12))
  for m, (y, x) in zip(masks, pos):   # the hole is exactly the square at its corner
    ref = np.zeros((r, r), bool)
    ref[y:y + side, x:x + side] = True
    np.testing.assert_array_equal(m, ref)


def test_mask_placement_is_uniform():
  r, side, n = 32, 19, 28_000
  pos = degrade.mask_positions(np.random.default_rng(123), n, r, side)
  k = r - side + 1   # 14 valid corners per axis
  assert pos.min() == 0 and pos.max() == k - 1
  # Joint chi-square over the k*k corner cells.
  counts = np.bincount(pos[:, 0] * k + pos[:, 1], minlength=k * k)
  assert stats.chisquare(counts).pvalue > 1e-3
  # Mean and variance of a discrete uniform on {0..k-1}: (k-1)/2 and (k^2-1)/12.
  se_mean = np.sqrt((k * k - 1) / 12 / n)
  assert np.all(np.abs(pos.mean(axis=0) - (k - 1) / 2) < 4 * se_mean)
  np.testing.assert_allclose(pos.var(axis=0), (k * k - 1) / 12, rtol=0.03)
  # Independent axes: correlation near 0.
  assert abs(np.corrcoef(pos[:, 0], pos[:, 1])[0, 1]) < 4 / np.sqrt(n)


def test_inpaint_condition_values():
  x = _images(n=2, r=8)
  pos = np.array([[0, 3], [2, 1]])
  masks = degrade.square_masks(8, 5, pos)
  cond = degrade.inpaint_condition(x, masks)
  assert cond.shape == (2, 8, 8, 4) and cond.dtype == np.float32
  xf = x.astype(np.float32) / 127.5 - 1
  for i in range(2):
    y0, x0 = pos[i]
    inside = np.zeros((8, 8), bool)
    inside[y0:y0 + 5, x0:x0 + 5] = True
    np.testing.assert_array_equal(cond[i, ..., 3], inside.astype(np.float32))
    np.testing.assert_array_equal(cond[i][inside][:, :3], 0.0)
    np.testing.assert_allclose(cond[i][~inside][:, :3], xf[i][~inside], atol=1e-7)


def test_degradation_from_config_and_determinism():
  c = get_config('cpu,inpaint')
  deg = degrade.Degradation.from_config(c)
  assert (deg.task, deg.resolution, deg.side, deg.channels) == ('inpaint', 32, 19, 4)
  x = _images(n=4, r=32)
  p1 = deg.draw(np.random.default_rng([5, 7]), 4)
  p2 = deg.draw(np.random.default_rng([5, 7]), 4)
  np.testing.assert_array_equal(p1, p2)
  np.testing.assert_array_equal(deg(x, p1), deg(x, p2))
  sr = degrade.Degradation.from_config(get_config('cpu,sr'))
  assert (sr.sr_factor, sr.channels) == (4, 3)
  assert sr.draw(np.random.default_rng(0), 4).shape == (4, 0)
  low = sr.low_resolution(x)
  assert low.shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(sr.condition_from_low_resolution(low), sr(x))
  paper = degrade.Degradation.from_config(get_config('sr'))
  assert paper.resolution // paper.sr_factor == 16


def test_bad_settings_raise():
  with pytest.raises(ValueError, match='task'):
    degrade.Degradation('denoise', 32)
  with pytest.raises(ValueError, match='sr_factor'):
    degrade.Degradation('sr', 32, sr_factor=5)
  with pytest.raises(ValueError, match='sr_upsample'):
    degrade.Degradation('sr', 32, sr_factor=4, upsample='linear')
  with pytest.raises(ValueError, match='mask_fraction'):
    degrade.Degradation('inpaint', 32, mask_fraction=1.2)
  with pytest.raises(ValueError, match='mask positions'):
    degrade.Degradation('inpaint', 32)(_images(r=32))
  with pytest.raises(ValueError, match='does not fit'):
    degrade.square_masks(8, 5, np.array([[4, 0]]))
  with pytest.raises(ValueError, match='must be 8x8'):
    degrade.Degradation('sr', 32, sr_factor=4).condition_from_low_resolution(np.zeros((1, 16, 16, 3)))
