"""Losses against direct numpy implementations of the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from idenc_jax import models
from idenc_jax.train import losses
from idenc_jax.diffusion import schedules


def snn_numpy(z, labels, temperature, valid=None):
  """SPEC.md formula, literally: mean over anchors with a same-label partner."""
  z = np.asarray(z, np.float64)
  n = len(z)
  valid = np.ones(n, bool) if valid is None else np.asarray(valid)
  terms = []
  for k in range(n):
    if not valid[k]:
      continue
    num = den = 0.0
    has_partner = False
    for j in range(n):
      if j == k or not valid[j]:
        continue
      e = np.exp(-np.sum((z[k] - z[j]) ** 2) / temperature)
      den += e
      if labels[j] == labels[k]:
        num += e
        has_partner = True
    if has_partner:
      terms.append(-np.log(num / den))
  return np.mean(terms) if terms else 0.0


@pytest.mark.parametrize('temperature', [0.5, 2.0, 10.0])
def test_snn_matches_numpy_including_singletons(temperature):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(10, 6)).astype(np.float32)
  labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 4])  # identities 2 and 4 are singletons
  got = losses.soft_nearest_neighbor_loss(jnp.asarray(z), jnp.asarray(labels), temperature)
  np.testing.assert_allclose(got, snn_numpy(z, labels, temperature), rtol=1e-4, atol=1e-5)


def test_snn_valid_mask_and_no_anchor_case():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(8, 4)).astype(np.float32)
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  valid = np.array([1, 1, 0, 0, 1, 1, 1, 0], bool)
  got = losses.soft_nearest_neighbor_loss(z, labels, 1.0, valid=jnp.asarray(valid))
  np.testing.assert_allclose(got, snn_numpy(z, labels, 1.0, valid), rtol=1e-4, atol=1e-5)
  # All singletons: no anchor qualifies -> exactly zero, never NaN.
  got = losses.soft_nearest_neighbor_loss(z, np.arange(8), 1.0)
  assert float(got) == 0.0


def test_snn_far_apart_embeddings_do_not_underflow():
  z = jnp.array([[0.0, 0.0], [0.1, 0.0], [100.0, 0.0], [100.1, 0.0]])
  got = losses.soft_nearest_neighbor_loss(z, jnp.array([0, 0, 1, 1]), 0.01)
  assert np.isfinite(float(got)) and float(got) < 1e-6
  # Swapped labels: every anchor's partner is far away -> huge but finite loss.
  got = losses.soft_nearest_neighbor_loss(z, jnp.array([0, 1, 0, 1]), 0.01)
  assert np.isfinite(float(got)) and float(got) > 1e4


def test_snn_gradient_pulls_same_identity_together():
  z = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  labels = jnp.array([0, 0, 1, 1])
  g = jax.grad(losses.soft_nearest_neighbor_loss)(z, labels, 1.0)
  z_new = z - 0.1 * g
  d = lambda a: float(jnp.sum((a[0] - a[1]) ** 2) + jnp.sum((a[2] - a[3]) ** 2))
  cross = lambda a: float(jnp.sum((a[0] - a[2]) ** 2) + jnp.sum((a[1] - a[3]) ** 2))
  assert d(z_new) < d(z)
  assert cross(z_new) > cross(z)


def test_convex_weights_on_simplex_and_uniform():
  groups = jnp.repeat(jnp.arange(3), jnp.array([2, 3, 4]), total_repeat_length=9)
  w = losses.convex_weights(jax.random.key(0), groups, 3)
  assert (w >= 0).all()
  np.testing.assert_allclose(jax.ops.segment_sum(w, groups, num_segments=3), 1.0, rtol=1e-6)
  # Dirichlet(1) over 4 members: each weight has mean 1/4 and variance (1/4)(3/4)/5 = 0.0375.
  ws = jax.vmap(lambda k: losses.convex_weights(k, groups, 3))(jax.random.split(jax.random.key(1), 20000))
  last = np.asarray(ws[:, 5:])
  np.testing.assert_allclose(last.mean(0), 0.25, atol=0.01)
  np.testing.assert_allclose(last.var(0), 0.0375, atol=0.003)


def test_group_embeddings_is_weighted_sum():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(6, 3))
  groups = np.array([0, 0, 1, 1, 1, 2])
  w = np.array([0.3, 0.7, 0.2, 0.2, 0.6, 1.0])
  got = losses.group_embeddings(jnp.asarray(z), jnp.asarray(groups), jnp.asarray(w), 3)
  want = np.stack([sum(w[j] * z[j] for j in range(6) if groups[j] == groups[i]) for i in range(6)])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_curriculum_linear():
  p = lambda s: float(losses.curriculum_probability(s, 1.0, 0.05, 100))
  assert p(0) == 1.0 and abs(p(50) - 0.525) < 1e-6 and abs(p(100) - 0.05) < 1e-6 and abs(p(1000) - 0.05) < 1e-6


def test_diffusion_loss_is_per_example_mse():
  a = np.arange(24, dtype=np.float32).reshape(2, 2, 2, 3)
  b = np.zeros_like(a)
  np.testing.assert_allclose(losses.diffusion_loss(a, b), (a ** 2).reshape(2, -1).mean(1))


def _tiny_batch(config, rng):
  r = config.model.resolution
  n_id = config.train.batch_size // 2
  m = config.data.images_per_identity
  return {
      'id_images': jnp.asarray(rng.integers(0, 256, (n_id, r, r, 3), np.uint8)),
      'id_labels': jnp.asarray(np.repeat(np.arange(n_id // m) * 7, m).astype(np.int32)),
      'id_groups': jnp.asarray(np.repeat(np.arange(n_id // m), m).astype(np.int32)),
      'agnostic_images': jnp.asarray(rng.integers(0, 256, (n_id, r, r, 3), np.uint8)),
  }


def test_total_loss_forward_backward_finite_and_both_models_get_gradients():
  config = get_config('tiny')
  config.loss.curriculum_start = 0.5  # some groups keep identity, so L_id is active
  gen, enc = models.build_generator(config), models.build_encoder(config)
  r, d = config.model.resolution, config.model.embed_dim
  x = jnp.zeros((2, r, r, 3))
  params = {'generator': gen.init(jax.random.key(0), x, jnp.zeros((2,), jnp.int32), jnp.zeros((2, d)))['params'],
            'encoder': enc.init(jax.random.key(1), x)['params']}
  # The zero-initialised output conv makes every gradient except its own vanish at init; perturb it.
  params['generator']['conv_out']['kernel'] = 0.01 * jax.random.normal(
      jax.random.key(2), params['generator']['conv_out']['kernel'].shape)
  batch = _tiny_batch(config, np.random.default_rng(0))
  schedule = schedules.from_config(config)
  fn = lambda p: losses.compute_loss(p, batch, jax.random.key(3), 0, config=config, generator=gen,
                                     encoder=enc, schedule=schedule)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
  assert np.isfinite(float(loss))
  for k in ('diff_id', 'diff_agnostic', 'id_loss', 'curriculum_p'):
    assert np.isfinite(float(metrics[k])), k
  want = metrics['diff_id'] + 0.01 * metrics['id_loss'] + 0.01 * metrics['diff_agnostic']
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  gnorm = lambda t: float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(t))))
  assert gnorm(grads['generator']) > 0
  assert gnorm(grads['encoder']) > 0
