"""Jittable generation from identity embeddings: the core that training grids, the personalization
API and evaluation share. Images are float in [-1, 1], NHWC."""

import jax
import jax.numpy as jnp

from idenc_jax.models.encoder import aggregate_embeddings
from idenc_jax.diffusion import consistency, samplers, schedules


def embed_references(encoder, encoder_params, references: jax.Array) -> jax.Array:
  """E(Y) = mean_j Enc(y_j): references [R, H, W, 3] in [-1, 1] -> embedding [D]."""
  return aggregate_embeddings(encoder.apply({'params': encoder_params}, references))


def generate(generator, generator_params, schedule: schedules.NoiseSchedule, z: jax.Array | None,
             rng: jax.Array, *, num: int, sampler: str = 'ddim', num_steps: int = 50, eta: float = 0.0,
             start_t: int | None = None, context: jax.Array | None = None, clip: bool = True,
             condition: jax.Array | None = None, project: consistency.Projector | None = None) -> jax.Array:
  """num images of one identity: z [D] (or None for the unconditional generator) -> [num, R, R, 3].

  start_t: the sampler's first timestep (None: T - 1; see `samplers`, `config.diffusion.sample_start_t`).
  context: stage-2 condition tokens [L, C]. project, condition: data consistency (`diffusion.consistency`),
  every denoised estimate replaced by project(x0_hat, condition), condition [R, R, C] the degraded input.
  """
  r = generator.resolution
  rng_x, rng_s = jax.random.split(rng)
  x_T = jax.random.normal(rng_x, (num, r, r, 3), jnp.float32)
  z_b = None if z is None else jnp.broadcast_to(z, (num,) + z.shape[-1:])
  ctx = None if context is None else jnp.broadcast_to(context, (num,) + context.shape[-2:])
  eps_fn = lambda x, t: generator.apply({'params': generator_params}, x, t, z_b, ctx)
  if project is not None:
    if condition is None:
      raise ValueError('Data consistency needs the degraded input (condition).')
    eps_fn = consistency.consistent_eps_fn(eps_fn, schedule, lambda x0: project(x0, condition), clip=clip)
  out = samplers.sample(sampler, eps_fn, schedule, x_T, num_steps=num_steps, eta=eta, start_t=start_t,
                        rng=rng_s if sampler != 'dpmpp' else None, clip_denoised=clip)
  return jnp.clip(out, -1.0, 1.0) if clip else out


def make_identity_sampler(generator, encoder, schedule, *, num: int, sampler: str, num_steps: int,
                          eta: float = 0.0, start_t: int | None = None):
  """A jitted fn(gen_params, enc_params, references [I, R, ...], rng) -> samples [I, num, ...].

  vmapped over identities, so a whole grid is one compiled call.
  """
  def one(gen_params, enc_params, refs, rng):
    z = embed_references(encoder, enc_params, refs)
    return generate(generator, gen_params, schedule, z, rng, num=num, sampler=sampler,
                    num_steps=num_steps, eta=eta, start_t=start_t)

  def fn(gen_params, enc_params, references, rng):
    rngs = jax.random.split(rng, references.shape[0])
    return jax.vmap(one, in_axes=(None, None, 0, 0))(gen_params, enc_params, references, rngs)

  return jax.jit(fn)
