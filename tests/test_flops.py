"""Analytic FLOP counts against XLA's cost analysis, closed forms and the published reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from idenc_jax import models
from idenc_jax.perf import flops
from idenc_jax.models import layers

S = jax.ShapeDtypeStruct


def _abstract_vars(module, *args):
  return jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args)


def _xla_model_flops(config, batch=2, compile=True):
  """XLA's forward FLOPs per image of the generator and encoder, on abstract parameters only."""
  r, d = config.model.resolution, config.model.embed_dim
  x, t, z = S((batch, r, r, 3), jnp.float32), S((batch,), jnp.int32), S((batch, d), jnp.float32)
  gen, enc = models.build_generator(config), models.build_encoder(config)
  g = flops.xla_forward_flops(gen.apply, _abstract_vars(gen, x, t, z), x, t, z, compile=compile)
  e = flops.xla_forward_flops(enc.apply, _abstract_vars(enc, x), x, compile=compile)
  return g / batch, e / batch


def test_xla_flops_of_a_matmul_is_the_closed_form():
  a, b = S((3, 5, 7), jnp.float32), S((7, 11), jnp.float32)
  assert flops.xla_forward_flops(lambda a, b: a @ b, a, b) == 2 * 3 * 5 * 7 * 11
  # Nothing to count: cost analysis omits the key, which reads as zero.
  assert flops.xla_forward_flops(lambda a: a.reshape(-1), a) == 0.0


@pytest.mark.parametrize('n', [1, 2, 3, 4, 7])
@pytest.mark.parametrize('k', [1, 3, 5])
def test_valid_taps_equal_a_convolution_of_ones(n, k):
  # Each output position sees as many in-image taps as a 'same' convolution of ones sums there.
  expected = np.convolve(np.ones(n), np.ones(k), mode='full')[(k - 1) // 2:][:n].sum()
  assert flops._valid_taps(n, k) == expected


def test_single_conv_counts_only_taps_inside_the_image():
  conv = nn.Conv(16, (3, 3), padding=1, use_bias=False)
  x = S((1, 4, 4, 8), jnp.float32)
  xla = flops.xla_forward_flops(conv.apply, _abstract_vars(conv, x), x)
  assert xla == 2 * 8 * 16 * 10 * 10   # (3*4 - 2)^2 = 100 taps, not 9 * 16 = 144


def _both_counts(module, *args):
  """XLA's count of the compiled and of the lowered (unoptimised) module."""
  variables = _abstract_vars(module, *args)
  return [flops.xla_forward_flops(module.apply, variables, *args, compile=c) for c in (True, False)]


@pytest.mark.parametrize('resample,c_in', [('down', 16), ('up', 8)])   # 'up' with a 1x1 skip conv
def test_res_block_against_xla(resample, c_in):
  block = layers.ResBlock(16, num_groups=4, resample=resample)
  x, emb, cond = S((2, 8, 8, c_in), jnp.float32), S((2, 32), jnp.float32), S((2, 12), jnp.float32)
  t = flops._Tally()
  flops._res_block(t, 8, c_in, 16, resample, emb_dim=32, cond_dim=12)
  for xla in _both_counts(block, x, emb, cond):
    assert abs(2 * (t.matmul + t.elementwise) / xla - 1) < 0.02


def test_attention_block_against_xla():
  block = layers.AttentionBlock(num_heads=4, mlp_ratio=4)
  x = S((2, 8, 8, 32), jnp.float32)
  t = flops._Tally()
  flops._attention_block(t, 8, 32, 4, 4)
  # QK^T and AV alone: 2 products x 2 FLOPs x 64 queries x 64 keys x 32 channels.
  assert 2 * 2 * 64 * 64 * 32 < t.matmul
  compiled, lowered = _both_counts(block, x)
  # Optimisation moves XLA's count by well under 1%, so small configs below skip the backend
  # compile (the tiny config's compiled count is checked in test_summary).
  assert abs(compiled / lowered - 1) < 0.01
  assert abs(2 * (t.matmul + t.elementwise) / compiled - 1) < 0.02


@pytest.mark.parametrize('variant,compile', [('tiny', False), ('cpu', False), ('paper', True)])
def test_analytic_count_matches_xla(variant, compile):
  """The paper model goes through abstract shapes only; its compile takes ~10 s. Its convolutions are XLA's
  own here: on a CPU its config's 'auto' takes the im2col form on maps of 4x4 and less, which also multiplies
  the zero padding's taps (1.3% more on the encoder), arithmetic the analytic count leaves out by design."""
  config = get_config(variant)
  config.model.small_conv = 'xla'
  xla_gen, xla_enc = _xla_model_flops(config, compile=compile)
  assert abs(flops.generator_flops(config) / xla_gen - 1) < 0.02
  assert abs(flops.encoder_flops(config) / xla_enc - 1) < 0.02
  if variant == 'paper':
    # Convolutions and matmuls alone are within 1% of everything XLA counts at full size.
    assert abs(flops.generator_flops(config, elementwise=False) / xla_gen - 1) < 0.01
    assert abs(flops.encoder_flops(config, elementwise=False) / xla_enc - 1) < 0.01


def test_reference_convention_reproduces_published_generator_flops():
  """DiffAE blocks (no attention MLP), every padded tap counted: the published 138.7 GFLOP."""
  config = get_config('paper')
  config.model.mlp_ratio = 0
  gen = flops.generator_flops(config, elementwise=False, count_padding=True) / 1e9
  assert abs(gen - 138.7) < 0.05
  # Counting only in-image taps is 2.7% lower, as XLA does.
  valid = flops.generator_flops(config, elementwise=False) / 1e9
  assert 0.96 < valid / gen < 0.98


def test_identity_projections_and_training_flops():
  config = get_config('tiny')
  # Tiny generator residual blocks' output channels, in order (see test_summary for the layout);
  # each one's identity projection is a 32 -> c_out dense layer.
  c_outs = [16, 16, 32, 32, 32, 32, 32, 32, 16, 16]
  cond = flops.generator_flops(config, elementwise=False)
  uncond = flops.generator_flops(config, conditional=False, elementwise=False)
  assert cond - uncond == sum(2 * 32 * c for c in c_outs)
  assert flops.training_flops_per_image(config) == 3 * (
      flops.generator_flops(config) + flops.encoder_flops(config))
  config.stage = 0   # unconditional pre-training: no encoder, no identity projections
  assert flops.training_flops_per_image(config, elementwise=False) == 3 * uncond


def test_too_many_levels_is_a_clear_error():
  config = get_config('tiny')
  config.encoder.channel_mult = (1, 1, 1, 1, 1, 1)   # 16px cannot halve five times
  with pytest.raises(ValueError, match='encoder.channel_mult'):
    flops.encoder_flops(config)
  config.model.channel_mult = (1,) * 6
  with pytest.raises(ValueError, match='model.channel_mult'):
    flops.generator_flops(config)
