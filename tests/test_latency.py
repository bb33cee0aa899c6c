"""The latency benchmark's PyTorch path is our sampler: with our weights copied in and the same starting noise,
`latency.torch_ddim` gives the images `generate.generate` gives (DDIM, clipping, identity guidance), so its
timing compares like with like; and the harness reports what it says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')   # a test dependency (requirements-test.txt)

from configs import base  # noqa: E402
from idenc_jax import models  # noqa: E402
from idenc_jax.diffusion import generate as generate_lib, samplers, schedules  # noqa: E402
from idenc_jax.perf import fixtures, latency, torch_model  # noqa: E402


def _setup(variant):
  config = base.get_config(variant)
  params = fixtures.model_params(config, 0)
  twin = torch_model.build(config)
  torch_model.load_flax_params(twin, params)
  twin.eval()
  return config, params, twin


@pytest.mark.parametrize('variant,guidance,steps', [('tiny', 1.0, 4), ('tiny', 3.0, 4), ('cpu', 5.0, 3)])
def test_torch_ddim_equals_our_sampler(variant, guidance, steps):
  config, params, twin = _setup(variant)
  schedule = schedules.from_config(config)
  start_t = samplers.check_start_t(config.diffusion.sample_start_t, schedule.timesteps)
  z = np.random.default_rng(1).standard_normal(config.model.embed_dim).astype(np.float32)
  rng, num, r = jax.random.key(3), 3, config.model.resolution
  ours = generate_lib.generate(models.build_generator(config), params['generator'], schedule, jnp.asarray(z), rng,
                               num=num, sampler='ddim', num_steps=steps, start_t=start_t, guidance=guidance)
  # generate's starting noise: the first half of its key's split.
  x_T = np.asarray(jax.random.normal(jax.random.split(rng)[0], (num, r, r, 3), jnp.float32))
  theirs = latency.torch_ddim(twin.generator, latency.ddim_tables(config, steps), torch.from_numpy(z),
                              torch.from_numpy(np.ascontiguousarray(x_T.transpose(0, 3, 1, 2))), guidance)
  theirs = theirs.numpy().transpose(0, 2, 3, 1)
  assert np.abs(np.asarray(ours)).max() > 0.1   # images, not a constant
  # float32 rounding of the two models (their outputs agree to 4e-6; tests/test_torch_reference.py checks
  # them), amplified by x0 = r x - rm1 eps at the noisy steps and by guidance (w eps_c - (w - 1) eps_u): at
  # w = 3 on an AVX-512 machine single pixels reached 1.7e-3, and 4.0e-3 once the fused norm sampled with its
  # inference form (as accurate against float64 numpy as the training form; another rounding). So all but
  # 0.1% of the pixels within 2e-3, a quarter of one uint8 level (2 / 255), every pixel within one level,
  # and the mean far below.
  diff = np.abs(theirs - np.asarray(ours))
  assert np.quantile(diff, 0.999) < 2e-3, np.quantile(diff, 0.999)
  assert diff.max() < 2 / 255, diff.max()
  assert diff.mean() < 1e-4, diff.mean()


def test_ddim_tables_follow_the_ddim_update():
  """The tables against DDIM's formulas in float64 numpy: x0 = (x - sqrt(1 - ab) eps) / sqrt(ab), the next
  x = sqrt(ab') x0 + sqrt(1 - ab') eps, ab' = 1 after the last step."""
  config = base.get_config('cpu')
  t = latency.ddim_tables(config, 5)
  ab = np.asarray(schedules.from_config(config).alphas_cumprod, np.float64)[t['ts']]
  ab_next = np.append(ab[1:], 1.0)
  assert t['ts'][0] == config.diffusion.sample_start_t and t['ts'][-1] == 0 and len(t['ts']) == 5
  np.testing.assert_allclose(t['r'], 1 / np.sqrt(ab), rtol=1e-5)
  np.testing.assert_allclose(t['rm1'], np.sqrt(1 / ab - 1), rtol=1e-4, atol=1e-5)  # ab: float32 near t = 0
  np.testing.assert_allclose(t['a_next'], np.sqrt(ab_next), rtol=1e-6)
  np.testing.assert_allclose(t['d'], np.sqrt(1 - ab_next), rtol=1e-4, atol=1e-5)


def test_measure_latency_reports_both_sides():
  config = base.get_config('tiny')
  rec = latency.measure_latency(config, images=2, steps=2, references=2, repeats=1, reference='torch')
  for side in ('jax', 'torch'):
    s = rec[side]
    assert s['total_ms'] == pytest.approx(s['embed_ms'] + s['generate_ms'])
    assert s['step_ms'] == pytest.approx(s['generate_ms'] / 2)
    assert s['first_call_s'] > 0
  assert rec['vs_torch'] == pytest.approx(rec['torch']['total_ms'] / rec['jax']['total_ms'])
  assert (rec['images'], rec['steps'], rec['references'], rec['resolution']) == (2, 2, 2, config.model.resolution)
  assert 'torch' in rec['torch']['framework'] and '|' in latency.format_table(rec)


def test_measure_latency_times_variants_in_the_same_turns():
  config = base.get_config('tiny')
  rec = latency.measure_latency(config, images=2, steps=2, references=2, repeats=2, reference='torch',
                                variants=['sampleynnon', 'sampleynnoff', 'config'])
  assert list(rec['variants']) == ['sampleynnon', 'sampleynnoff', 'config']
  assert rec['jax'] == {**{k: v for k, v in rec['variants']['sampleynnon'].items()
                           if k not in ('speedup', 'vs_torch')}, 'variant': 'sampleynnon'}
  for name, s in rec['variants'].items():
    assert s['speedup'] == pytest.approx(rec['jax']['total_ms'] / s['total_ms'])
    assert s['vs_torch'] == pytest.approx(rec['torch']['total_ms'] / s['total_ms'])
    assert f'| jax {name} |' in latency.format_table(rec)
  assert rec['variants']['sampleynnon']['speedup'] == 1.0
  # Variants that sampling cannot tell apart (a train-only lever) would time one program twice: refused.
  with pytest.raises(ValueError, match="'config' and 'ynnoff' compile the same sampling programs"):
    latency.measure_latency(config, images=1, steps=1, references=1, repeats=1, variants=['config', 'ynnoff'])
  # Without variants: the config as given, one row.
  rec = latency.measure_latency(config, images=1, steps=1, references=1, repeats=1)
  assert 'variants' not in rec and rec['jax']['variant'] == 'config' and '| jax |' in latency.format_table(rec)


def test_measure_latency_refuses_empty_requests():
  with pytest.raises(ValueError, match='images, steps, references and repeats must be >= 1'):
    latency.measure_latency(base.get_config('tiny'), images=0)
