"""Tests of the fine-tuning baseline: it fits the references and never touches the trained parameters."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base

from idenc_jax import models  # noqa: E402
from idenc_jax.experiments import finetune_compare  # noqa: E402
from idenc_jax.personalize import finetune  # noqa: E402
from idenc_jax.data import synthetic  # noqa: E402
from idenc_jax.diffusion import schedules  # noqa: E402

from test_personalize import random_params, save_checkpoint, shrink  # noqa: E402  pylint: disable=wrong-import-position


def _config():
  c = base.get_config('tiny')
  shrink(c)
  c.finetune.steps = 12
  c.finetune.learning_rate = 1e-3
  c.finetune.num_identities = 2
  c.eval.steps = 2
  return c


def _numpy_loss(config, gen_params, z, refs, t, noise):
  """Independent loss: the generator applied to hand-noised references, squared error averaged in numpy."""
  sched = schedules.from_config(config)
  ab = np.asarray(sched.alphas_cumprod, np.float64)[t][:, None, None, None]
  x0 = np.tile(refs, (len(t) // len(refs), 1, 1, 1))
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
  gen = models.build_generator(config)
  eps = jax.jit(gen.apply)({'params': gen_params}, jnp.asarray(x_t, jnp.float32), jnp.asarray(t),
                           jnp.broadcast_to(jnp.asarray(z), (len(t), len(z))))
  return float(np.mean((np.asarray(eps, np.float64) - noise) ** 2))


def test_finetuning_fits_references_and_keeps_original_parameters():
  config = _config()
  params = random_params(config, seed=1)
  before = jax.tree.map(lambda x: np.array(x, copy=True), params['generator'])
  gen_params = jax.tree.map(jnp.asarray, params['generator'])
  images, _ = synthetic.render_identities(1, 3, config.model.resolution, seed=0, split='test')
  refs = images.astype(np.float32) / 127.5 - 1.0

  tuned, z, hist = finetune.make_finetuner(config)(gen_params, jnp.asarray(refs), jax.random.key(0))
  assert np.asarray(hist).shape == (config.finetune.steps,) and np.all(np.isfinite(hist))

  rng = np.random.default_rng(0)
  t = rng.integers(0, config.diffusion.timesteps, 8 * len(refs))
  noise = rng.standard_normal((len(t),) + refs.shape[1:])
  start = _numpy_loss(config, before, np.zeros(config.model.embed_dim, np.float32), refs, t, noise)
  end = _numpy_loss(config, tuned, np.asarray(z), refs, t, noise)
  assert end < 0.8 * start, (start, end)
  assert np.abs(np.asarray(z)).max() > 0            # the identity vector was learned from zero

  # The trained parameters are untouched (neither modified nor donated).
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, gen_params), before)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), tuned, before))
  assert any(changed)


def test_compare_times_and_evaluates_both_methods(tmp_path):
  config = _config()
  workdir = str(tmp_path / 'trained')
  save_checkpoint(config, random_params(config), workdir)
  result = finetune_compare.compare(config, workdir)
  for method in ('encoder', 'finetune'):
    m = result[method]
    assert m['personalize_seconds'] > 0 and m['compile_seconds'] >= 0
    assert m['num_generated'] == 2 * config.eval.num_generated
    assert m['oracle_chance'] == pytest.approx(1 / config.data.synthetic_test_identities)  # gallery: all
    assert 0 <= m['oracle_id_accuracy'] <= 1 and m['diversity'] >= 0
  assert result['speedup_encoder_vs_finetune'] == pytest.approx(
      result['finetune']['personalize_seconds'] / result['encoder']['personalize_seconds'])
  with open(os.path.join(workdir, 'eval', 'finetune.json')) as f:
    assert json.load(f)['settings']['num_identities'] == 2
  assert 'fine-tuning' in open(os.path.join(workdir, 'eval', 'finetune.md')).read()


def test_finetuning_compiles_with_the_train_steps_compiler_options():
  # The configs keep XLA:CPU's YNNPACK fusions from their kernel gradients (docs/performance.md);
  # fine-tuning runs the same gradients, so it compiles with the same options. 32 channels: the width from
  # which jax 0.10's default hands kernel gradients to YNNPACK.
  def compiled_text(options):
    c = _config()
    c.model.base_channels = 32
    c.finetune.steps = 2
    c.train.compiler_options = options
    gen_params = models.build_generator(c).init(
        jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 32)))['params']
    refs = jnp.zeros((2, 16, 16, 3), jnp.float32)
    return finetune.make_finetuner(c).lower(gen_params, refs, jax.random.key(0)).compile().as_text()

  with pytest.raises(Exception, match='xla_cpu_no_such_option'):   # the options reach XLA, on any version
    compiled_text('xla_cpu_no_such_option=true')
  assert 'ynn_fusion' not in compiled_text('xla_cpu_experimental_ynn_fusion_type=')
  assert 'ynn_fusion' in compiled_text('') or jax.__version_info__ >= (0, 11), 'the default no longer uses YNNPACK'
