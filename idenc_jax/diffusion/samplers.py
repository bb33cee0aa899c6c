"""Samplers that turn noise x_T into data x_0 with a noise-prediction model eps_fn(x, t).

`eps_fn(x, t) -> eps` takes a batch x of shape [B, ...] and integer timesteps t (int32, shape [B],
values in [0, T)); conditioning (identity embeddings, parameters) is closed over by the caller.
Every sampler runs its steps in one `lax.scan`, so a jitted sampler traces the model once.

Fewer-step samplers (DDIM, DPM-Solver++, respaced DDPM) visit `timestep_subsequence`: `num_steps`
distinct timesteps from `start_t` (default T - 1) down to 0, both ends always included, of any length
1..start_t + 1. DDIM and DDPM default to 'uniform' spacing (evenly spaced in t, rounded); DPM-Solver++ to
'logsnr' (evenly spaced in log(alpha / sigma)). Each sampler calls the model exactly `num_steps` times
(start_t + 1 for full DDPM); the last call, at t = 0, yields x_0.

Why start below T - 1: under the cosine schedule alpha_bar(T - 1) ~ 2e-9, so x0_hat at the first step is
the model's noise-prediction error amplified by 1 / sqrt(alpha_bar) ~ 20,000; clipped, an undertrained
model's first x0_hat is a saturated colour that the later steps keep. Starting at, e.g., t = 0.96 T (where
1 / sqrt(alpha_bar) ~ 16) treats x_T ~ N(0, I) as a slightly too noisy x_t, a much smaller error.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from idenc_jax.diffusion.schedules import NoiseSchedule

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]

SAMPLERS = ('ddpm', 'ddim', 'dpmpp')
SPACINGS = ('uniform', 'quadratic', 'logsnr')


def _strictly_decreasing(ts: np.ndarray, start_t: int) -> np.ndarray:
  """Nudges a non-increasing sequence from start_t to 0 into distinct integers, keeping both ends."""
  ts = ts.astype(np.int64)
  for k in range(1, len(ts)):         # crowded stretches become runs of consecutive timesteps
    ts[k] = min(ts[k], ts[k - 1] - 1)
  ts[-1] = max(ts[-1], 0)
  for k in range(len(ts) - 2, -1, -1):
    ts[k] = max(ts[k], ts[k + 1] + 1)
  assert ts[0] == start_t and ts[-1] == 0 and np.all(np.diff(ts) < 0), ts
  return ts.astype(np.int32)


def timestep_subsequence(schedule: NoiseSchedule, num_steps: int, spacing: str = 'uniform',
                         start_t: int | None = None) -> np.ndarray:
  """`num_steps` distinct int32 timesteps decreasing from start_t (default T - 1) to 0, both included.

  spacing: 'uniform'   evenly spaced in t, rounded to the nearest integer;
           'quadratic' t = (evenly spaced in sqrt(t))^2: denser near t = 0 (DDIM paper's "quad");
           'logsnr'    evenly spaced in lambda = log(alpha / sigma), each target at the nearest
                       timestep (DPM-Solver's recommended spacing; needs a concrete, untraced schedule).
  Where rounding would repeat a timestep (many steps crowded into few integers), consecutive
  timesteps are used instead. num_steps = start_t + 1 gives every timestep under any spacing.
  """
  T = schedule.timesteps
  if spacing not in SPACINGS:
    raise ValueError(f'Unknown timestep spacing {spacing!r}; choose from {list(SPACINGS)}.')
  start = check_start_t(start_t, T)
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= start + 1:
    raise ValueError(f'num_steps must be an integer in [1, {start + 1}] (timesteps {start}..0), '
                     f'got {num_steps!r}.')
  if num_steps == 1:
    return np.array([start], np.int32)
  if spacing == 'uniform':
    ts = np.linspace(start, 0, num_steps)
  elif spacing == 'quadratic':
    ts = np.linspace(np.sqrt(start), 0, num_steps) ** 2
  else:
    try:
      lam = (np.log(np.asarray(schedule.sqrt_alphas_cumprod, np.float64))
             - np.log(np.asarray(schedule.sqrt_one_minus_alphas_cumprod, np.float64)))
    except jax.errors.TracerArrayConversionError as e:
      raise ValueError("spacing='logsnr' needs a concrete schedule: close over it rather than "
                       'passing it as a traced jit argument.') from e
    targets = np.linspace(lam[start], lam[0], num_steps)
    return _strictly_decreasing(np.argmin(np.abs(lam[None, :start + 1] - targets[:, None]), axis=1), start)
  # floor(v + 0.5) rather than np.round, whose round-half-to-even is not monotone-friendly.
  return _strictly_decreasing(np.floor(ts + 0.5), start)


def num_steps_from_config(name: str, steps: int, timesteps: int, start_t: int | None = None) -> int | None:
  """A config's step count -> the samplers' num_steps: None (every timestep from start_t down) for 'ddpm'
  asked for at least that many (start_t + 1) steps, e.g. the paper's 1000 with start_t = T - 1 (None or
  -1); otherwise `steps` as given."""
  return None if name == 'ddpm' and steps >= check_start_t(start_t, timesteps) + 1 else steps


def check_start_t(start_t: int | None, timesteps: int) -> int:
  """The first timestep a sampler visits: start_t, or T - 1 when None or -1; an error outside [1, T - 1]."""
  if start_t is None or (isinstance(start_t, (int, np.integer)) and start_t == -1):
    return timesteps - 1
  if not isinstance(start_t, (int, np.integer)) or not 1 <= start_t <= timesteps - 1:
    raise ValueError(f'start_t must be an integer in [1, {timesteps - 1}] or -1 (= T - 1), got {start_t!r}.')
  return int(start_t)


def _denoise(eps_fn: EpsFn, schedule: NoiseSchedule, x: jax.Array, t: jax.Array,
             clip_denoised: bool) -> tuple[jax.Array, jax.Array]:
  """Model predictions at scalar timestep t: (x_0, eps), with x_0 optionally clipped to [-1, 1]."""
  t_batch = jnp.full((x.shape[0],), t, dtype=jnp.int32)
  eps = eps_fn(x, t_batch)
  if eps.shape != x.shape:
    raise ValueError(f'eps_fn returned shape {eps.shape} for input shape {x.shape}.')
  eps = eps.astype(x.dtype)
  r = schedule.sqrt_recip_alphas_cumprod[t]
  rm1 = schedule.sqrt_recipm1_alphas_cumprod[t]
  x0 = r * x - rm1 * eps
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (r * x - x0) / rm1    # the noise consistent with the clipped x_0
  return x0, eps


def respaced(schedule: NoiseSchedule, ts: np.ndarray):
  """alpha_bar, 1 - alpha_bar at ts and at the next visited timestep (alpha_bar = 1 after t = 0)."""
  ab = schedule.alphas_cumprod[ts]
  # 1 - alpha_bar from the float64-derived sqrt array: exact near t = 0 where alpha_bar ~ 1.
  om = schedule.sqrt_one_minus_alphas_cumprod[ts] ** 2
  ab_next = jnp.concatenate([ab[1:], jnp.ones((1,), ab.dtype)])
  om_next = jnp.concatenate([om[1:], jnp.zeros((1,), om.dtype)])
  return ab, om, ab_next, om_next


def _check_rng(rng, who: str):
  if rng is None:
    raise ValueError(f'{who} draws noise and needs an rng key.')


def _as_float32(x_T: jax.Array) -> jax.Array:
  # Sampling runs in float32 whatever the model's compute dtype; the scan carry keeps one dtype.
  x_T = jnp.asarray(x_T)
  if x_T.ndim < 1:
    raise ValueError(f'x_T must have a leading batch dimension, got shape {x_T.shape}.')
  return x_T.astype(jnp.float32)


def ddpm_sample(eps_fn: EpsFn, schedule: NoiseSchedule, x_T: jax.Array, rng: jax.Array, *,
                num_steps: int | None = None, spacing: str = 'uniform', start_t: int | None = None,
                clip_denoised: bool = False) -> jax.Array:
  """Ancestral sampling (Ho et al. 2020) with the fixed-small variance beta~_t.

  x_{t-1} = mu~_t(x_t, x0_hat) + sqrt(beta~_t) z for t = start_t, ..., 0 (start_t defaults to T - 1);
  beta~_0 = 0, so the last step adds no noise and returns the posterior mean. Fewer steps run the same
  on the process respaced to `timestep_subsequence(schedule, num_steps, spacing, start_t)`
  (improved-DDPM respacing); num_steps=None visits every timestep.
  """
  _check_rng(rng, 'ddpm_sample')
  x_T = _as_float32(x_T)
  start = check_start_t(start_t, schedule.timesteps)
  if num_steps is None or num_steps == start + 1:
    ts = np.arange(start, -1, -1, dtype=np.int32)
    coef1 = schedule.posterior_mean_coef1[ts]
    coef2 = schedule.posterior_mean_coef2[ts]
    std = jnp.sqrt(schedule.posterior_variance[ts])
  else:
    ts = timestep_subsequence(schedule, num_steps, spacing, start_t)
    ab, om, ab_next, om_next = respaced(schedule, ts)
    beta = (om - om_next) / ab_next      # 1 - alpha_bar_t / alpha_bar_next
    coef1 = beta * jnp.sqrt(ab_next) / om
    coef2 = jnp.sqrt(ab / ab_next) * om_next / om
    std = jnp.sqrt(beta * om_next / om)  # 0 at the last step, where om_next = 0
  keys = jax.random.split(rng, len(ts))

  def step(x, inputs):
    t, c1, c2, sd, key = inputs
    x0, _ = _denoise(eps_fn, schedule, x, t, clip_denoised)
    x = c1 * x0 + c2 * x + sd * jax.random.normal(key, x.shape, x.dtype)
    return x, None

  x, _ = lax.scan(step, x_T, (jnp.asarray(ts), coef1, coef2, std, keys))
  return x


def _is_zero(value) -> bool:
  return isinstance(value, (int, float, np.number)) and value == 0


def ddim_sample(eps_fn: EpsFn, schedule: NoiseSchedule, x_T: jax.Array, num_steps: int,
                eta: float = 0.0, rng: jax.Array | None = None, *, spacing: str = 'uniform',
                start_t: int | None = None, clip_denoised: bool = False) -> jax.Array:
  """DDIM (Song et al. 2021) on `timestep_subsequence(schedule, num_steps, spacing, start_t)`.

  x_next = sqrt(ab_next) x0_hat + sqrt(1 - ab_next - sigma^2) eps_hat + sigma z, with
  sigma = eta sqrt((1 - ab_next) / (1 - ab) (1 - ab / ab_next)). eta = 0 is deterministic; eta = 1 is
  ancestral sampling of the respaced process (with num_steps = T it equals `ddpm_sample` given the
  same rng). eta may be a traced scalar, in which case rng is required.
  """
  if isinstance(eta, (int, float, np.number)) and not 0.0 <= eta <= 1.0:
    raise ValueError(f'eta must lie in [0, 1], got {eta}.')
  stochastic = not _is_zero(eta)
  if stochastic:
    _check_rng(rng, 'ddim_sample with eta > 0')
  x_T = _as_float32(x_T)
  ts = timestep_subsequence(schedule, num_steps, spacing, start_t)
  ab, om, ab_next, om_next = respaced(schedule, ts)
  sigma = eta * jnp.sqrt(om_next / om * (om - om_next) / ab_next)
  dir_coef = jnp.sqrt(jnp.maximum(om_next - sigma ** 2, 0.0))
  keys = jax.random.split(rng, num_steps) if stochastic else jnp.zeros((num_steps,), jnp.uint32)

  def step(x, inputs):
    t, a_next, d, sd, key = inputs
    x0, eps = _denoise(eps_fn, schedule, x, t, clip_denoised)
    x = a_next * x0 + d * eps
    if stochastic:
      x = x + sd * jax.random.normal(key, x.shape, x.dtype)
    return x, None

  x, _ = lax.scan(step, x_T, (jnp.asarray(ts), jnp.sqrt(ab_next), dir_coef, sigma, keys))
  return x


def dpmpp_2m_sample(eps_fn: EpsFn, schedule: NoiseSchedule, x_T: jax.Array, num_steps: int, *,
                    spacing: str = 'logsnr', start_t: int | None = None,
                    clip_denoised: bool = False) -> jax.Array:
  """DPM-Solver++(2M) (Lu et al. 2022): multistep second-order solver of the probability-flow ODE
  in data prediction, on `timestep_subsequence(schedule, num_steps, spacing, start_t)` with
  lambda_t = log(alpha_t / sigma_t), alpha_t^2 = alpha_bar_t, sigma_t^2 = 1 - alpha_bar_t.

  Between consecutive visited timesteps s -> t (h = lambda_t - lambda_s, r = h_prev / h):
    x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D,
    D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev   (D = x0_s on the first step, which is first order).
  The final step goes from t = 0 to sigma = 0 (lambda = inf), where the update reduces to x0_hat.
  The default 'logsnr' spacing is the one the paper recommends; on uniform-in-t spacing the large
  lambda jumps near t = 0 make the second-order extrapolation overshoot at few steps.
  """
  x_T = _as_float32(x_T)
  ts = timestep_subsequence(schedule, num_steps, spacing, start_t)
  alpha = schedule.sqrt_alphas_cumprod[ts]
  sigma = schedule.sqrt_one_minus_alphas_cumprod[ts]
  lam = jnp.log(alpha) - jnp.log(sigma)
  h = lam[1:] - lam[:-1]                                   # [num_steps - 1], all > 0
  h_prev = jnp.concatenate([h[:1], h[:-1]])
  first = jnp.arange(num_steps - 1) == 0
  inputs = (jnp.asarray(ts[:-1]), sigma[1:] / sigma[:-1], alpha[1:] * -jnp.expm1(-h),
            h_prev / h, first)

  def step(carry, inputs):
    x, x0_prev = carry
    t, sigma_ratio, phi, r, is_first = inputs
    x0, _ = _denoise(eps_fn, schedule, x, t, clip_denoised)
    d = jnp.where(is_first, x0, (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev)
    return (sigma_ratio * x + phi * d, x0), None

  (x, _), _ = lax.scan(step, (x_T, jnp.zeros_like(x_T)), inputs)
  x0, _ = _denoise(eps_fn, schedule, x, jnp.int32(ts[-1]), clip_denoised)
  return x0


def sample(name: str, eps_fn: EpsFn, schedule: NoiseSchedule, x_T: jax.Array, *,
           num_steps: int | None = None, eta: float = 0.0, rng: jax.Array | None = None,
           spacing: str | None = None, start_t: int | None = None,
           clip_denoised: bool = False) -> jax.Array:
  """Runs sampler `name`: 'ddpm', 'ddim' or 'dpmpp' (DPM-Solver++(2M)).

  'ddpm' uses all T steps when num_steps is None (respaced otherwise) and needs rng; 'ddim' and
  'dpmpp' need num_steps; eta applies to 'ddim' only (rng needed when eta > 0). spacing=None takes
  each sampler's default ('uniform' for ddpm/ddim, 'logsnr' for dpmpp). start_t: the first timestep
  (None or -1: T - 1).
  """
  if name not in SAMPLERS:
    raise ValueError(f'Unknown sampler {name!r}; choose from {list(SAMPLERS)}.')
  if name != 'ddim' and not _is_zero(eta):
    raise ValueError(f'eta applies to the ddim sampler only; got eta={eta} with {name!r}.')
  kw = dict(clip_denoised=clip_denoised, start_t=start_t)
  if spacing is not None:
    kw['spacing'] = spacing
  if name == 'ddpm':
    return ddpm_sample(eps_fn, schedule, x_T, rng, num_steps=num_steps, **kw)
  if num_steps is None:
    raise ValueError(f'Sampler {name!r} needs num_steps.')
  if name == 'ddim':
    return ddim_sample(eps_fn, schedule, x_T, num_steps, eta, rng, **kw)
  return dpmpp_2m_sample(eps_fn, schedule, x_T, num_steps, **kw)
