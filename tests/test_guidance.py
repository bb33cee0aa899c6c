"""Identity guidance: the arithmetic, w = 1 bit for bit, every sampler against the Gaussian closed form, and the
generator's null-identity path.

For Gaussian data N(mu, s^2 I) the optimal predictor is eps(x, t) = b (x - a mu) / (a^2 s^2 + b^2) (see
test_samplers), affine in mu. A model whose conditional branch is exact for mean mu_c and unconditional branch
for mu_u therefore has the guided predictor eps_u + w (eps_c - eps_u) = the exact predictor for the mean
mu_w = mu_u + w (mu_c - mu_u). Deterministic samplers are affine in x_T, so each guided sample must equal
mu_w + c (x_T - a_start mu_w) with the gain c of the float64 recursions in test_samplers (written from the
papers, not from the library): a per-sample check to about 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from idenc_jax import models
from idenc_jax.data import batch_layout
from idenc_jax.diffusion import consistency, generate, guidance, samplers, schedules
from idenc_jax.train import losses

from test_personalize import random_params, shrink  # noqa: E402
from test_samplers import _alpha_bar, _ancestral_std, _check_gaussian, _ddim_std, _dpmpp_std, _gaussian_eps_fn  # noqa: E402,E501
from test_samplers import _key, _x_T  # noqa: E402

MU_C = np.array([0.5, -0.3])
MU_U = np.array([0.1, 0.2])


def _two_branch_model(ab, calls):
  """model_fn(x, t, null): exact eps for mean MU_C where null is False, for MU_U where it is True."""
  eps_c, eps_u = _gaussian_eps_fn(ab, MU_C), _gaussian_eps_fn(ab, MU_U)

  def model_fn(x, t, null):
    calls.append((x.shape[0], None if null is None else null.shape))
    if null is None:
      return eps_c(x, t)
    return jnp.where(null[:, None, None, None], eps_u(x, t), eps_c(x, t))
  return model_fn


def test_combine_against_numpy():
  rng = np.random.default_rng(0)
  c, u = rng.standard_normal((2, 3, 4, 4, 3)).astype(np.float32)
  for w in (0.0, 1.0, 2.5, 7.0):
    np.testing.assert_allclose(guidance.combine(jnp.asarray(c), jnp.asarray(u), w), u + w * (c - u), rtol=1e-6,
                               atol=1e-6)


def test_one_batched_call_per_step_and_w1_calls_once_unmasked():
  ab = _alpha_bar('cosine', 1000)
  calls = []
  fn = guidance.guided_eps_fn(_two_branch_model(ab, calls), 3.0)
  x = _x_T()[:8]
  fn(x, jnp.full((8,), 500, jnp.int32))
  assert calls == [(16, (16,))]      # [x; x] in one call, the second half unconditional
  calls.clear()
  guidance.guided_eps_fn(_two_branch_model(ab, calls), 1.0)(x, jnp.full((8,), 500, jnp.int32))
  assert calls == [(8, None)]


@pytest.mark.parametrize('w', [0.0, 2.0, 4.0])
@pytest.mark.parametrize('name,num_steps,spacing', [('ddim', 20, 'uniform'), ('dpmpp', 15, 'logsnr'),
                                                    ('dpmpp', 15, 'uniform')])
def test_deterministic_guided_samplers_match_the_closed_form_per_sample(name, num_steps, spacing, w):
  ab = _alpha_bar('cosine', 1000)
  sched = schedules.make_schedule('cosine', 1000)
  mu_w = MU_U + w * (MU_C - MU_U)
  eps_fn = guidance.guided_eps_fn(_two_branch_model(ab, []), w)
  x_T = _x_T()
  # From t = 960 (the cpu configs' start): at 999 the first x0 estimate is a difference of two numbers of
  # order 1 / sqrt(alpha_bar) ~ 2e4, whose float32 rounding alone reaches 1e-4 in the output.
  out = np.asarray(jax.jit(lambda x: samplers.sample(name, eps_fn, sched, x, num_steps=num_steps,
                                                     spacing=spacing, start_t=960))(x_T), np.float64)
  ts = samplers.timestep_subsequence(sched, num_steps, spacing, start_t=960)
  c = _ddim_std(ab, ts, 0.0) if name == 'ddim' else _dpmpp_std(ab, ts)
  want = mu_w + c * (np.asarray(x_T, np.float64) - np.sqrt(ab[ts[0]]) * mu_w)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize('w', [0.0, 3.0])
@pytest.mark.parametrize('name,eta', [('ddpm', 0.0), ('ddim', 1.0)])
def test_guided_stochastic_samplers_sample_the_guided_gaussian(name, eta, w):
  ab = _alpha_bar('cosine', 1000)
  sched = schedules.make_schedule('cosine', 1000)
  mu_w = MU_U + w * (MU_C - MU_U)
  guided = guidance.guided_eps_fn(_two_branch_model(ab, []), w)
  run = lambda fn: jax.jit(lambda x, k: samplers.sample(name, fn, sched, x, num_steps=100, eta=eta, rng=k))(
      _x_T(), _key(3))
  out = run(guided)
  # Same noise, same affine steps: equal to the sampler of the single-mean predictor up to rounding ...
  np.testing.assert_allclose(out, run(_gaussian_eps_fn(ab, mu_w)), atol=2e-5, rtol=0)
  # ... and distributed as the guided Gaussian: mean mu_w, the std the float64 recursion predicts.
  ts = samplers.timestep_subsequence(sched, 100)
  _check_gaussian(out, _ancestral_std(ab, ts) if name == 'ddpm' else _ddim_std(ab, ts, 1.0), want_mean=mu_w)


def test_guided_consistent_sampler_equals_consistency_on_the_guided_mean():
  """Stage 2's data consistency wraps the guided eps: the projection sees the guided x0_hat."""
  ab = _alpha_bar('cosine', 1000)
  sched = schedules.make_schedule('cosine', 1000)
  w, target = 2.5, jnp.asarray([0.0, 0.4])
  project = lambda x0: x0.at[..., 1].set(target[1])     # channel 1 known, channel 0 left to the model
  mu_w = MU_U + w * (MU_C - MU_U)
  guided = consistency.consistent_eps_fn(guidance.guided_eps_fn(_two_branch_model(ab, []), w), sched, project,
                                         clip=False)
  reference = consistency.consistent_eps_fn(_gaussian_eps_fn(ab, mu_w), sched, project, clip=False)
  run = lambda fn: jax.jit(lambda x: samplers.ddim_sample(fn, sched, x, 20, start_t=960))(_x_T())
  out, want = np.asarray(run(guided)), np.asarray(run(reference))
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=0)
  np.testing.assert_allclose(out[..., 1], 0.4, atol=1e-5)   # the known channel is the input's
  # The free channel follows the guided Gaussian's closed form, sample by sample.
  ts = samplers.timestep_subsequence(sched, 20, start_t=960)
  x_T = np.asarray(_x_T(), np.float64)[..., 0]
  np.testing.assert_allclose(out[..., 0], mu_w[0] + _ddim_std(ab, ts, 0.0) * (x_T - np.sqrt(ab[ts[0]]) * mu_w[0]),
                             atol=2e-5, rtol=0)


def test_check_guidance_and_sweep_parsing():
  assert guidance.parse_guidance_sweep('1, 2,3.5') == [1.0, 2.0, 3.5]
  assert guidance.parse_guidance_sweep('') == []
  for bad in ('-1', 'nan', 'inf', 'x'):
    with pytest.raises(ValueError, match='guidance'):
      guidance.parse_guidance_sweep(bad)
  with pytest.raises(ValueError, match='guidance'):
    guidance.check_guidance(True)


# ---- The generator's null-identity path. ------------------------------------------------------------------

def _tiny(**loss):
  c = base.get_config('tiny')
  shrink(c)
  for k, v in loss.items():
    c.loss[k] = v
  return c


@pytest.mark.parametrize('group_norm', ['flax', 'fused'])
def test_null_identity_is_exactly_the_unconditional_path(group_norm):
  config = _tiny()
  config.model.group_norm = group_norm
  gen = models.build_generator(config)
  params = random_params(config)['generator']
  rng = np.random.default_rng(0)
  r = config.model.resolution
  x = jnp.asarray(rng.standard_normal((4, r, r, 3)), jnp.float32)
  t = jnp.asarray([3, 50, 70, 99], jnp.int32)
  z = jnp.asarray(rng.standard_normal((4, config.model.embed_dim)), jnp.float32)
  null = jnp.asarray([False, True, False, True])
  apply = jax.jit(lambda *a, **k: gen.apply({'params': params}, *a, **k), static_argnames=())
  mixed = np.asarray(apply(x, t, z, null_identity=null))
  cond = np.asarray(apply(x, t, z))
  uncond = np.asarray(apply(x, t, None))
  np.testing.assert_array_equal(mixed[[0, 2]], cond[[0, 2]])
  np.testing.assert_array_equal(mixed[[1, 3]], uncond[[1, 3]])
  assert np.abs(cond - uncond).max() > 1e-3     # z matters, so the check above is not vacuous


def test_w1_generation_is_bit_for_bit_the_unguided_sampler():
  config = _tiny()
  gen = models.build_generator(config)
  params = random_params(config)['generator']
  sched = schedules.from_config(config)
  z = jnp.asarray(np.random.default_rng(1).standard_normal(config.model.embed_dim), jnp.float32)
  key = jax.random.key(5)
  for sampler in ('ddim', 'dpmpp', 'ddpm'):
    got = generate.generate(gen, params, sched, z, key, num=3, sampler=sampler, num_steps=4, guidance=1.0)
    # The sampler as it was before guidance existed: the generator called directly.
    rng_x, rng_s = jax.random.split(key)
    x_T = jax.random.normal(rng_x, (3, config.model.resolution, config.model.resolution, 3), jnp.float32)
    eps_fn = lambda x, t: gen.apply({'params': params}, x, t, jnp.broadcast_to(z, (3, z.shape[0])))
    want = jnp.clip(samplers.sample(sampler, eps_fn, sched, x_T, num_steps=4, rng=None if sampler == 'dpmpp'
                                    else rng_s, clip_denoised=True), -1, 1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=sampler)
    guided = generate.generate(gen, params, sched, z, key, num=3, sampler=sampler, num_steps=4, guidance=3.0)
    assert np.abs(np.asarray(guided) - np.asarray(got)).max() > 1e-4, sampler


def test_guidance_needs_an_embedding():
  config = _tiny()
  gen = models.build_generator(config)
  with pytest.raises(ValueError, match='needs an identity embedding'):
    generate.generate(gen, {}, schedules.from_config(config), None, jax.random.key(0), num=1, guidance=2.0)


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  r, m = config.model.resolution, config.data.images_per_identity
  n_id = config.train.batch_size - batch_layout.agnostic_size(config)
  return {'id_images': rng.integers(0, 256, (n_id, r, r, 3), dtype=np.uint8),
          'id_labels': np.repeat(np.arange(n_id // m), m).astype(np.int32),
          'id_groups': np.repeat(np.arange(n_id // m), m).astype(np.int32),
          'agnostic_images': rng.integers(0, 256, (config.train.batch_size - n_id, r, r, 3), dtype=np.uint8)}


def _grads(config, params, batch):
  gen, enc = models.build_generator(config), models.build_encoder(config)
  fn = lambda p: losses.compute_loss(p, batch, jax.random.key(2), 10_000, config=config, generator=gen, encoder=enc,
                                     schedule=schedules.from_config(config))
  (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
  return float(loss), metrics, grads


def _cond_proj_norm(grads):
  leaves = [v for k, v in jax.tree_util.tree_leaves_with_path(grads['generator'])
            if 'cond_proj' in jax.tree_util.keystr(k)]
  assert leaves
  return float(sum(jnp.sum(v ** 2) for v in leaves))


def test_null_identity_training_trains_the_unconditional_branch():
  config = _tiny(null_identity_prob=0.5)
  params = random_params(config)
  batch = _batch(config)
  loss, metrics, grads = _grads(config, params, batch)
  assert np.isfinite(loss) and 0.2 < float(metrics['null_identity_fraction']) < 0.8
  # Almost every image unconditional: z's projection gets (numerically) no gradient, the rest of the generator
  # still learns; with no null images the projection learns too.
  _, m_all, g_all = _grads(_tiny(null_identity_prob=0.9999), params, batch)
  assert float(m_all['null_identity_fraction']) == 1.0
  assert _cond_proj_norm(g_all) == 0.0
  conv_in = float(jnp.sum(g_all['generator']['conv_in']['kernel'] ** 2))
  assert conv_in > 0
  _, m_none, g_none = _grads(_tiny(), params, batch)
  assert 'null_identity_fraction' not in m_none and _cond_proj_norm(g_none) > 0


def test_null_identity_prob_is_checked():
  with pytest.raises(ValueError, match='null_identity_prob'):
    losses.null_identity_mask(jax.random.key(0), 4, 1.0)
  assert losses.null_identity_mask(jax.random.key(0), 4, 0.0) is None
