"""Discrete-time Gaussian diffusion: noise schedules and the forward process q(x_t | x_0).

Timesteps are integers t in [0, T). Index t holds the quantities after t + 1 noising steps, so
`alphas_cumprod[0]` is just below 1 and `alphas_cumprod[T - 1]` is close to 0 (the improved-DDPM
convention). Every array is computed in float64 numpy and stored as a float32 jnp array.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ('cosine', 'linear')

_COSINE_OFFSET = 0.008      # s in Nichol & Dhariwal (2021): keeps beta_0 from being vanishingly small
_MAX_BETA = 0.999           # clip that prevents the singular beta = 1 at the end of the cosine schedule


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
  """Per-timestep constants of a diffusion process; every array is float32 of shape [T].

  A pytree (arrays are leaves, `name` is static), so it may be closed over or passed into `jax.jit`.
  """
  betas: jax.Array
  alphas: jax.Array                            # 1 - beta_t
  alphas_cumprod: jax.Array                    # alpha_bar_t
  alphas_cumprod_prev: jax.Array               # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array         # 1 / sqrt(alpha_bar_t)
  sqrt_recipm1_alphas_cumprod: jax.Array       # sqrt(1 / alpha_bar_t - 1)
  posterior_variance: jax.Array                # beta~_t of q(x_{t-1} | x_t, x_0); 0 at t = 0
  posterior_log_variance_clipped: jax.Array    # log beta~_t with beta~_0 replaced by beta~_1
  posterior_mean_coef1: jax.Array              # weight of x_0 in the posterior mean
  posterior_mean_coef2: jax.Array              # weight of x_t in the posterior mean
  name: str = dataclasses.field(default='custom', metadata=dict(static=True))

  @property
  def timesteps(self) -> int:
    return self.betas.shape[0]


def _cosine_betas(timesteps: int) -> np.ndarray:
  def alpha_bar(u):
    return np.cos((u + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2

  u = np.arange(timesteps + 1, dtype=np.float64) / timesteps
  ab = alpha_bar(u)
  return np.minimum(1.0 - ab[1:] / ab[:-1], _MAX_BETA)


def _linear_betas(timesteps: int) -> np.ndarray:
  # DDPM's range for T = 1000; scaled by 1000 / T so the total noise stays similar for other T.
  scale = 1000.0 / timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)


def schedule_from_betas(betas: np.ndarray, name: str = 'custom') -> NoiseSchedule:
  """Builds every derived array from betas (any float array of shape [T], values in (0, 1))."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 2:
    raise ValueError(f'betas must be a 1-D array of length >= 2, got shape {betas.shape}.')
  if not np.all((betas > 0) & (betas < 1)):
    raise ValueError('betas must lie in (0, 1): beta = 1 would make alpha_bar exactly 0.')
  alphas = 1.0 - betas
  ab = np.cumprod(alphas)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return NoiseSchedule(
      betas=f32(betas),
      alphas=f32(alphas),
      alphas_cumprod=f32(ab),
      alphas_cumprod_prev=f32(ab_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(ab)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ab)),
      sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / ab)),
      sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / ab - 1.0)),
      posterior_variance=f32(post_var),
      posterior_log_variance_clipped=f32(np.log(np.concatenate([post_var[1:2], post_var[1:]]))),
      posterior_mean_coef1=f32(betas * np.sqrt(ab_prev) / (1.0 - ab)),
      posterior_mean_coef2=f32((1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab)),
      name=name,
  )


def make_schedule(name: str, timesteps: int) -> NoiseSchedule:
  """The named beta schedule over `timesteps` steps: 'cosine' or 'linear'."""
  if name not in SCHEDULES:
    raise ValueError(f'Unknown noise schedule {name!r}; choose from {list(SCHEDULES)}.')
  if not isinstance(timesteps, (int, np.integer)) or timesteps < 2:
    raise ValueError(f'timesteps must be an integer >= 2, got {timesteps!r}.')
  timesteps = int(timesteps)
  betas = _cosine_betas(timesteps) if name == 'cosine' else _linear_betas(timesteps)
  if name == 'linear' and betas[-1] >= 1:
    raise ValueError(f'The linear schedule needs timesteps > 20 (beta_T = 0.02 * 1000 / T), '
                     f'got {timesteps}.')
  return schedule_from_betas(betas, name=name)


def from_config(config: Any) -> NoiseSchedule:
  """The schedule named by `config.diffusion.schedule` with `config.diffusion.timesteps` steps."""
  return make_schedule(config.diffusion.schedule, config.diffusion.timesteps)


def extract(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """values[t] for int timesteps t of shape [B], shaped [B, 1, ..., 1] to broadcast over ndim dims."""
  out = jnp.take(values, t, axis=0)
  return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def _check_t(t: jax.Array, batch: int) -> None:
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(f'Timesteps must be integers in [0, T), got dtype {t.dtype}.')
  if t.shape != (batch,):
    raise ValueError(f'Timesteps must have shape ({batch},), got {t.shape}.')


def q_sample(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise; t is int [B], x0 and noise [B, ...]."""
  t = jnp.asarray(t)
  _check_t(t, x0.shape[0])
  if noise.shape != x0.shape:
    raise ValueError(f'noise shape {noise.shape} differs from x0 shape {x0.shape}.')
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise).astype(x0.dtype)


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: jax.Array, t: jax.Array,
                        eps: jax.Array) -> jax.Array:
  """The x_0 implied by x_t and a noise prediction: (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
  t = jnp.asarray(t)
  _check_t(t, x_t.shape[0])
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
          - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)
