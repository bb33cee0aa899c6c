"""Model shapes, sizes against the published reference, zero-initialised outputs, aggregation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from idenc_jax import models


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_params(config):
  r, d = config.model.resolution, config.model.embed_dim
  x = jax.ShapeDtypeStruct((1, r, r, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  z = jax.ShapeDtypeStruct((1, d), jnp.float32)
  gen, enc = models.build_generator(config), models.build_encoder(config)
  gp = jax.eval_shape(lambda x, t, z: gen.init(jax.random.key(0), x, t, z), x, t, z)
  ep = jax.eval_shape(lambda x: enc.init(jax.random.key(0), x), x)
  return gen, enc, gp, ep


def test_paper_model_shapes_and_reference_size():
  """Paper config through eval_shape only (never materialised)."""
  config = get_config('paper')
  gen, enc, gp, ep = _abstract_params(config)
  out = jax.eval_shape(lambda p: gen.apply(p, jnp.zeros((2, 128, 128, 3)), jnp.zeros((2,), jnp.int32),
                                           jnp.zeros((2, 512))), gp)
  assert out.shape == (2, 128, 128, 3)
  emb = jax.eval_shape(lambda p: enc.apply(p, jnp.zeros((2, 128, 128, 3))), ep)
  assert emb.shape == (2, 512)
  # DiffAE's block structure (attention = qkv + output projection, no MLP) has 143.6M generator
  # parameters; our ViT-style attention blocks add a 4x MLP to each of the 11 attention blocks.
  config.model.mlp_ratio = 0
  _, _, gp0, _ = _abstract_params(config)
  assert abs(_count(gp0) / 1e6 - 143.6) / 143.6 < 0.01
  n_attn = 11
  mlp_params = n_attn * (2 * 512 * 2048 + 2048 + 512 + 2 * 512)  # mlp in/out + biases + LayerNorm
  assert _count(gp['params']) - _count(gp0['params']) == mlp_params


def test_cpu_config_is_small_enough_for_a_cpu():
  # About 0.8M parameters: sized so that its 2,000 training steps take ~13 minutes on 2 cores.
  gen, enc, gp, ep = _abstract_params(get_config('cpu'))
  assert 0.5e6 < _count(gp) + _count(ep) < 6e6


@pytest.fixture(scope='module')
def tiny():
  config = get_config('tiny')
  r, d = config.model.resolution, config.model.embed_dim
  gen, enc = models.build_generator(config), models.build_encoder(config)
  x = jnp.zeros((2, r, r, 3))
  gp = jax.jit(gen.init)(jax.random.key(0), x, jnp.zeros((2,), jnp.int32), jnp.zeros((2, d)))
  ep = jax.jit(enc.init)(jax.random.key(1), x)
  return config, gen, enc, gp, ep


def test_zero_initialised_generator_ignores_z(tiny):
  config, gen, _, gp, _ = tiny
  r, d = config.model.resolution, config.model.embed_dim
  # Perturb the (zero) output conv so the output is not trivially zero: z can only act through the
  # residual branches, whose last convs start at zero, so the output must still not depend on z.
  gp = jax.tree.map(lambda a: a, gp)
  gp['params']['conv_out']['kernel'] = jax.random.normal(jax.random.key(5), gp['params']['conv_out']['kernel'].shape)
  x = jax.random.normal(jax.random.key(2), (2, r, r, 3))
  t = jnp.array([3, 50])
  apply = jax.jit(gen.apply)
  out1 = apply(gp, x, t, jax.random.normal(jax.random.key(3), (2, d)))
  out2 = apply(gp, x, t, 10 * jax.random.normal(jax.random.key(4), (2, d)))
  out3 = apply(gp, x, t, None)
  np.testing.assert_array_equal(out1, out2)
  np.testing.assert_allclose(out1, out3, atol=1e-6)
  assert float(jnp.abs(out1).mean()) > 0
  assert float(jnp.abs(apply(gp, x + 1.0, t, None) - out3).mean()) > 0
  # Without the perturbation the whole output starts at exactly zero.
  assert float(jnp.abs(apply(tiny[3], x, t, None)).max()) == 0.0


def test_aggregate_is_permutation_invariant(tiny):
  config, _, enc, _, ep = tiny
  r = config.model.resolution
  refs = jax.random.uniform(jax.random.key(7), (5, r, r, 3), minval=-1, maxval=1)
  embed = jax.jit(lambda x: models.encoder.aggregate_embeddings(enc.apply(ep, x)))
  a = embed(refs)
  b = embed(refs[jnp.array([3, 1, 4, 0, 2])])
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert a.shape == (config.model.embed_dim,)
  np.testing.assert_allclose(embed(refs[:1]), enc.apply(ep, refs[:1])[0], rtol=1e-5, atol=1e-6)


def test_bad_shapes_raise(tiny):
  config, gen, enc, gp, ep = tiny
  r = config.model.resolution
  with pytest.raises(ValueError, match='expects'):
    gen.apply(gp, jnp.zeros((1, r * 2, r * 2, 3)), jnp.zeros((1,), jnp.int32), None)
  with pytest.raises(ValueError, match='identity embedding'):
    gen.apply(gp, jnp.zeros((1, r, r, 3)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match='NHWC'):
    enc.apply(ep, jnp.zeros((1, r, r)))
