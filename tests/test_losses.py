"""Losses against direct numpy implementations of the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from idenc_jax.data import batch_layout
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
  n_ag = batch_layout.agnostic_size(config)
  n_id = config.train.batch_size - n_ag
  m = config.data.images_per_identity
  return {
      'id_images': jnp.asarray(rng.integers(0, 256, (n_id, r, r, 3), np.uint8)),
      'id_labels': jnp.asarray(np.repeat(np.arange(n_id // m) * 7, m).astype(np.int32)),
      'id_groups': jnp.asarray(np.repeat(np.arange(n_id // m), m).astype(np.int32)),
      'agnostic_images': jnp.asarray(rng.integers(0, 256, (n_ag, r, r, 3), np.uint8)),
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


# ---- What each image is conditioned on, captured inside compute_loss. ---------------------------------------

class _LinearEncoder:
  """Stands in for the encoder: z = flatten(x) @ P, recording its input."""

  def apply(self, variables, x):
    self.x = np.asarray(x)
    return x.reshape(x.shape[0], -1) @ variables['params']['P']


class _RecordingGenerator:
  """Stands in for the generator: records (x_t, t, cond, null) and predicts 0.1 tanh(x_t) whatever the condition."""

  def apply(self, variables, x_t, t, cond, train=True, rngs=None, null_identity=None):
    del variables, train, rngs
    self.x_t, self.t, self.cond, self.null = (np.asarray(x_t), np.asarray(t), np.asarray(cond),
                                              None if null_identity is None else np.asarray(null_identity))
    return 0.1 * jnp.tanh(x_t)


def _captured_loss(curriculum_p, seed=0, rng=None, agnostic_fraction=0.5):
  """compute_loss with the stand-ins at a fixed curriculum probability: (config, batch, z, loss, metrics, gen)."""
  config = get_config('tiny')
  config.loss.curriculum_start = config.loss.curriculum_end = curriculum_p
  config.data.agnostic_fraction = agnostic_fraction
  r = config.model.resolution
  batch = _tiny_batch(config, np.random.default_rng(seed))
  groups = len(batch['id_images']) // 4
  batch['id_labels'] = jnp.asarray(np.repeat([7, 3, 5, 9][:groups], 4), jnp.int32)   # groups of 4
  p = np.random.default_rng(seed + 1).normal(0, 0.05, (r * r * 3, 16)).astype(np.float32)
  gen, enc = _RecordingGenerator(), _LinearEncoder()
  loss, metrics = losses.compute_loss({'generator': {}, 'encoder': {'P': jnp.asarray(p)}}, batch,
                                      jax.random.key(3) if rng is None else rng, 0, config=config,
                                      generator=gen, encoder=enc, schedule=schedules.from_config(config))
  x0 = np.concatenate([np.asarray(batch['id_images']), np.asarray(batch['agnostic_images'])]) / 127.5 - 1.0
  np.testing.assert_allclose(enc.x, x0, atol=1e-6)          # both halves, identity half first
  z = x0.reshape(len(x0), -1) @ p.astype(np.float64)
  return config, batch, z, float(loss), {k: float(v) for k, v in metrics.items()}, gen


def _numpy_total(config, batch, z, gen, keep):
  """The loss recomputed from the captured generator call: eps MSE per image (eps from x_t and x0), the
  identity half's and the agnostic half's means, and the soft-NN loss of the kept identity images."""
  sched = schedules.from_config(config)
  a = np.asarray(sched.sqrt_alphas_cumprod, np.float64)[gen.t][:, None, None, None]
  b = np.asarray(sched.sqrt_one_minus_alphas_cumprod, np.float64)[gen.t][:, None, None, None]
  n_id = len(batch['id_images'])
  x0 = np.concatenate([np.asarray(batch['id_images']), np.asarray(batch['agnostic_images'])]) / 127.5 - 1.0
  eps = (gen.x_t - a * x0) / b
  per = ((0.1 * np.tanh(gen.x_t.astype(np.float64)) - eps) ** 2).reshape(len(x0), -1).mean(1)
  id_loss = snn_numpy(z[:n_id], np.asarray(batch['id_labels']), config.loss.id_temperature, valid=keep)
  lc = config.loss
  return per[:n_id].mean() + lc.id_weight * id_loss + lc.agnostic_weight * per[n_id:].mean(), id_loss


def _convex_weights_of(cond_row, members):
  """w with cond_row = w @ members (least squares; the 4 members are independent in 16 dimensions)."""
  w, *_ = np.linalg.lstsq(members.T, cond_row, rcond=None)
  np.testing.assert_allclose(w @ members, cond_row, atol=1e-5)
  return w


def test_kept_groups_share_one_convex_combination_and_agnostic_images_keep_their_own():
  config, batch, z, loss, metrics, gen = _captured_loss(0.0)
  n_id = len(batch['id_images'])
  assert gen.null is None                                     # the tiny config trains no null identity
  np.testing.assert_allclose(gen.cond[n_id:], z[n_id:], atol=1e-5)
  weights = []
  for g in range(2):
    rows = slice(4 * g, 4 * g + 4)
    np.testing.assert_allclose(gen.cond[rows], np.broadcast_to(gen.cond[4 * g], (4, 16)), atol=1e-7)
    w = _convex_weights_of(gen.cond[4 * g].astype(np.float64), z[rows])
    assert (w > -1e-4).all() and abs(w.sum() - 1) < 1e-4, w
    assert w.max() < 0.999                                    # a combination, not the image's own embedding
    weights.append(w)
  assert np.abs(weights[0] - weights[1]).max() > 1e-3       # each group draws its own weights
  want, want_id = _numpy_total(config, batch, z, gen, keep=np.ones(n_id, bool))
  assert metrics['id_kept_fraction'] == 1.0 and want_id > 0
  np.testing.assert_allclose(metrics['id_loss'], want_id, rtol=1e-4)
  np.testing.assert_allclose(loss, want, rtol=1e-4)


def test_a_smaller_agnostic_share_averages_each_part_over_its_own_images():
  # 16 images at agnostic_fraction 0.25: 3 identity groups of 4, then 4 agnostic images.
  config, batch, z, loss, metrics, gen = _captured_loss(0.0, agnostic_fraction=0.25)
  assert len(batch['id_images']) == 12 and len(batch['agnostic_images']) == 4
  np.testing.assert_allclose(gen.cond[12:], z[12:], atol=1e-5)   # agnostic images: their own embedding
  for g in range(3):
    np.testing.assert_allclose(gen.cond[4 * g:4 * g + 4], np.broadcast_to(gen.cond[4 * g], (4, 16)), atol=1e-7)
  want, want_id = _numpy_total(config, batch, z, gen, keep=np.ones(12, bool))
  np.testing.assert_allclose(metrics['id_loss'], want_id, rtol=1e-4)
  np.testing.assert_allclose(loss, want, rtol=1e-4)


def test_dropped_groups_get_their_own_embedding_and_no_identity_loss():
  config, batch, z, loss, metrics, gen = _captured_loss(1.0)
  np.testing.assert_allclose(gen.cond, z, atol=1e-5)          # every image, both halves
  want, want_id = _numpy_total(config, batch, z, gen, keep=np.zeros(len(batch['id_images']), bool))
  assert metrics['id_kept_fraction'] == 0.0 and metrics['id_loss'] == 0.0 and want_id == 0.0
  np.testing.assert_allclose(loss, want, rtol=1e-4)


def test_mixed_curriculum_identity_loss_counts_exactly_the_kept_groups():
  # p = 0.5 over seeds until one draw keeps one group and drops the other.
  for seed in range(20):
    config, batch, z, loss, metrics, gen = _captured_loss(0.5, rng=jax.random.key(seed))
    own = np.abs(gen.cond[:8] - z[:8]).max(1) < 1e-5
    if own[:4].all() != own[4:].all():
      break
  else:
    pytest.fail('no draw of 20 kept exactly one group')
  assert (own[:4] == own[0]).all() and (own[4:] == own[4]).all()   # whole groups, never single images
  want, want_id = _numpy_total(config, batch, z, gen, keep=~own)
  assert metrics['id_kept_fraction'] == 0.5
  np.testing.assert_allclose(metrics['id_loss'], want_id, rtol=1e-4)
  np.testing.assert_allclose(loss, want, rtol=1e-4)


def test_group_weights_are_fresh_at_every_step():
  """The train step folds the step number into its key: steps 1 and 2 average the group differently."""
  key = jax.random.key(11)
  conds = [_captured_loss(0.0, rng=jax.random.fold_in(key, s))[-1].cond[:4] for s in (1, 2)]
  assert np.abs(conds[0] - conds[1]).max() > 1e-4


def test_convex_weights_independent_across_groups_and_calls():
  """2,000 groups of 4 in one call: group g's weights are uncorrelated with group g+1's and with the next
  call's, and each has the Dirichlet(1) marginal (mean 1/4, variance 3/80)."""
  g = 2000
  groups = jnp.repeat(jnp.arange(g), 4)
  w1 = np.asarray(losses.convex_weights(jax.random.key(5), groups, g)).reshape(g, 4)
  w2 = np.asarray(losses.convex_weights(jax.random.key(6), groups, g)).reshape(g, 4)
  bound = 4.5 / np.sqrt(g)
  assert abs(np.corrcoef(w1[:-1, 0], w1[1:, 0])[0, 1]) < bound
  assert abs(np.corrcoef(w1[:, 0], w2[:, 0])[0, 1]) < bound
  np.testing.assert_allclose(w1.mean(0), 0.25, atol=4.5 * np.sqrt(0.0375 / g))
  np.testing.assert_allclose(w1.var(0), 0.0375, rtol=0.15)
