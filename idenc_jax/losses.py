"""Training objectives: diffusion loss, soft nearest-neighbour identity loss, convex identity
embeddings, the curriculum, and the total loss of one batch (paper section 3.3, SPEC.md "Training").

    L = L_diff(I_id) + a1 * L_id(I_id) + a2 * L_diff(I_g)

Stage 0 trains the generator unconditionally on every image of the batch.
"""

from typing import Any

import jax
import jax.numpy as jnp

from idenc_jax.diffusion import schedules


def diffusion_loss(eps_pred: jax.Array, eps: jax.Array) -> jax.Array:
  """Per-example epsilon-prediction loss ||eps_theta - eps||^2, averaged over pixels: [B]."""
  return jnp.mean(jnp.square(eps_pred.astype(jnp.float32) - eps), axis=tuple(range(1, eps.ndim)))


def soft_nearest_neighbor_loss(z: jax.Array, labels: jax.Array, temperature: float,
                               valid: jax.Array | None = None) -> jax.Array:
  """Soft nearest-neighbour loss (Frosst et al. 2019) on embeddings z [N, D] with labels [N].

  L = -mean_k log( sum_{j!=k, s_j=s_k} e^{-|z_k-z_j|^2/T} / sum_{j!=k} e^{-|z_k-z_j|^2/T} ),
  the mean taken over anchors k that have at least one same-label partner; anchors without one (and
  rows with valid=False, which take no part at all) are excluded rather than giving -log 0.
  Returns 0 when no anchor qualifies. Computed with log-sum-exp, so large distances cannot underflow.
  """
  n = z.shape[0]
  valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
  z = z.astype(jnp.float32)
  sq = jnp.sum(z * z, axis=-1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
  logits = -d2 / temperature
  others = ~jnp.eye(n, dtype=bool) & valid[None, :] & valid[:, None]
  same = others & (labels[:, None] == labels[None, :])
  neg_inf = jnp.finfo(jnp.float32).min
  log_num = jax.nn.logsumexp(jnp.where(same, logits, neg_inf), axis=-1)
  log_den = jax.nn.logsumexp(jnp.where(others, logits, neg_inf), axis=-1)
  anchor = same.any(axis=-1)
  per_anchor = jnp.where(anchor, log_den - log_num, 0.0)
  return per_anchor.sum() / jnp.maximum(anchor.sum(), 1)


def convex_weights(rng: jax.Array, groups: jax.Array, num_groups: int) -> jax.Array:
  """Random convex weights per group: w ~ Dirichlet(1, ..., 1) over each group's members.

  Dirichlet(1) is the uniform distribution on the simplex; sampled as normalised Exp(1) draws, so
  it works for any group size. Returns w [N] with w >= 0 and sum_{j in g} w_j = 1 for every group g.
  """
  e = jax.random.exponential(rng, groups.shape)
  totals = jax.ops.segment_sum(e, groups, num_segments=num_groups)
  return e / totals[groups]


def group_embeddings(z: jax.Array, groups: jax.Array, weights: jax.Array, num_groups: int) -> jax.Array:
  """z~_g = sum_{j in g} w_j z_j, broadcast back to each member: [N, D]."""
  pooled = jax.ops.segment_sum(weights[:, None] * z, groups, num_segments=num_groups)
  return pooled[groups]


def aggregate_embeddings(z_refs: jax.Array) -> jax.Array:
  """Inference aggregate E(Y) = mean_j Enc(y_j) over references [R, D] -> [D]; order-invariant."""
  return jnp.mean(z_refs, axis=0)


def curriculum_probability(step, start: float, end: float, steps: int) -> jax.Array:
  """p(step): probability that a group's identity is dropped, linear from start to end over steps."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
  return start + (end - start) * frac


def images_to_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]; float inputs pass through."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  return images.astype(jnp.float32)


def compute_loss(params: dict, batch: dict, rng: jax.Array, step, *, config, generator, encoder,
                 schedule: schedules.NoiseSchedule, train: bool = True,
                 cond_encoder=None) -> tuple[jax.Array, dict[str, Any]]:
  """Total loss of one batch and its terms.

  params: {'generator': ..., 'encoder': ...} ('encoder' absent in stage 0).
  batch: 'id_images' [B_id,R,R,3], 'id_labels' [B_id], 'id_groups' [B_id] (group ids unique in the
  global batch, contiguous K x M), 'agnostic_images' [B_ag,R,R,3]; uint8 or float in [-1, 1].
  Both halves go through the encoder and the generator as one batch (one large matmul-friendly call).
  """
  lc = config.loss
  x_id = images_to_float(batch['id_images'])
  x_ag = images_to_float(batch['agnostic_images'])
  n_id, n_ag = x_id.shape[0], x_ag.shape[0]
  x0 = jnp.concatenate([x_id, x_ag], axis=0)
  n = n_id + n_ag
  rng_t, rng_noise, rng_drop, rng_w, rng_cur = jax.random.split(rng, 5)
  t = jax.random.randint(rng_t, (n,), 0, schedule.timesteps)
  noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
  x_t = schedules.q_sample(schedule, x0, t, noise)
  metrics = {}

  if config.stage == 0:
    eps = generator.apply({'params': params['generator']}, x_t, t, None, train=train,
                          rngs={'dropout': rng_drop})
    per_example = diffusion_loss(eps, noise)
    loss = per_example.mean()
    metrics.update(loss=loss, diff_agnostic=loss)
    return loss, metrics

  z_all = encoder.apply({'params': params['encoder']}, x0)
  z_id, z_ag = z_all[:n_id], z_all[n_id:]
  groups = batch['id_groups']
  labels = batch['id_labels']
  num_groups = n_id // config.data.images_per_identity

  # Curriculum: each group keeps its identity information with probability 1 - p(step); dropped groups
  # are treated as identity-agnostic (own embedding, no identity loss) but stay in L_diff(I_id).
  p_drop = curriculum_probability(step, lc.curriculum_start, lc.curriculum_end, lc.curriculum_steps)
  keep_group = jax.random.uniform(rng_cur, (num_groups,)) >= p_drop
  keep = keep_group[groups]
  if lc.average_embedding:
    z_tilde = group_embeddings(z_id, groups, convex_weights(rng_w, groups, num_groups), num_groups)
    cond_id = jnp.where(keep[:, None], z_tilde, z_id)
  else:
    cond_id = z_id
  cond = jnp.concatenate([cond_id, z_ag], axis=0)

  eps = generator.apply({'params': params['generator']}, x_t, t, cond, train=train,
                        rngs={'dropout': rng_drop})
  per_example = diffusion_loss(eps, noise)
  diff_id = per_example[:n_id].mean()
  diff_ag = per_example[n_id:].mean()
  id_loss = (soft_nearest_neighbor_loss(z_id, labels, lc.id_temperature, valid=keep)
             if lc.use_id_loss else jnp.zeros(()))
  loss = diff_id + lc.id_weight * id_loss
  if lc.use_agnostic:
    loss = loss + lc.agnostic_weight * diff_ag
  metrics.update(loss=loss, diff_id=diff_id, diff_agnostic=diff_ag, id_loss=id_loss,
                 curriculum_p=p_drop, id_kept_fraction=keep.mean(),
                 embedding_norm=jnp.linalg.norm(z_all, axis=-1).mean())
  return loss, metrics
