"""The ResBlocks' 2x resampling (models/ops/resample.py) against numpy, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idenc_jax.models.ops import resample


def _x(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_upsample_copies_each_pixel_into_its_block():
  h = _x((2, 3, 5, 4))
  np.testing.assert_array_equal(np.asarray(resample.upsample2x(jnp.asarray(h))), h.repeat(2, 1).repeat(2, 2))


def test_upsample_gradient_sums_each_block():
  h, g = _x((2, 3, 5, 4)), _x((2, 6, 10, 4), seed=1)
  _, vjp = jax.vjp(resample.upsample2x, jnp.asarray(h))
  want = g.astype(np.float64).reshape(2, 3, 2, 5, 2, 4).sum(axis=(2, 4))
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), want, rtol=1e-6, atol=1e-6)
  # Under jit too, where XLA fuses the strided quarters (the train step's case).
  grad = jax.jit(lambda h, g: jax.vjp(resample.upsample2x, h)[1](g)[0])(jnp.asarray(h), jnp.asarray(g))
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6, atol=1e-6)


def test_downsample_means_each_block_and_spreads_its_gradient():
  x, g = _x((2, 6, 4, 3)), _x((2, 3, 2, 3), seed=2)
  y, vjp = jax.vjp(resample.downsample2x, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), x.astype(np.float64).reshape(2, 3, 2, 2, 2, 3).mean(axis=(2, 4)),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), (g / 4).repeat(2, 1).repeat(2, 2))


def test_downsample_refuses_an_odd_map():
  with pytest.raises(ValueError, match='even map, got 3x4'):
    resample.downsample2x(jnp.zeros((1, 3, 4, 2)))
