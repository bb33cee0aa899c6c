"""What the generator predicts and how the diffusion loss weighs timesteps.

With x_t = a x0 + b eps (a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t), SNR = a^2 / b^2) the generator
predicts one of (`config.diffusion.prediction`):

  'eps'  the noise (Ho et al. 2020; the paper's choice);
  'v'    v = a eps - b x0 (Salimans & Ho 2022), well scaled at every noise level;
  'x0'   the clean image.

The samplers only ever see eps: `eps_from_output` converts any of the three (eps = (x_t - a x0) / b and
eps = a v + b x_t), so every sampler, guidance and data consistency work unchanged.

Measured as an error in x0, the plain MSE on each target weighs timestep t by SNR (eps), SNR + 1 (v) or 1
(x0). `config.loss.weighting = 'min_snr'` (Hang et al. 2023) reweighs every target to min(SNR, gamma) in
x0 terms: the low-noise steps, whose huge SNR dominates the eps loss while deciding only fine detail, are
capped, and the high-noise steps that fix the layout (and the identity) get a larger share of the gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from idenc_jax.diffusion.schedules import NoiseSchedule, extract

PREDICTIONS = ('eps', 'v', 'x0')
WEIGHTINGS = ('none', 'min_snr')


def check_prediction(prediction: str) -> str:
  if prediction not in PREDICTIONS:
    raise ValueError(f'Unknown prediction target {prediction!r} (config.diffusion.prediction); '
                     f'choose from {list(PREDICTIONS)}.')
  return prediction


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
  """alpha_bar_t / (1 - alpha_bar_t) at integer timesteps t, from the float64-derived sqrt arrays."""
  return (schedule.sqrt_alphas_cumprod[t] / schedule.sqrt_one_minus_alphas_cumprod[t]) ** 2


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array,
                    prediction: str) -> jax.Array:
  """What the generator regresses at (x0, noise, t): noise, v or x0."""
  check_prediction(prediction)
  if prediction == 'eps':
    return noise
  if prediction == 'x0':
    return x0
  a = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim)
  b = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
  return a * noise - b * x0


def eps_from_output(schedule: NoiseSchedule, x_t: jax.Array, t: jax.Array, output: jax.Array,
                    prediction: str) -> jax.Array:
  """The noise prediction implied by the generator's output (identity for 'eps')."""
  check_prediction(prediction)
  if prediction == 'eps':
    return output
  output = output.astype(jnp.float32)
  a = extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
  b = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
  if prediction == 'x0':
    return (x_t - a * output) / b
  return a * output + b * x_t


def loss_weight(schedule: NoiseSchedule, t: jax.Array, prediction: str, weighting: str,
                gamma: float = 5.0) -> jax.Array:
  """Per-example weight [B] of the target's MSE: 1 ('none'), or the min-SNR-gamma weight that makes the
  loss min(SNR, gamma) x the x0 error whatever the target."""
  check_prediction(prediction)
  if weighting not in WEIGHTINGS:
    raise ValueError(f'Unknown loss weighting {weighting!r} (config.loss.weighting); choose from {list(WEIGHTINGS)}.')
  if weighting == 'none':
    return jnp.ones(t.shape, jnp.float32)
  if not gamma > 0:
    raise ValueError(f'config.loss.min_snr_gamma must be > 0, got {gamma}.')
  s = snr(schedule, t).astype(jnp.float32)
  capped = jnp.minimum(s, gamma)
  # The target's own MSE already carries SNR (eps), SNR + 1 (v) or 1 (x0) in x0 terms.
  return {'eps': capped / s, 'v': capped / (s + 1.0), 'x0': capped}[prediction]
