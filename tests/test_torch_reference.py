"""The benchmark's PyTorch reference is the same function as our model: equal parameter counts (the paper
config too), equal outputs and an equal training loss and gradient on a fixed batch with our weights copied in
(jax's random draws fed to it), and FLOPs that agree with the analytic count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')   # a test dependency (requirements-test.txt); absent on 3.12 here

from configs import base  # noqa: E402
from idenc_jax import models  # noqa: E402
from idenc_jax.perf import fixtures, flops, torch_model, torch_reference  # noqa: E402
from idenc_jax.train import losses, state as state_lib  # noqa: E402


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize('variant,mlp_ratio', [('paper', None), ('paper', 0), ('cpu', None)])
def test_parameter_counts_are_equal(variant, mlp_ratio):
  config = base.get_config(variant)
  if mlp_ratio is not None:
    config.model.mlp_ratio = mlp_ratio
  abstract = jax.eval_shape(lambda k: state_lib.init_params(config, k), jax.random.key(0))
  ours = {part: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract[part]))
          for part in ('generator', 'encoder')}
  with torch.device('meta'):   # shapes only: the paper model needs no memory
    theirs = torch_model.num_params(torch_model.build(config))
  assert theirs == ours
  if variant == 'paper' and mlp_ratio == 0:   # DiffAE's attention blocks have no MLP: its 143.6M generator
    assert round(ours['generator'] / 1e6, 1) == 143.6, ours


@pytest.mark.parametrize('variant', ['tiny', 'cpu'])
def test_outputs_equal_with_our_weights(variant):
  config = base.get_config(variant)
  params = fixtures.model_params(config)
  twin = torch_model.build(config)
  torch_model.load_flax_params(twin, params)
  r, d = config.model.resolution, config.model.embed_dim
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, r, r, 3)).astype(np.float32)
  t = np.array([0, 10, 500, 999])
  z = rng.standard_normal((4, d)).astype(np.float32)
  null = np.array([False, True, False, True])
  ours = models.build_generator(config).apply({'params': params['generator']}, x, jnp.asarray(t), z,
                                               null_identity=null)
  ours_z = models.build_encoder(config).apply({'params': params['encoder']}, x)
  with torch.no_grad():
    theirs = twin.generator(_nchw(x), torch.from_numpy(t), torch.from_numpy(z), torch.from_numpy(null))
    theirs_z = twin.encoder(_nchw(x))
  np.testing.assert_allclose(theirs.numpy().transpose(0, 2, 3, 1), ours, atol=2e-5 * np.abs(ours).max())
  np.testing.assert_allclose(theirs_z.numpy(), ours_z, atol=2e-5 * np.abs(ours_z).max())


def _jax_draws(config, batch, rng, step):
  """The random numbers `losses.compute_loss` draws from `rng` (the same splits), NCHW for torch."""
  n_id, n_ag = len(batch['id_images']), len(batch['agnostic_images'])
  n, r = n_id + n_ag, config.model.resolution
  rng_t, rng_noise, _, rng_w, rng_cur = jax.random.split(rng, 5)
  lc = config.loss
  p = float(losses.curriculum_probability(step, lc.curriculum_start, lc.curriculum_end, lc.curriculum_steps))
  null = losses.null_identity_mask(jax.random.fold_in(rng, 7), n, lc.null_identity_prob)
  return torch_reference.Draws(
      t=torch.from_numpy(np.asarray(jax.random.randint(rng_t, (n,), 0, config.diffusion.timesteps), np.int64)),
      noise=_nchw(jax.random.normal(rng_noise, (n, r, r, 3), jnp.float32)),
      keep_group=torch.from_numpy(np.array(jax.random.uniform(rng_cur, (n_id // config.data.images_per_identity,))
                                           >= p)),
      exponential=torch.from_numpy(np.asarray(jax.random.exponential(rng_w, (n_id,)), np.float32)),
      null=None if null is None else torch.from_numpy(np.asarray(null)))


@pytest.mark.parametrize('variant,step,batch', [('tiny', 0, 16), ('tiny', 500, 32), ('cpu', 1000, 16)])
def test_training_loss_and_gradients_equal_ours(variant, step, batch):
  """cpu: min-SNR weighting and a 10% null-identity share; tiny: the paper's unweighted loss. At step 0 every
  group is dropped (curriculum p = 1), at the curriculum's end most are kept, and mid-way both occur."""
  config = base.get_config(variant)
  config.train.batch_size = batch
  seed = 0
  loss, metrics, grads = fixtures.fixed_batch_loss_and_grads(config, seed, step)
  params, batch = fixtures.model_params(config, seed), fixtures.synthetic_batch(config, seed)
  twin = torch_model.build(config)
  torch_model.load_flax_params(twin, params)
  draws = _jax_draws(config, batch, jax.random.key(seed + 7), step)
  kept = float(draws.keep_group.float().mean())
  assert {0: kept == 0, 1000: kept > 0, 500: 0 < kept < 1}[step], kept
  x_id, labels, groups, x_ag = torch_reference.torch_batch(batch)
  theirs, terms = torch_reference.loss_from_draws(config, twin, torch_reference.ScheduleTables(config), x_id,
                                                  labels, groups, x_ag, draws, step)
  theirs.backward()
  assert float(theirs.detach()) == pytest.approx(loss, rel=1e-5)
  for k in ('diff_id', 'diff_agnostic', 'id_loss'):
    assert float(terms[k]) == pytest.approx(float(metrics[k]), rel=1e-4, abs=1e-7), k
  ours_norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads)))
  theirs_norm = np.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in twin.parameters()))
  assert theirs_norm == pytest.approx(ours_norm, rel=1e-4)
  # One weight gradient compared element by element (HWIO vs OIHW).
  g_ours = np.asarray(grads['generator']['conv_in']['kernel']).transpose(3, 2, 0, 1)
  g_theirs = twin.generator.conv_in.weight.grad.numpy()
  np.testing.assert_allclose(g_theirs, g_ours, atol=1e-4 * np.abs(g_ours).max())


@pytest.mark.parametrize('variant', ['tiny', 'cpu'])
def test_flops_agree_with_the_analytic_count(variant):
  """PyTorch's counter (matrix products only; every tap of a padded convolution) against our analytic count
  in the same convention: within 1% (PyTorch skips the first convolutions' input gradients, 0.3% here)."""
  config = base.get_config(variant)
  theirs = torch_reference.TorchBench(config, threads=1).flops_per_image()
  ours = flops.training_flops_per_image(config, elementwise=False, count_padding=True)
  assert 0.99 * ours < theirs <= ours, (theirs, ours)


def test_timed_step_trains():
  """The timed step (torch's own draws, AdamW, clipping, EMA) runs, its loss is finite, and the EMA moved."""
  config = base.get_config('tiny')
  bench = torch_reference.TorchBench(config, threads=1)
  before = [e.clone() for e in bench.ema]
  for _ in range(3):
    bench.step()
  record = bench.finish(sample_batch=2, sample_repeats=1)
  assert record['finite'] and record['train_images_per_s'] > 0 and record['sample_step_ms'] > 0
  assert any(not torch.equal(a, b) for a, b in zip(before, bench.ema))
  assert record['params'] == {'generator': 251059, 'encoder': 125408}


def test_benchmark_times_the_torch_reference_in_turns(capsys, monkeypatch):
  """`benchmark --reference=torch --interleave`: a torch record after the variants, each variant's speed
  against it (vs_torch = images/s ratio), in the JSON and the table."""
  from test_benchmark import run_cli
  result = run_cli(monkeypatch, '--config=configs/base.py:tiny', '--variants=fp32', '--interleave', '--steps=2',
                   '--warmup=0', '--sample_batch=2', '--peak_flops=1e10', '--fast_compile', '--reference=torch')
  ours, ref = result['variants']
  assert ref['variant'] == 'torch' and ref['timed_steps'] == 2 and ref['finite']
  assert ref['params'] == {'generator': 251059, 'encoder': 125408}
  assert ours['vs_torch'] == pytest.approx(ours['train_images_per_s'] / ref['train_images_per_s'])
  assert ours['sample_vs_torch'] == pytest.approx(ref['sample_step_ms'] / ours['sample_step_ms'])
  table = capsys.readouterr().out
  assert 'vs torch' in table.splitlines()[0] and table.splitlines()[2].startswith('torch')
