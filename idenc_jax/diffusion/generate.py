"""Jittable generation from identity embeddings: the core that training grids, the personalization
API and evaluation share. Images are float in [-1, 1], NHWC."""

import jax
import jax.numpy as jnp

from idenc_jax.models.encoder import aggregate_embeddings
from idenc_jax.diffusion import consistency, guidance as guidance_lib, objectives, samplers, schedules


def embed_references(encoder, encoder_params, references: jax.Array) -> jax.Array:
  """E(Y) = mean_j Enc(y_j): references [R, H, W, 3] in [-1, 1] -> embedding [D]."""
  return aggregate_embeddings(encoder.apply({'params': encoder_params}, references))


def generate(generator, generator_params, schedule: schedules.NoiseSchedule, z: jax.Array | None,
             rng: jax.Array, *, num: int, sampler: str = 'ddim', num_steps: int = 50, eta: float = 0.0,
             start_t: int | None = None, context: jax.Array | None = None, clip: bool = True,
             condition: jax.Array | None = None, project: consistency.Projector | None = None,
             guidance: float = 1.0, prediction: str = 'eps', on_step=None) -> jax.Array:
  """num images of one identity: z [D] (or None for the unconditional generator) -> [num, R, R, 3].

  start_t: the sampler's first timestep (None: T - 1; see `samplers`, `config.diffusion.sample_start_t`).
  context: stage-2 condition tokens [L, C]. project, condition: data consistency (`diffusion.consistency`),
  every denoised estimate replaced by project(x0_hat, condition), condition [R, R, C] the degraded input.
  guidance: identity guidance weight w (`diffusion.guidance`; 1: none), applied before the projection; the
  condition tokens stay in both branches, only z is dropped. prediction: what the generator outputs
  (`diffusion.objectives`; config.diffusion.prediction), converted to the noise the samplers use.
  on_step: a host function called with no arguments at each sampler step (`jax.debug.callback`, e.g. a
  progress bar's `progress.advance`); it takes no traced value, so under vmap it still runs once per step.
  """
  r = generator.resolution
  rng_x, rng_s = jax.random.split(rng)
  x_T = jax.random.normal(rng_x, (num, r, r, 3), jnp.float32)
  if z is None and guidance_lib.check_guidance(guidance) != 1.0:
    raise ValueError('Identity guidance needs an identity embedding; the unconditional generator takes '
                     f'guidance 1, got {guidance}.')

  def model_fn(x, t, null):
    # x holds num images, or 2 * num when guidance doubles the batch: z and context follow its size.
    if on_step is not None:
      jax.debug.callback(on_step)
    b = x.shape[0]
    z_b = None if z is None else jnp.broadcast_to(z, (b,) + z.shape[-1:])
    ctx = None if context is None else jnp.broadcast_to(context, (b,) + context.shape[-2:])
    out = generator.apply({'params': generator_params}, x, t, z_b, ctx, null_identity=null)
    return objectives.eps_from_output(schedule, x, t, out, prediction)

  eps_fn = guidance_lib.guided_eps_fn(model_fn, guidance)
  if project is not None:
    if condition is None:
      raise ValueError('Data consistency needs the degraded input (condition).')
    eps_fn = consistency.consistent_eps_fn(eps_fn, schedule, lambda x0: project(x0, condition), clip=clip)
  out = samplers.sample(sampler, eps_fn, schedule, x_T, num_steps=num_steps, eta=eta, start_t=start_t,
                        rng=rng_s if sampler != 'dpmpp' else None, clip_denoised=clip)
  return jnp.clip(out, -1.0, 1.0) if clip else out


def make_identity_sampler(generator, encoder, schedule, *, num: int, sampler: str, num_steps: int,
                          eta: float = 0.0, start_t: int | None = None, guidance: float = 1.0,
                          prediction: str = 'eps', compiler_options: dict | None = None):
  """A jitted fn(gen_params, enc_params, references [I, R, ...], rng) -> samples [I, num, ...].

  vmapped over identities, so a whole grid is one compiled call; compiled with `compiler_options`
  (XLA's, e.g. `xla_options.checked(config, 'sample')`; None: XLA's defaults).
  """
  def one(gen_params, enc_params, refs, rng):
    z = embed_references(encoder, enc_params, refs)
    return generate(generator, gen_params, schedule, z, rng, num=num, sampler=sampler,
                    num_steps=num_steps, eta=eta, start_t=start_t, guidance=guidance,
                    prediction=prediction)

  def fn(gen_params, enc_params, references, rng):
    rngs = jax.random.split(rng, references.shape[0])
    return jax.vmap(one, in_axes=(None, None, 0, 0))(gen_params, enc_params, references, rngs)

  return jax.jit(fn, compiler_options=compiler_options)
