"""The fine-tuning baseline: personalize the trained generator per identity by optimisation, as DreamBooth-
and MyStyle-like methods do, instead of one pass of the identity encoder.

Method (per identity, from the trained model's EMA generator):
  - a copy of the generator's weights and a new identity vector z in R^D, initialised to zero (the
    generator's conditioning is h * (1 + W silu(z) + b), so z = 0 starts from the learned bias alone, with no
    encoder involved);
  - `config.finetune.steps` Adam steps on the diffusion loss ||eps_theta(x_t, t, z) - eps||^2 over the
    identity's R references (all R each step, random timestep, noise and horizontal flip per image);
    generator weights at `config.finetune.learning_rate`, z at `config.finetune.embedding_learning_rate`;
    no prior-preservation term;
  - sampling exactly as for the encoder, with the fine-tuned weights and z.
The trained parameters are never modified (every identity starts from them). The whole optimisation is one
jitted `lax.scan`.

`idenc_jax.experiments.finetune_compare` compares it with the encoder (time to personalize, every metric).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from idenc_jax import models
from idenc_jax.diffusion import schedules
from idenc_jax.train import losses
from idenc_jax.train import step as step_lib


def _flip(rng: jax.Array, x: jax.Array) -> jax.Array:
  flip = jax.random.bernoulli(rng, 0.5, (x.shape[0], 1, 1, 1))
  return jnp.where(flip, x[:, :, ::-1], x)


def reference_loss(config, generator, schedule: schedules.NoiseSchedule, gen_params, z: jax.Array,
                   refs: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Mean diffusion loss (the training run's target and weighting) of references refs [R, H, W, 3] in
  [-1, 1] at given timesteps t [N*R] and noise [N*R, H, W, 3] (N draws per reference), conditioned on z [D]."""
  x0 = jnp.tile(refs, (t.shape[0] // refs.shape[0], 1, 1, 1))
  x_t = schedules.q_sample(schedule, x0, t, noise)
  out = generator.apply({'params': gen_params}, x_t, t, jnp.broadcast_to(z, (x0.shape[0],) + z.shape))
  return losses.weighted_diffusion_loss(config, schedule, out, x0, noise, t).mean()


_FINETUNERS: dict[tuple, Any] = {}


def make_finetuner(config, *, steps: int | None = None):
  """A jitted fn(gen_params, refs [R, H, W, 3] in [-1, 1], rng) -> (gen_params', z [D], losses [steps]).

  Inputs are not donated: the caller's parameters stay intact. One compiled function per architecture and
  fine-tuning setting is shared. It compiles with the train step's `config.train.compiler_options` (the
  configs keep XLA:CPU's YNNPACK fusions from the kernel gradients, which fine-tuning runs too), which the
  training run has already validated; being a top-level jit with options, it cannot be nested in another jit.
  """
  ft = config.finetune
  steps = ft.steps if steps is None else steps
  if steps < 1:
    raise ValueError(f'config.finetune.steps must be >= 1, got {steps}.')
  key = (config.model.to_json(), config.diffusion.to_json(), config.loss.to_json(), ft.to_json(), steps,
         config.train.compiler_options)
  if key not in _FINETUNERS:
    _FINETUNERS[key] = _build_finetuner(config, steps)
  return _FINETUNERS[key]


def _build_finetuner(config, steps: int):
  ft = config.finetune
  generator = models.build_generator(config)
  schedule = schedules.from_config(config)
  opt = optax.multi_transform({'generator': optax.adam(ft.learning_rate),
                               'z': optax.adam(ft.embedding_learning_rate)},
                              {'generator': 'generator', 'z': 'z'})

  def loss_fn(params, refs, rng):
    r_t, r_n, r_f = jax.random.split(rng, 3)
    x0 = _flip(r_f, refs)
    t = jax.random.randint(r_t, (refs.shape[0],), 0, schedule.timesteps)
    noise = jax.random.normal(r_n, refs.shape, jnp.float32)
    return reference_loss(config, generator, schedule, params['generator'], params['z'], x0, t, noise)

  def run(gen_params, refs, rng):
    params = {'generator': gen_params, 'z': jnp.zeros((config.model.embed_dim,), jnp.float32)}

    def step(carry, i):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, refs, jax.random.fold_in(rng, i))
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), hist = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
    return params['generator'], params['z'], hist

  return jax.jit(run, compiler_options=step_lib.compiler_options(config))
