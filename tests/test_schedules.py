"""Noise schedules and q_sample against closed forms computed here in float64 numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from idenc_jax.diffusion import schedules


def _f_cosine(u):
  return np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def _reference_cosine(T):
  """Nichol & Dhariwal (2021): alpha_bar(t) = f(t / T) / f(0), beta_t = min(1 - ab(t+1)/ab(t), 0.999)."""
  u = np.arange(T + 1, dtype=np.float64) / T
  betas = np.array([min(1 - _f_cosine(u[i + 1]) / _f_cosine(u[i]), 0.999) for i in range(T)])
  return betas, np.cumprod(1 - betas)


@pytest.mark.parametrize('T', [1000, 100])
def test_cosine_matches_closed_form(T):
  s = schedules.make_schedule('cosine', T)
  betas, ab = _reference_cosine(T)
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(s.alphas_cumprod, ab, rtol=1e-6, atol=1e-12)
  # Without clipping, alpha_bar at index t is f((t + 1) / T) / f(0) directly.
  direct = _f_cosine(np.arange(1, T) / T) / _f_cosine(0.0)
  np.testing.assert_allclose(s.alphas_cumprod[:-1], direct, rtol=1e-5)
  # f(1) = 0, so the last beta would be 1: the clip must be active exactly there.
  assert float(s.betas[-1]) == pytest.approx(0.999)
  assert np.all(np.asarray(s.betas[:-1]) < 0.999)
  assert float(s.alphas_cumprod[-1]) < 1e-5 and float(s.alphas_cumprod[-1]) > 0
  assert s.timesteps == T and s.name == 'cosine'


def test_linear_endpoints_and_scaling():
  s = schedules.make_schedule('linear', 1000)
  assert float(s.betas[0]) == pytest.approx(1e-4, rel=1e-6)
  assert float(s.betas[-1]) == pytest.approx(0.02, rel=1e-6)
  np.testing.assert_allclose(np.diff(np.asarray(s.betas, np.float64)), (0.02 - 1e-4) / 999, rtol=1e-3)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)),
                             rtol=1e-5)
  assert float(s.alphas_cumprod[-1]) < 1e-4        # exp(-sum beta) = exp(-10.05) ~ 4.3e-5
  # Other T: the improved-DDPM convention scales both ends by 1000 / T.
  s250 = schedules.make_schedule('linear', 250)
  assert float(s250.betas[0]) == pytest.approx(4e-4, rel=1e-6)
  assert float(s250.betas[-1]) == pytest.approx(0.08, rel=1e-6)


@pytest.mark.parametrize('name', ['cosine', 'linear'])
def test_monotone_and_derived_arrays(name):
  T = 1000
  s = schedules.make_schedule(name, T)
  for field in ('betas', 'alphas_cumprod', 'posterior_variance', 'posterior_mean_coef1'):
    arr = getattr(s, field)
    assert arr.dtype == jnp.float32 and arr.shape == (T,), field
  betas = _reference_cosine(T)[0] if name == 'cosine' else np.linspace(1e-4, 0.02, T)
  ab = np.cumprod(1 - betas)
  assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0) and float(s.alphas_cumprod[0]) < 1
  assert np.all(np.diff(np.asarray(s.betas)) >= 0)
  np.testing.assert_allclose(s.sqrt_alphas_cumprod ** 2, ab, rtol=1e-6)
  # Computed in float64: accurate even at t = 0 where 1 - alpha_bar ~ 4e-5.
  np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod ** 2, 1 - ab, rtol=1e-5)
  np.testing.assert_allclose(s.sqrt_recip_alphas_cumprod, 1 / np.sqrt(ab), rtol=1e-5)
  np.testing.assert_allclose(s.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / ab - 1), rtol=1e-5)
  np.testing.assert_allclose(s.alphas_cumprod_prev[1:], ab[:-1], rtol=1e-6)
  assert float(s.alphas_cumprod_prev[0]) == 1.0


@pytest.mark.parametrize('name', ['cosine', 'linear'])
def test_posterior_matches_gaussian_conditioning(name):
  """q(x_{t-1} | x_t, x_0) from conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0."""
  s = schedules.make_schedule(name, 1000)
  betas = _reference_cosine(1000)[0] if name == 'cosine' else np.linspace(1e-4, 0.02, 1000)
  ab = np.cumprod(1 - betas)
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  var_prev, var_t = 1 - ab_prev, 1 - ab                       # Var(x_{t-1} | x0), Var(x_t | x0)
  cov = np.sqrt(1 - betas) * var_prev                         # Cov(x_{t-1}, x_t | x0)
  coef2 = cov / var_t                                         # weight of x_t
  coef1 = np.sqrt(ab_prev) - coef2 * np.sqrt(ab)              # weight of x0
  post_var = var_prev - cov ** 2 / var_t
  np.testing.assert_allclose(s.posterior_mean_coef1, coef1, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(s.posterior_mean_coef2, coef2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(s.posterior_variance, post_var, rtol=1e-4, atol=1e-9)
  assert float(s.posterior_variance[0]) == 0.0
  np.testing.assert_allclose(s.posterior_log_variance_clipped[1:], np.log(post_var[1:]), rtol=1e-5)


def test_bad_arguments():
  with pytest.raises(ValueError, match=r"'sigmoid'.*cosine.*linear"):
    schedules.make_schedule('sigmoid', 1000)
  with pytest.raises(ValueError, match='timesteps'):
    schedules.make_schedule('cosine', 1)
  with pytest.raises(ValueError, match='timesteps'):
    schedules.make_schedule('cosine', 10.0)
  with pytest.raises(ValueError, match='linear'):
    schedules.make_schedule('linear', 20)   # beta_T would be 1


def test_from_config():
  s = schedules.from_config(base.get_config('tiny'))
  assert s.name == 'cosine' and s.timesteps == 100
  np.testing.assert_allclose(s.alphas_cumprod, _reference_cosine(100)[1], rtol=1e-6)
  cfg = base.get_config('tiny')
  cfg.diffusion.schedule = 'nope'
  with pytest.raises(ValueError, match='nope'):
    schedules.from_config(cfg)


def test_q_sample_exact_given_noise_nhwc():
  s = schedules.make_schedule('cosine', 1000)
  _, ab = _reference_cosine(1000)
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (3, 4, 5, 2)).astype(np.float32)
  noise = rng.normal(size=x0.shape).astype(np.float32)
  t = np.array([0, 500, 999], np.int32)
  want = (np.sqrt(ab[t])[:, None, None, None] * x0
          + np.sqrt(1 - ab[t])[:, None, None, None] * noise)
  got = jax.jit(schedules.q_sample)(s, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # And predict_x0_from_eps inverts it given the true noise.
  # predict_x0_from_eps inverts it given the true noise (t = 999 is too ill-conditioned in float32).
  back = schedules.predict_x0_from_eps(s, got[:2], jnp.asarray(t[:2]), jnp.asarray(noise[:2]))
  np.testing.assert_allclose(back, x0[:2], atol=1e-4)


def test_q_sample_moments():
  """Mean sqrt(ab) x0 and variance 1 - ab over many draws, within 5 standard errors."""
  s = schedules.make_schedule('linear', 1000)
  t = jnp.array([0, 250, 700, 999], jnp.int32)
  x0 = jnp.array([0.9, -0.5, 0.3, 1.0])[:, None, None, None] * jnp.ones((4, 1, 2, 3))
  draws = 20_000
  noise = np.random.default_rng(1).standard_normal((draws,) + x0.shape, dtype=np.float32)
  xt = jax.jit(jax.vmap(lambda n: schedules.q_sample(s, x0, t, n)))(noise)
  xt = np.asarray(xt, np.float64).reshape(draws, 4, -1)
  ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[np.asarray(t)]
  mean_want = np.sqrt(ab) * np.array([0.9, -0.5, 0.3, 1.0])
  var_want = 1 - ab
  mean = xt.mean(0)                                              # [4, 6]
  var = xt.var(0)
  se_mean = np.sqrt(var_want / draws)[:, None]
  se_var = (var_want * np.sqrt(2 / draws))[:, None]
  assert np.all(np.abs(mean - mean_want[:, None]) < 5 * se_mean)
  assert np.all(np.abs(var - var_want[:, None]) < 5 * se_var)


def test_q_sample_rejects_bad_timesteps():
  s = schedules.make_schedule('cosine', 100)
  x = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match='integers'):
    schedules.q_sample(s, x, jnp.array([0.5, 0.2]), x)
  with pytest.raises(ValueError, match='shape'):
    schedules.q_sample(s, x, jnp.array([1, 2, 3]), x)


def test_schedule_is_a_pytree():
  s = schedules.make_schedule('cosine', 50)
  leaves, treedef = jax.tree_util.tree_flatten(s)
  assert len(leaves) == 12 and all(leaf.shape == (50,) for leaf in leaves)
  s2 = jax.tree_util.tree_unflatten(treedef, leaves)
  assert s2.name == 'cosine'
  doubled = jax.jit(lambda sch: jax.tree_util.tree_map(lambda a: 2 * a, sch))(s)
  np.testing.assert_allclose(doubled.betas, 2 * np.asarray(s.betas))


def test_schedule_from_betas_validates():
  with pytest.raises(ValueError, match=r'\(0, 1\)'):
    schedules.schedule_from_betas(np.array([0.1, 1.0]))
  with pytest.raises(ValueError, match='1-D'):
    schedules.schedule_from_betas(np.full((2, 2), 0.1))
  s = schedules.schedule_from_betas(np.array([0.1, 0.2, 0.5]))
  np.testing.assert_allclose(s.alphas_cumprod, [0.9, 0.72, 0.36], rtol=1e-6)
