"""Training objectives: diffusion loss, soft nearest-neighbour identity loss, convex identity
embeddings, the curriculum, and the total loss of one batch (paper section 3.3, SPEC.md "Training").

    L = L_diff(I_id) + a1 * L_id(I_id) + a2 * L_diff(I_g)

L_diff regresses the generator's target (`config.diffusion.prediction`: eps as the paper, v or x0) with the
timestep weighting of `config.loss.weighting` (`diffusion.objectives`). With `config.loss.null_identity_prob`
> 0 that share of the images (both halves) is denoised without identity, which trains the unconditional
branch that identity guidance (`diffusion.guidance`) needs.

Stage 0 trains the generator unconditionally on every image of the batch. Stage 2 (`stage2_loss`) trains
the condition encoder and the generator's cross-attention on a frozen stage-1 model.
"""

from typing import Any

import jax
import jax.numpy as jnp

from idenc_jax.data import images
from idenc_jax.diffusion import objectives, schedules
from idenc_jax.train import state as state_lib


def diffusion_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Per-example squared error ||pred - target||^2 (eps, v or x0), averaged over pixels: [B]."""
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=tuple(range(1, target.ndim)))


def weighted_diffusion_loss(config, schedule: schedules.NoiseSchedule, output: jax.Array, x0: jax.Array,
                            noise: jax.Array, t: jax.Array) -> jax.Array:
  """Per-example diffusion loss [B] of the configured target and timestep weighting."""
  prediction = config.diffusion.prediction
  target = objectives.training_target(schedule, x0, noise, t, prediction)
  per_example = diffusion_loss(output, target)
  if config.loss.weighting == 'none':
    return per_example
  return per_example * objectives.loss_weight(schedule, t, prediction, config.loss.weighting,
                                              config.loss.min_snr_gamma)


def null_identity_mask(rng: jax.Array, n: int, prob: float) -> jax.Array | None:
  """[n] bool, True with probability `prob` per image (denoised without identity); None when prob is 0."""
  if not 0.0 <= prob < 1.0:
    raise ValueError(f'config.loss.null_identity_prob must lie in [0, 1), got {prob}.')
  if prob == 0:
    return None
  return jax.random.uniform(rng, (n,)) < prob


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


def leave_one_out_embeddings(z: jax.Array, groups: jax.Array, num_groups: int) -> jax.Array:
  """For each image, the mean embedding of the *other* images of its group: [N, D].

  (sum_{j in g} z_j - z_k) / (n_g - 1); an image alone in its group keeps its own embedding.
  """
  sums = jax.ops.segment_sum(z, groups, num_segments=num_groups)
  counts = jax.ops.segment_sum(jnp.ones(z.shape[:1], z.dtype), groups, num_segments=num_groups)[groups]
  others = (sums[groups] - z) / jnp.maximum(counts - 1.0, 1.0)[:, None]
  return jnp.where((counts > 1.0)[:, None], others, z)


def curriculum_probability(step, start: float, end: float, steps: int) -> jax.Array:
  """p(step): probability that a group's identity is dropped, linear from start to end over steps."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
  return start + (end - start) * frac


def compute_loss(params: dict, batch: dict, rng: jax.Array, step, *, config, generator, encoder,
                 schedule: schedules.NoiseSchedule, train: bool = True,
                 cond_encoder=None) -> tuple[jax.Array, dict[str, Any]]:
  """Total loss of one batch and its terms.

  params: {'generator': ..., 'encoder': ...} ('encoder' absent in stage 0, 'cond_encoder' added in 2).
  batch: 'id_images' [B_id,R,R,3], 'id_labels' [B_id], 'id_groups' [B_id] (group ids unique in the
  global batch, contiguous K x M), 'agnostic_images' [B_ag,R,R,3]; uint8 or float in [-1, 1]; in stage 2
  also 'id_condition' [B_id,R,R,C] and 'agnostic_condition' [B_ag,R,R,C].
  Both halves go through the encoder and the generator as one batch (one large matmul-friendly call).
  """
  if config.stage == 2:
    return stage2_loss(params, batch, rng, config=config, generator=generator, encoder=encoder,
                       cond_encoder=cond_encoder, schedule=schedule, train=train)
  lc = config.loss
  x_id = images.to_float(batch['id_images'])
  x_ag = images.to_float(batch['agnostic_images'])
  n_id, n_ag = x_id.shape[0], x_ag.shape[0]
  x0 = jnp.concatenate([x_id, x_ag], axis=0)
  n = n_id + n_ag
  rng_t, rng_noise, rng_drop, rng_w, rng_cur = jax.random.split(rng, 5)
  t = jax.random.randint(rng_t, (n,), 0, schedule.timesteps)
  noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
  x_t = schedules.q_sample(schedule, x0, t, noise)
  metrics = {}

  if config.stage == 0:
    out = generator.apply({'params': params['generator']}, x_t, t, None, train=train,
                          rngs={'dropout': rng_drop})
    per_example = weighted_diffusion_loss(config, schedule, out, x0, noise, t)
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
  # Its own stream (not a sixth split) so that runs without guidance draw the numbers they always drew.
  null = null_identity_mask(jax.random.fold_in(rng, 7), n, lc.null_identity_prob)

  out = generator.apply({'params': params['generator']}, x_t, t, cond, train=train,
                        rngs={'dropout': rng_drop}, null_identity=null)
  per_example = weighted_diffusion_loss(config, schedule, out, x0, noise, t)
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
  if null is not None:
    metrics['null_identity_fraction'] = null.mean()
  return loss, metrics


def frozen_stage1(config, params: dict) -> dict:
  """Stage 2: stop gradients at the frozen stage-1 parameters, so the backward pass computes no gradient
  for them (the optimizer zeroes their updates anyway; this saves their weight-gradient work)."""
  mask = state_lib.trainable_mask(config, params)
  return jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)


def stage2_loss(params: dict, batch: dict, rng: jax.Array, *, config, generator, encoder, cond_encoder,
                schedule: schedules.NoiseSchedule, train: bool = True) -> tuple[jax.Array, dict[str, Any]]:
  """Stage-2 loss: denoise each target given its degraded version (tokens of the condition encoder) and
  its identity from references.

  Identity half: the target's identity embedding is the mean of the frozen encoder's embeddings of the
  *other* images of its group (leave-one-out), so identity comes from references, as at inference
  (E(Y) = mean_j Enc(y_j)), while layout and pose must come from the condition: conditioning on the
  target's own embedding would hand the generator the target's structure and leave the condition unused.
  Agnostic half (only when config.loss.use_agnostic; no references exist): its own embedding, weighted by
  config.loss.agnostic_weight.
  L = L_diff(I_id | cond, z_loo) [+ a2 * L_diff(I_g | cond, Enc(y))].
  """
  if cond_encoder is None:
    raise ValueError('stage 2 needs the condition encoder (models.build_condition_encoder)')
  if 'id_condition' not in batch:
    raise ValueError("stage-2 batches need 'id_condition' (the input pipeline adds it when config.stage == 2)")
  lc = config.loss
  params = frozen_stage1(config, params)
  x_id = images.to_float(batch['id_images'])
  c_id = batch['id_condition'].astype(jnp.float32)
  n_id = x_id.shape[0]
  num_groups = n_id // config.data.images_per_identity
  if lc.use_agnostic:
    x0 = jnp.concatenate([x_id, images.to_float(batch['agnostic_images'])], axis=0)
    cond_images = jnp.concatenate([c_id, batch['agnostic_condition'].astype(jnp.float32)], axis=0)
  else:
    x0, cond_images = x_id, c_id
  n = x0.shape[0]
  rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
  t = jax.random.randint(rng_t, (n,), 0, schedule.timesteps)
  noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
  x_t = schedules.q_sample(schedule, x0, t, noise)

  z_all = encoder.apply({'params': params['encoder']}, x0)
  z = leave_one_out_embeddings(z_all[:n_id], batch['id_groups'], num_groups)
  if lc.use_agnostic:
    z = jnp.concatenate([z, z_all[n_id:]], axis=0)
  tokens = cond_encoder.apply({'params': params['cond_encoder']}, cond_images)
  out = generator.apply({'params': params['generator']}, x_t, t, z, tokens, train=train,
                        rngs={'dropout': rng_drop})
  per_example = weighted_diffusion_loss(config, schedule, out, x0, noise, t)
  diff_id = per_example[:n_id].mean()
  loss = diff_id
  metrics = {'diff_id': diff_id}
  if lc.use_agnostic:
    diff_ag = per_example[n_id:].mean()
    loss = loss + lc.agnostic_weight * diff_ag
    metrics['diff_agnostic'] = diff_ag
  metrics.update(loss=loss, token_norm=jnp.linalg.norm(tokens.astype(jnp.float32), axis=-1).mean())
  return loss, metrics
