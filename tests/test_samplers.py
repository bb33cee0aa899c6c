"""Samplers driven by the exact noise predictor of Gaussian data.

For x0 ~ N(mu, s^2 I) and x_t = a x0 + b eps (a^2 = alpha_bar_t, b^2 = 1 - alpha_bar_t), x_t and eps
are jointly Gaussian with Cov(eps, x_t) = b and Var(x_t) = a^2 s^2 + b^2, so the MSE-optimal
predictor is E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2). Every update of every sampler is
then affine in x, so the output is exactly Gaussian with mean mu and a standard deviation that a
float64 recursion over the sampler's steps predicts (written below from the papers' formulas and
Gaussian conditioning, independently of the library code). The samples are checked against that
prediction within sampling error, and the prediction against s (the discretisation error).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idenc_jax.diffusion import samplers
from idenc_jax.diffusion import schedules

MU = np.array([0.5, -0.3])
S = 0.2
N = 4096
SHAPE = (N, 1, 1, 2)      # NHWC: 4096 images of 1x1 pixels with two channels
Z = 4.5                   # tolerance in standard errors (two-sided p ~ 7e-6 per check)


def _alpha_bar(name, T):
  """alpha_bar in float64, from the closed forms (not from the library)."""
  if name == 'cosine':
    f = lambda u: np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    u = np.arange(T + 1) / T
    betas = np.minimum(1 - f(u[1:]) / f(u[:-1]), 0.999)
  else:
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
  return np.cumprod(1 - betas)


def _gaussian_eps_fn(ab, mu=MU, s=S):
  a = jnp.asarray(np.sqrt(ab), jnp.float32)
  b = jnp.asarray(np.sqrt(1 - ab), jnp.float32)
  v = jnp.asarray(ab * s ** 2 + (1 - ab), jnp.float32)
  mu = jnp.asarray(mu, jnp.float32)

  def eps_fn(x, t):
    assert t.dtype == jnp.int32 and t.shape == (x.shape[0],)
    e = lambda arr: arr[t][:, None, None, None]
    return e(b) * (x - e(a) * mu) / e(v)
  return eps_fn


def test_gaussian_eps_fn_is_the_regression_of_eps_on_x_t():
  """Double-check of the optimal predictor: least squares of eps on x_t over simulated pairs."""
  ab = _alpha_bar('cosine', 1000)
  eps_fn = _gaussian_eps_fn(ab)
  rng = np.random.default_rng(0)
  draws = 200_000
  for t in (50, 400, 900):
    a, b = np.sqrt(ab[t]), np.sqrt(1 - ab[t])
    x0 = MU[0] + S * rng.standard_normal(draws)
    eps = rng.standard_normal(draws)
    xt = a * x0 + b * eps
    slope, intercept = np.polyfit(xt, eps, 1)
    grid = np.linspace(-1, 1, 5, dtype=np.float32)
    x = jnp.asarray(np.stack([grid, np.zeros_like(grid)], -1)[:, None, None, :])
    got = np.asarray(eps_fn(x, jnp.full((5,), t, jnp.int32)))[:, 0, 0, 0]
    # Residual eps given x_t has variance 1 - b^2 / v: the fit's standard errors follow from it.
    resid_sd = np.sqrt(1 - b * b / (ab[t] * S * S + b * b))
    se = resid_sd / np.sqrt(draws) * (1 + np.abs(grid) / np.std(xt) + np.abs(np.mean(xt)) / np.std(xt))
    np.testing.assert_array_less(np.abs(got - (slope * grid + intercept)), 5 * se + 1e-6)


# ---- Predicted output standard deviation (float64), one recursion per sampler family. ----------

def _ancestral_std(ab, ts, s=S):
  return _ancestral_moments(ab, ts, 0.0, s)[1]


def _ancestral_moments(ab, ts, z_mean, s=S):
  """Ancestral steps t -> t' of q(x_t' | x_t, x0) (Gaussian conditioning), fixed-small variance.

  Deviation z = x - a mu: x0_hat - mu = (a s^2 / v) z and the posterior mean preserves a mu, so
  z' = (c0 a s^2 / v + ct) z + sqrt(var) xi. Starts from z of mean z_mean and variance 1; returns the
  final deviation's (mean, std) (after t = 0 the output is mu + z).
  """
  var = 1.0
  for i, t in enumerate(ts):
    abn = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
    a, v = np.sqrt(ab[t]), ab[t] * s * s + 1 - ab[t]
    cov = np.sqrt(ab[t] / abn) * (1 - abn)          # Cov(x_t', x_t | x0)
    ct = cov / (1 - ab[t])
    c0 = np.sqrt(abn) - ct * a
    post_var = (1 - abn) - cov ** 2 / (1 - ab[t])
    gain = c0 * a * s * s / v + ct
    var, z_mean = gain ** 2 * var + post_var, gain * z_mean
  return z_mean, np.sqrt(var)


def _ddim_std(ab, ts, eta, s=S):
  """DDIM (Song et al. 2021, eq. 12): x' = a' x0_hat + sqrt(1 - a'^2 - sig^2) eps_hat + sig xi."""
  var = 1.0
  for i, t in enumerate(ts):
    abn = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
    a, b, v = np.sqrt(ab[t]), np.sqrt(1 - ab[t]), ab[t] * s * s + 1 - ab[t]
    sig = eta * np.sqrt((1 - abn) / (1 - ab[t]) * (1 - ab[t] / abn))
    k = np.sqrt(abn) * a * s * s / v + np.sqrt(max(1 - abn - sig ** 2, 0.0)) * b / v
    var = k * k * var + sig ** 2
  return np.sqrt(var)


def _dpmpp_std(ab, ts, s=S):
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on the deviation z; deterministic, z = c z_T."""
  alpha, sigma = np.sqrt(ab[ts]), np.sqrt(1 - ab[ts])
  lam = np.log(alpha / sigma)
  gain = lambda i: alpha[i] * s * s / (alpha[i] ** 2 * s * s + sigma[i] ** 2)   # d x0_hat / dz
  c, d_prev = 1.0, None
  for i in range(len(ts) - 1):
    d_cur = gain(i) * c
    h = lam[i + 1] - lam[i]
    if i == 0:
      d = d_cur
    else:
      r = (lam[i] - lam[i - 1]) / h
      d = (1 + 1 / (2 * r)) * d_cur - 1 / (2 * r) * d_prev
    c = sigma[i + 1] / sigma[i] * c - alpha[i + 1] * (math.exp(-h) - 1) * d
    d_prev = d_cur
  return abs(gain(len(ts) - 1) * c)


# ---- Gaussian-data checks. --------------------------------------------------------------------------

def _check_gaussian(x, want_std, want_mean=MU):
  x = np.asarray(x, np.float64).reshape(N, 2)
  assert np.all(np.isfinite(x))
  mean, std = x.mean(0), x.std(0)
  se_mean, se_std = want_std / math.sqrt(N), want_std / math.sqrt(2 * N)
  assert np.all(np.abs(mean - want_mean) < Z * se_mean), (mean, want_mean, se_mean)
  assert np.all(np.abs(std - want_std) < Z * se_std), (std, want_std, se_std)


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def _key(seed):
  # The samplers take any key type. Threefry (the default) takes seconds to compile on a loaded CPU
  # for every jitted function that draws from it, so most tests use the 'rbg' implementation; the
  # first Gaussian case uses a default key.
  return jax.random.key(seed, impl='rbg')


def _x_T(seed=0):
  return _normal(SHAPE, seed)


CASES = [
    # (schedule, sampler, num_steps, eta, bound on |predicted std / s - 1|)
    ('cosine', 'ddpm', None, 0.0, 0.015),
    ('cosine', 'ddim', 50, 0.0, 0.07),
    ('cosine', 'ddim', 50, 1.0, 0.14),
    ('cosine', 'dpmpp', 20, 0.0, 0.035),
    ('linear', 'ddpm', None, 0.0, 0.025),
    ('linear', 'ddim', 50, 0.0, 0.13),
]


@pytest.mark.parametrize('schedule_name,name,num_steps,eta,bound', CASES)
def test_exact_eps_gives_the_data_distribution(schedule_name, name, num_steps, eta, bound):
  T = 1000
  ab = _alpha_bar(schedule_name, T)
  sched = schedules.make_schedule(schedule_name, T)
  eps_fn = _gaussian_eps_fn(ab)
  run = jax.jit(lambda x, rng: samplers.sample(name, eps_fn, sched, x, num_steps=num_steps,
                                               eta=eta, rng=rng))
  out = run(_x_T(), jax.random.key(1) if name == 'ddpm' and schedule_name == 'cosine' else _key(1))
  assert out.shape == SHAPE and out.dtype == jnp.float32
  if name == 'ddpm':
    want = _ancestral_std(ab, np.arange(T - 1, -1, -1))
  elif name == 'ddim':
    want = _ddim_std(ab, samplers.timestep_subsequence(sched, num_steps), eta)
  else:
    want = _dpmpp_std(ab, samplers.timestep_subsequence(sched, num_steps, 'logsnr'))
  # The sampler's own discretisation error, a deterministic property of the algorithm.
  assert abs(want / S - 1) < bound, want / S
  _check_gaussian(out, want)


DETERMINISTIC = [('ddim', 20, 'uniform'), ('ddim', 20, 'quadratic'), ('dpmpp', 15, 'uniform'),
                 ('dpmpp', 15, 'quadratic'), ('dpmpp', 15, 'logsnr')]


@pytest.mark.parametrize('schedule_name', ['cosine', 'linear'])
@pytest.mark.parametrize('name,num_steps,spacing', DETERMINISTIC)
def test_deterministic_samplers_match_the_closed_form_per_sample(schedule_name, name, num_steps, spacing):
  """DDIM (eta = 0) and DPM-Solver++(2M) are affine maps of x_T here: each sample must be
  mu + c (x_T - a_start mu) with the gain c of the float64 recursions above, to about 1e-5. Unlike the
  distribution checks, this sees a wrong step ratio: on uniform spacing, h_prev / h for h / h_prev moves
  the 15-step gain by tens of percent."""
  ab = _alpha_bar(schedule_name, 1000)
  sched = schedules.make_schedule(schedule_name, 1000)
  x_T = _x_T()
  # From t = 960 (the cpu configs' start): at 999 the cosine schedule's first x0 estimate is a difference of
  # numbers of order 1 / sqrt(alpha_bar) ~ 2e4, whose float32 rounding alone reaches 1e-4.
  out = np.asarray(jax.jit(lambda x: samplers.sample(name, _gaussian_eps_fn(ab), sched, x, num_steps=num_steps,
                                                     spacing=spacing, start_t=960))(x_T), np.float64)
  ts = samplers.timestep_subsequence(sched, num_steps, spacing, start_t=960)
  assert len(ts) == num_steps and ts[0] == 960 and ts[-1] == 0
  c = _ddim_std(ab, ts, 0.0) if name == 'ddim' else _dpmpp_std(ab, ts)
  want = MU + c * (np.asarray(x_T, np.float64) - np.sqrt(ab[ts[0]]) * MU)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=0)


def test_dpmpp_more_steps_converge_to_s():
  """With 100 log-SNR-spaced steps the second-order solver is within sampling error of s itself."""
  ab = _alpha_bar('cosine', 1000)
  sched = schedules.make_schedule('cosine', 1000)
  out = jax.jit(lambda x: samplers.dpmpp_2m_sample(_gaussian_eps_fn(ab), sched, x, 100))(_x_T())
  assert abs(_dpmpp_std(ab, samplers.timestep_subsequence(sched, 100, 'logsnr')) / S - 1) < 0.005
  _check_gaussian(out, S)


START = 600   # alpha_bar = 0.34 under the cosine schedule: x_T ~ N(0, 1) is far from x_600's N(a mu, v)


def test_start_t_solves_from_x_T_as_if_it_were_x_start():
  """Started at t0 < T - 1, the probability-flow ODE maps x (taken as x_t0) to its data point.

  For Gaussian data the exact flow is x0 = mu + s (x - a mu) / sqrt(v) (a^2 = alpha_bar_t0,
  v = a^2 s^2 + 1 - a^2), so x ~ N(0, 1) gives mean mu (1 - a s / sqrt(v)) and std s / sqrt(v): both
  away from the data's (mu, s), so a sampler that ignored start_t fails. 100 log-SNR steps of
  DPM-Solver++ are within sampling error of the flow (test above).
  """
  ab = _alpha_bar('cosine', 1000)
  sched = schedules.make_schedule('cosine', 1000)
  a, v = np.sqrt(ab[START]), ab[START] * S ** 2 + 1 - ab[START]
  out = jax.jit(lambda x: samplers.sample('dpmpp', _gaussian_eps_fn(ab), sched, x, num_steps=100,
                                          start_t=START))(_x_T())
  _check_gaussian(out, S / np.sqrt(v), MU * (1 - a * S / np.sqrt(v)))


def test_start_t_ancestral_sampling_from_x_start():
  """Full DDPM from t0 visits t0, ..., 0 with x ~ N(0, 1) as x_t0 (deviation z = x - a mu of mean
  -a mu). The fixed-small-variance recursion gives the output's moments; it is close to sampling
  p(x0 | x_t0) exactly (mean mu + (a s^2 / v) z, variance s^2 - a^2 s^4 / v). With data spread s = 1
  the mean is pulled 0.34 mu towards 0, far outside sampling error, so ignoring start_t fails."""
  s = 1.0
  ab = _alpha_bar('cosine', 1000)
  sched = schedules.make_schedule('cosine', 1000)
  a2, v = ab[START], ab[START] * s ** 2 + 1 - ab[START]
  z_mean, want_std = _ancestral_moments(ab, np.arange(START, -1, -1), -np.sqrt(a2) * MU, s)
  exact_std = np.sqrt(s ** 2 - a2 * s ** 4 / v + a2 * s ** 4 / v ** 2)
  assert abs(want_std / exact_std - 1) < 0.02
  np.testing.assert_allclose(z_mean, -a2 * s ** 2 * MU / v, rtol=0.02)
  assert np.all(np.abs(z_mean) > Z * s / math.sqrt(N))   # outside the mean check's tolerance
  out = jax.jit(lambda x, rng: samplers.ddpm_sample(_gaussian_eps_fn(ab, s=s), sched, x, rng,
                                                    start_t=START))(_x_T(), _key(2))
  _check_gaussian(out, want_std, MU + z_mean)


@pytest.mark.parametrize('name', ['ddim', 'dpmpp'])
def test_point_mass_is_recovered_exactly(name):
  """With s = 0 the data prediction is the constant mu: deterministic solvers are then exact."""
  ab = _alpha_bar('cosine', 100)
  sched = schedules.make_schedule('cosine', 100)
  eps_fn = _gaussian_eps_fn(ab, s=0.0)
  x = _normal((64, 2, 2, 2), 3)
  out = jax.jit(lambda x: samplers.sample(name, eps_fn, sched, x, num_steps=5))(x)
  np.testing.assert_allclose(out, np.broadcast_to(MU, out.shape), atol=2e-4)


# ---- Cross-checks between samplers (a 100-step schedule keeps them fast). --------------------------

_AB100 = _alpha_bar('cosine', 100)
_TOWARD_ZERO = _gaussian_eps_fn(_AB100, mu=0.0, s=0.5)


def _wiggly_eps_fn(x, t):
  """A nonlinear, well-behaved predictor for a 100-step schedule: exact for N(0, 0.25) plus a ripple."""
  return _TOWARD_ZERO(x, t) + 0.05 * jnp.sin(3 * x)


def test_ddim_eta1_equals_ancestral_ddpm():
  """DDIM with eta = 1 and DDPM (full, and respaced to 10 steps) are one Markov chain written two
  ways (posterior mean/variance vs. DDIM's x0/eps split): same rng, same samples."""
  sched = schedules.make_schedule('cosine', 100)
  x = _normal((16, 2, 2, 3), 5)
  rng = _key(6)

  @jax.jit   # one jitted function: random-number code costs seconds to compile per jit on CPU
  def both(x):
    return [(samplers.ddpm_sample(_wiggly_eps_fn, sched, x, rng, num_steps=n),
             samplers.ddim_sample(_wiggly_eps_fn, sched, x, n, 1.0, rng)) for n in (100, 10)]

  for a, b in both(x):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert float(jnp.std(a)) > 0.1


def test_visited_timesteps_are_integer_and_in_order():
  sched = schedules.make_schedule('cosine', 100)
  seen = []

  def eps_fn(x, t):
    assert t.dtype == jnp.int32 and t.shape == (x.shape[0],)
    jax.debug.callback(lambda tt: seen.append(np.asarray(tt)), t, ordered=True)
    return jnp.zeros_like(x)

  x = jnp.ones((3, 2, 2, 1))
  for name, num_steps, spacing in [('ddim', 7, 'uniform'), ('dpmpp', 7, 'logsnr')]:
    seen.clear()
    jax.jit(lambda x: samplers.sample(name, eps_fn, sched, x, num_steps=num_steps))(x)
    jax.effects_barrier()
    visited = np.stack(seen)
    assert np.all(visited == visited[:, :1])               # one timestep per call for the batch
    np.testing.assert_array_equal(visited[:, 0],
                                  samplers.timestep_subsequence(sched, num_steps, spacing))
  seen.clear()
  jax.jit(lambda x: samplers.ddpm_sample(eps_fn, sched, x, _key(0)))(x)
  jax.effects_barrier()
  np.testing.assert_array_equal(np.stack(seen)[:, 0], np.arange(99, -1, -1))


# ---- Randomness, jit and arguments. ----------------------------------------------------------------

def test_seeds_are_reproducible_and_distinct():
  sched = schedules.make_schedule('cosine', 100)
  x = _normal((8, 4, 4, 3))
  run = jax.jit(lambda rng: (samplers.ddpm_sample(_wiggly_eps_fn, sched, x, rng),
                             samplers.ddim_sample(_wiggly_eps_fn, sched, x, 10, 0.5, rng)))
  first, again, other = run(_key(1)), run(_key(1)), run(_key(2))
  for a, b, c in zip(first, again, other):
    np.testing.assert_array_equal(a, b)
    assert float(jnp.mean(jnp.abs(a - c))) > 1e-2


def test_schedule_as_jit_argument():
  sched = schedules.make_schedule('linear', 100)
  x = _normal((4, 2, 2, 1))
  closed = jax.jit(lambda x: samplers.ddim_sample(_wiggly_eps_fn, sched, x, 8))(x)
  passed = jax.jit(lambda s, x: samplers.ddim_sample(_wiggly_eps_fn, s, x, 8))(sched, x)
  np.testing.assert_allclose(closed, passed, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='logsnr'):
    jax.jit(lambda s, x: samplers.dpmpp_2m_sample(_wiggly_eps_fn, s, x, 8))(sched, x)


def test_clip_denoised():
  """Channel 0 (data at 2 +- 0.1) is clipped to 1; channel 1 (-0.3 +- 0.1) never reaches the clip."""
  mu = np.array([2.0, -0.3])
  ab = _alpha_bar('cosine', 100)
  sched = schedules.make_schedule('cosine', 100)
  eps_fn = _gaussian_eps_fn(ab, mu=mu, s=0.1)
  x = _normal((256, 1, 1, 2))
  names = [('ddpm', None), ('ddim', 10), ('dpmpp', 10)]
  run = jax.jit(lambda x: [[samplers.sample(name, eps_fn, sched, x, num_steps=steps, rng=_key(1),
                                            clip_denoised=clip) for clip in (False, True)]
                           for name, steps in names])
  for (name, _), (free, clipped) in zip(names, run(x)):
    free, clipped = np.asarray(free), np.asarray(clipped)
    assert abs(free[..., 0].mean() - 2.0) < 0.05, name
    assert np.all(np.abs(clipped) <= 1.0), name
    assert np.mean(clipped[..., 0] == 1.0) > 0.9, name
    # Channels do not interact, so the unclipped channel follows the same path either way.
    np.testing.assert_allclose(clipped[..., 1], free[..., 1], atol=1e-4, err_msg=name)


def test_timestep_subsequence():
  sched = schedules.make_schedule('cosine', 1000)
  ts = samplers.timestep_subsequence(sched, 50)
  want = [int(999 - k * 999 / 49 + 0.5) for k in range(50)]
  np.testing.assert_array_equal(ts, want)
  assert ts.dtype == np.int32
  np.testing.assert_array_equal(samplers.timestep_subsequence(sched, 1), [999])
  for spacing in samplers.SPACINGS:
    for n in (2, 3, 37, 400, 999, 1000):
      ts = samplers.timestep_subsequence(sched, n, spacing)
      assert len(ts) == n and ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0), (spacing, n)
    np.testing.assert_array_equal(samplers.timestep_subsequence(sched, 1000, spacing),
                                  np.arange(999, -1, -1))
  # start_t: the same spacings over start_t..0; -1 and None mean T - 1.
  np.testing.assert_array_equal(samplers.timestep_subsequence(sched, 25, start_t=960),
                                np.arange(960, -1, -40))
  np.testing.assert_array_equal(samplers.timestep_subsequence(sched, 50, start_t=-1),
                                samplers.timestep_subsequence(sched, 50))
  for spacing in samplers.SPACINGS:
    for n in (2, 9, 400, 601):
      ts = samplers.timestep_subsequence(sched, n, spacing, start_t=600)
      assert len(ts) == n and ts[0] == 600 and ts[-1] == 0 and np.all(np.diff(ts) < 0), (spacing, n)
  np.testing.assert_array_equal(samplers.timestep_subsequence(sched, 1, start_t=7), [7])
  quad = samplers.timestep_subsequence(sched, 20, 'quadratic')
  assert np.all(np.diff(-np.diff(quad)) <= 1)               # gaps shrink towards t = 0
  # logsnr: where the lambda grid is fine, each visited timestep sits on its uniform lambda target.
  ab = _alpha_bar('cosine', 1000)
  lam = 0.5 * np.log(ab / (1 - ab))
  ts = samplers.timestep_subsequence(sched, 20, 'logsnr')
  targets = np.linspace(lam[-1], lam[0], 20)
  middle = (ts > 20) & (ts < 980)
  assert middle.sum() >= 8
  assert np.all(np.abs(lam[ts] - targets)[middle] < 0.05)


def test_num_steps_from_config():
  """Only ddpm asked for T or more steps runs every timestep (None); any other count passes through."""
  assert samplers.num_steps_from_config('ddpm', 1000, 1000) is None
  assert samplers.num_steps_from_config('ddpm', 1200, 1000) is None
  assert samplers.num_steps_from_config('ddpm', 999, 1000) == 999
  assert samplers.num_steps_from_config('ddim', 1000, 1000) == 1000
  assert samplers.num_steps_from_config('dpmpp', 25, 1000) == 25
  # From start_t = 960 there are 961 timesteps: 961 or more ddpm steps mean all of them.
  assert samplers.num_steps_from_config('ddpm', 961, 1000, 960) is None
  assert samplers.num_steps_from_config('ddpm', 980, 1000, 960) is None
  assert samplers.num_steps_from_config('ddpm', 960, 1000, 960) == 960
  assert samplers.num_steps_from_config('ddpm', 999, 1000, -1) == 999


def test_bad_arguments():
  sched = schedules.make_schedule('cosine', 100)
  x = jnp.zeros((2, 2, 2, 1))
  with pytest.raises(ValueError, match=r"'euler'.*ddpm.*ddim.*dpmpp"):
    samplers.sample('euler', _wiggly_eps_fn, sched, x, num_steps=5)
  with pytest.raises(ValueError, match='eta'):
    samplers.sample('dpmpp', _wiggly_eps_fn, sched, x, num_steps=5, eta=0.5)
  with pytest.raises(ValueError, match='eta'):
    samplers.ddim_sample(_wiggly_eps_fn, sched, x, 5, eta=1.5, rng=jax.random.key(0))
  with pytest.raises(ValueError, match='rng'):
    samplers.ddim_sample(_wiggly_eps_fn, sched, x, 5, eta=0.3)
  with pytest.raises(ValueError, match='rng'):
    samplers.sample('ddpm', _wiggly_eps_fn, sched, x)
  with pytest.raises(ValueError, match='num_steps'):
    samplers.sample('ddim', _wiggly_eps_fn, sched, x)
  with pytest.raises(ValueError, match='num_steps'):
    samplers.ddim_sample(_wiggly_eps_fn, sched, x, 101)
  with pytest.raises(ValueError, match='num_steps'):
    samplers.dpmpp_2m_sample(_wiggly_eps_fn, sched, x, 0)
  with pytest.raises(ValueError, match=r'num_steps must be an integer in \[1, 51\]'):
    samplers.ddim_sample(_wiggly_eps_fn, sched, x, 52, start_t=50)
  for bad in (0, 100, 2.5):
    with pytest.raises(ValueError, match='start_t'):
      samplers.timestep_subsequence(sched, 5, start_t=bad)
  with pytest.raises(ValueError, match="'cubic'"):
    samplers.timestep_subsequence(sched, 5, 'cubic')
  with pytest.raises(ValueError, match='shape'):
    samplers.ddim_sample(lambda x, t: x[:, :1], sched, x, 5)
