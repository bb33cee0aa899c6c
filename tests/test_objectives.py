"""Prediction targets and timestep weights against their formulas, computed in numpy from the closed-form
cosine schedule (test_samplers._alpha_bar), not from the library's arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from idenc_jax import models
from idenc_jax.data import batch_layout
from idenc_jax.diffusion import objectives, schedules
from idenc_jax.train import losses

from test_personalize import random_params, shrink  # noqa: E402
from test_samplers import _alpha_bar  # noqa: E402

T = 1000
TS = np.array([0, 1, 10, 200, 500, 800, 960, 999], np.int32)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, (len(TS), 4, 4, 3)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  return x0, noise


def test_targets_against_numpy_and_round_trip_to_eps():
  ab = _alpha_bar('cosine', T)[TS][:, None, None, None]
  sched = schedules.make_schedule('cosine', T)
  x0, noise = _data()
  t = jnp.asarray(TS)
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
  want = {'eps': noise, 'x0': x0, 'v': np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0}
  for p in objectives.PREDICTIONS:
    got = np.asarray(objectives.training_target(sched, jnp.asarray(x0), jnp.asarray(noise), t, p))
    np.testing.assert_allclose(got, want[p], rtol=1e-5, atol=1e-6, err_msg=p)
    # A perfect prediction of each target converts back to the true noise (what the samplers use).
    eps = np.asarray(objectives.eps_from_output(sched, jnp.asarray(x_t, jnp.float32), t, jnp.asarray(want[p]), p))
    # x0 -> eps divides by sqrt(1 - alpha_bar), which is 6e-3 at t = 0: a looser bound there.
    atol = np.where(TS[:, None, None, None] == 0, 2e-3, 2e-5) if p == 'x0' else 2e-5
    assert np.all(np.abs(eps - noise) <= atol + 1e-5 * np.abs(noise)), p


@pytest.mark.parametrize('gamma', [1.0, 5.0])
def test_min_snr_weights_against_the_formula(gamma):
  ab = _alpha_bar('cosine', T)[TS]
  snr = ab / (1 - ab)
  sched = schedules.make_schedule('cosine', T)
  t = jnp.asarray(TS)
  want = {'eps': np.minimum(snr, gamma) / snr, 'v': np.minimum(snr, gamma) / (snr + 1), 'x0': np.minimum(snr, gamma)}
  for p, w in want.items():
    np.testing.assert_allclose(objectives.loss_weight(sched, t, p, 'min_snr', gamma), w, rtol=2e-5, err_msg=p)
    np.testing.assert_array_equal(objectives.loss_weight(sched, t, p, 'none'), np.ones(len(TS)))


def test_min_snr_makes_every_target_the_same_x0_error():
  """Weighted, the three targets' losses of one x0 error are equal: min(SNR, gamma) |x0_hat - x0|^2."""
  ab = _alpha_bar('cosine', T)[TS][:, None, None, None]
  sched = schedules.make_schedule('cosine', T)
  x0, noise = _data(1)
  t = jnp.asarray(TS)
  x0_hat = x0 + 0.1 * np.random.default_rng(2).standard_normal(x0.shape).astype(np.float32)
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
  # The same estimate written as each target: eps_hat from x0_hat, v_hat from both.
  eps_hat = (x_t - np.sqrt(ab) * x0_hat) / np.sqrt(1 - ab)
  outputs = {'x0': x0_hat, 'eps': eps_hat, 'v': np.sqrt(ab) * eps_hat - np.sqrt(1 - ab) * x0_hat}
  snr = (ab / (1 - ab))[:, 0, 0, 0]
  want = np.minimum(snr, 5.0) * np.mean((x0_hat - x0) ** 2, axis=(1, 2, 3))
  for p, out in outputs.items():
    c = base.get_config('tiny')
    c.diffusion.prediction, c.loss.weighting = p, 'min_snr'
    got = losses.weighted_diffusion_loss(c, sched, jnp.asarray(out), jnp.asarray(x0), jnp.asarray(noise), t)
    np.testing.assert_allclose(got, want, rtol=2e-3, err_msg=p)


def test_bad_names_are_clear():
  sched = schedules.make_schedule('cosine', T)
  with pytest.raises(ValueError, match='config.diffusion.prediction'):
    objectives.check_prediction('noise')
  with pytest.raises(ValueError, match='config.loss.weighting'):
    objectives.loss_weight(sched, jnp.zeros((1,), jnp.int32), 'eps', 'snr')


@pytest.mark.parametrize('prediction', ['v', 'x0'])
def test_every_target_trains(prediction):
  """The loss of a v- or x0-predicting generator is finite and has a gradient, with min-SNR weighting."""
  c = base.get_config('tiny')
  shrink(c)
  c.diffusion.prediction, c.loss.weighting = prediction, 'min_snr'
  gen, enc = models.build_generator(c), models.build_encoder(c)
  params = random_params(c)
  rng = np.random.default_rng(0)
  r, n_ag = c.model.resolution, batch_layout.agnostic_size(c)
  n = c.train.batch_size - n_ag
  batch = {'id_images': rng.integers(0, 256, (n, r, r, 3), dtype=np.uint8),
           'id_labels': np.repeat(np.arange(n // 4), 4).astype(np.int32),
           'id_groups': np.repeat(np.arange(n // 4), 4).astype(np.int32),
           'agnostic_images': rng.integers(0, 256, (n_ag, r, r, 3), dtype=np.uint8)}
  fn = lambda p: losses.compute_loss(p, batch, jax.random.key(0), 5, config=c, generator=gen, encoder=enc,
                                     schedule=schedules.from_config(c))[0]
  loss, grads = jax.jit(jax.value_and_grad(fn))(params)
  assert np.isfinite(float(loss))
  assert float(jnp.sum(grads['generator']['conv_out']['kernel'] ** 2)) > 0
