"""Data consistency for restoration (idenc_jax/diffusion/consistency.py): the wrapped model's implied x0
against the numpy formula, and every sampler ending exactly on the input's block means / known pixels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idenc_jax.diffusion import consistency, samplers, schedules

T, R = 50, 8


def _schedule():
  return schedules.make_schedule('cosine', T)


def _eps_fn(x, t):
  """A fixed nonlinear stand-in for a trained model (depends on x and t)."""
  return jnp.tanh(1.3 * x + 0.01 * t[:, None, None, None]) + 0.2 * jnp.roll(x, 1, axis=1)


def _np_block_mean(x, f):
  n, h, w, c = x.shape
  out = np.zeros((n, h // f, w // f, c))
  for i in range(h // f):
    for j in range(w // f):
      out[:, i, j] = x[:, i * f:(i + 1) * f, j * f:(j + 1) * f].mean(axis=(1, 2))
  return out


def _conditions(rng, task):
  clean = rng.uniform(-0.9, 0.9, (4, R, R, 3))
  if task == 'sr':   # the nearest-upsampled low-res image, as data.degrade makes it
    return clean, np.repeat(np.repeat(_np_block_mean(clean, 2), 2, 1), 2, 2).astype(np.float32)
  hole = np.zeros((4, R, R, 1))
  hole[:, 2:7, 1:5] = 1
  return clean, np.concatenate([clean * (1 - hole), hole], -1).astype(np.float32)


@pytest.mark.parametrize('task', ['sr', 'inpaint'])
def test_wrapped_model_implies_the_projected_estimate(task):
  sch = _schedule()
  rng = np.random.default_rng(0)
  _, cond = _conditions(rng, task)
  x = rng.normal(size=(4, R, R, 3)).astype(np.float32)
  t = np.array([1, 10, 30, 45], np.int32)   # (at t = T - 1, 1 / sqrt(alpha_bar) ~ 1e4 amplifies float32 rounding)
  proj = consistency.projector(task, sr_factor=2)
  eps = np.asarray(consistency.consistent_eps_fn(_eps_fn, sch, lambda x0: proj(x0, cond))(x, t), np.float64)
  ab = np.asarray(sch.alphas_cumprod, np.float64)[t][:, None, None, None]
  x0_model = np.clip((x - np.sqrt(1 - ab) * np.asarray(_eps_fn(x, t), np.float64)) / np.sqrt(ab), -1, 1)
  x0_implied = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
  if task == 'sr':   # block means from the input, deviations from them the model's
    want_means = _np_block_mean(cond, 2)
    dev = lambda a: a - np.repeat(np.repeat(_np_block_mean(a, 2), 2, 1), 2, 2)
    np.testing.assert_allclose(_np_block_mean(x0_implied, 2), want_means, atol=2e-4)
    np.testing.assert_allclose(dev(x0_implied), dev(x0_model), atol=2e-4)
  else:
    hole = cond[..., 3:] > 0.5
    np.testing.assert_allclose(x0_implied, np.where(hole, x0_model, cond[..., :3]), atol=2e-4)


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim', 'dpmpp'])
@pytest.mark.parametrize('task', ['sr', 'inpaint'])
def test_every_sampler_ends_on_the_input(sampler, task):
  sch = _schedule()
  rng = np.random.default_rng(1)
  clean, cond = _conditions(rng, task)
  proj = consistency.projector(task, sr_factor=2)
  x_T = jax.random.normal(jax.random.key(0), (4, R, R, 3))
  # The wrapper clips x0_hat before projecting; the sampler's own clip (after it) could move a projected
  # value outside [-1, 1] back and break exactness, so it is off here.
  kw = dict(num_steps=None if sampler == 'ddpm' else 6, rng=jax.random.key(1), clip_denoised=False)
  if sampler == 'dpmpp':
    kw.pop('rng')
  wrapped = consistency.consistent_eps_fn(_eps_fn, sch, lambda x0: proj(x0, cond))
  out = np.asarray(samplers.sample(sampler, wrapped, sch, x_T, **kw), np.float64)
  free = np.asarray(samplers.sample(sampler, _eps_fn, sch, x_T, **kw), np.float64)
  if task == 'sr':
    np.testing.assert_allclose(_np_block_mean(out, 2), _np_block_mean(clean, 2), atol=1e-4)
    assert np.abs(_np_block_mean(free, 2) - _np_block_mean(clean, 2)).max() > 0.1   # the check can fail
  else:
    known = cond[..., 3] < 0.5
    np.testing.assert_allclose(out[known], clean[known], atol=1e-4)
    assert np.abs(free[known] - clean[known]).max() > 0.1
    # Inside the hole the model still decides, but from consistent surroundings: not the free sample.
    assert np.abs(out[~known] - free[~known]).max() > 1e-3


def test_sr_projection_needs_nearest_conditions():
  with pytest.raises(ValueError, match="must be 'nearest'"):
    consistency.projector('sr', 4, 'bicubic')
  with pytest.raises(ValueError, match='Unknown restoration task'):
    consistency.projector('deblur')
