"""`idenc_jax.perf.summary`: parameter counts against hand counts, the JSON report, and the CLI."""

import json
import os
from pathlib import Path
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
import pytest

from configs.base import get_config
from idenc_jax.perf import flops, summary
from idenc_jax.models import layers

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ['generator_params', 'encoder_params', 'generator_gflops_per_image',
            'encoder_gflops_per_image', 'generator_gflops_analytic', 'encoder_gflops_analytic',
            'training_gflops_per_image', 'reference', 'relative_difference']


# ---- Hand counts (flax names in comments). --------------------------------------------------------------

def res_block_params(c_in, c_out, emb=0, cond=0):
  p = 2 * c_in                          # norm_0 scale + bias
  p += 9 * c_in * c_out + c_out         # conv_0 3x3
  p += 2 * c_out                        # norm_1
  if emb:
    p += emb * 2 * c_out + 2 * c_out    # emb_proj -> scale, shift
  if cond:
    p += cond * c_out + c_out           # cond_proj -> identity scale
  p += 9 * c_out * c_out + c_out        # conv_1 3x3
  if c_in != c_out:
    p += c_in * c_out + c_out           # skip 1x1
  return p


def attention_block_params(c, mlp_ratio):
  p = 2 * c + 4 * (c * c + c)           # ln_attn; query, key, value, out (heads x head_dim = c)
  if mlp_ratio:
    p += 2 * c + (c * mlp_ratio * c + mlp_ratio * c) + (mlp_ratio * c * c + c)   # ln_mlp, mlp_in/out
  return p


def tiny_generator_params(mlp_ratio=4, cond=32):
  """The tiny config's U-Net: base 16, mults (1, 2), one block per level, attention at 8x8, emb 64."""
  p = (16 * 64 + 64) + (64 * 64 + 64)   # time_embed: sinusoid(16) -> 64 -> 64
  p += 27 * 16 + 16                     # conv_in 3 -> 16
  blocks = [(16, 16), (16, 16),         # down_0_0, down_0_resample (16 -> 8 px)
            (16, 32),                   # down_1_0 + attention
            (32, 32), (32, 32),         # mid_0, mid_1 (+ mid attention)
            (32 + 32, 32), (32 + 16, 32), (32, 32),   # up_1_0, up_1_1 (+ attention each), up_1_resample
            (32 + 16, 16), (16 + 16, 16)]             # up_0_0, up_0_1 (skip channels concatenated)
  p += sum(res_block_params(ci, co, 64, cond) for ci, co in blocks)
  p += 4 * attention_block_params(32, mlp_ratio)
  return p + 2 * 16 + (9 * 16 * 3 + 3)  # norm_out, conv_out 16 -> 3


def tiny_encoder_params(mlp_ratio=4):
  """The tiny identity encoder: base 16, mults (1, 2, 2), one block per level, attention at 4x4."""
  p = 27 * 16 + 16
  blocks = [(16, 16), (16, 16), (16, 32), (32, 32), (32, 32), (32, 32), (32, 32)]
  p += sum(res_block_params(ci, co) for ci, co in blocks)
  p += 2 * attention_block_params(32, mlp_ratio)   # down_2_0 at 4x4, mid
  return p + 2 * 32 + (32 * 32 + 32)               # norm_out, proj -> 32


def _flax_count(module, *shapes):
  variables = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a),
                             *(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))
  return summary.count_params(variables)


def test_hand_counts_of_single_blocks():
  # up_1_1 of the tiny generator: 48 -> 32 channels, timestep embedding 64, identity embedding 32.
  assert res_block_params(48, 32, 64, 32) == 96 + 13856 + 64 + 4160 + 1056 + 9248 + 1568 == 30048
  assert _flax_count(layers.ResBlock(32, num_groups=4), (1, 8, 8, 48), (1, 64), (1, 32)) == 30048
  assert attention_block_params(32, 4) == 64 + 4 * 1056 + 64 + 4224 + 4128 == 12704
  assert _flax_count(layers.AttentionBlock(num_heads=2, mlp_ratio=4), (1, 8, 8, 32)) == 12704
  assert _flax_count(layers.AttentionBlock(num_heads=2, mlp_ratio=0), (1, 8, 8, 32)) == 4288


@pytest.fixture(scope='module')
def tiny_summary():
  return summary.summarize(get_config('tiny'))


def test_summary_of_tiny_config(tiny_summary):
  s = json.loads(json.dumps(tiny_summary))   # plain JSON types only
  assert all(k in s for k in REQUIRED)
  assert s['generator_params'] == tiny_generator_params()
  assert s['encoder_params'] == tiny_encoder_params()
  for part in ('generator', 'encoder'):
    xla, analytic = s[f'{part}_gflops_per_image'], s[f'{part}_gflops_analytic']
    assert xla > 0 and abs(analytic / xla - 1) < 0.02
  expected_train = 3 * (s['generator_gflops_analytic'] + s['encoder_gflops_analytic'])
  assert s['training_gflops_per_image'] == pytest.approx(expected_train, rel=1e-4)
  ref = s['reference']
  assert ref['generator_params'] == 143.6e6 and ref['encoder_gflops_per_image'] == 17.7
  assert ref['training_gflops_per_image'] == pytest.approx(3 * (138.7 + 17.7))
  for key, value in ref.items():
    assert s['relative_difference'][key] == pytest.approx(s[key] / value - 1, rel=1e-3)


def test_stage2_config_is_summarised_as_its_stage1_model(monkeypatch):
  # Only the model selection is under test here, so XLA's count is replaced by a constant.
  monkeypatch.setattr(flops, 'xla_forward_flops', lambda fn, *args, **kw: 1e9)
  config = get_config('tiny')
  config.stage = 2
  s = summary.summarize(config)
  assert s['stage'] == 1 and s['notes']
  assert s['generator_params'] == tiny_generator_params()
  assert s['generator_gflops_per_image'] == 1.0
  assert config.stage == 2   # the caller's config is left alone


def test_cli_prints_one_json_object_without_tensorflow():
  """Stage 0 without the attention MLPs: checks the variant list and a command-line override."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-X', 'importtime', '-m', 'idenc_jax.perf.summary',
       '--config=configs/base.py:tiny,stage0', '--config.model.mlp_ratio=0'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  s = json.loads(proc.stdout)
  assert all(k in s for k in REQUIRED)
  assert s['stage'] == 0
  assert s['generator_params'] == tiny_generator_params(mlp_ratio=0, cond=0)
  assert s['encoder_params'] == tiny_encoder_params(mlp_ratio=0)
  imported = [line.rsplit('|', 1)[-1].strip() for line in proc.stderr.splitlines()
              if line.startswith('import time:')]
  assert 'jax' in imported
  assert not [m for m in imported if m == 'tensorflow' or m.startswith('tensorflow.')]


def test_config_flag_is_locked_and_takes_overrides(monkeypatch):
  for override in ('mlp_ratio', 'mlp_ration'):
    argv = [__file__, f'--config={REPO}/configs/base.py:tiny', f'--config.model.{override}=0']
    monkeypatch.setattr(sys, 'argv', argv)   # where ml_collections looks for --config.* overrides
    fv = flags.FlagValues()
    summary.define_flags(fv)
    if override == 'mlp_ratio':
      fv(argv)
      assert fv.config.model.mlp_ratio == 0 and fv.config.model.resolution == 16
    else:   # misspelt: the locked config rejects it
      with pytest.raises((flags.Error, AttributeError), match='mlp_ration'):
        fv(argv)
