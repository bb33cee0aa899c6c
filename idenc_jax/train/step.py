"""The train step: a pure function (state, batch) -> (state, metrics), jitted once with shardings."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from idenc_jax import models, xla_options
from idenc_jax.train import losses
from idenc_jax.diffusion import schedules
from idenc_jax.train import state as state_lib
from idenc_jax.train import update as update_lib


def compiler_options(config, extra: dict[str, Any] | None = None,
                     platform: str | None = None) -> dict[str, Any] | None:
  """config.train.compiler_options -> {name: value} for `Lowered.compile`, with `extra` (a caller's options)
  over them; None when empty. Another platform's options are left out (`xla_options.parse`)."""
  return xla_options.from_config(config, 'train', extra, platform)


def compile_with_options(lowered, config, extra: dict[str, Any] | None = None):
  """`lowered.compile` with `compiler_options(config, extra)`; an option XLA rejects is a one-line
  ValueError naming config.train.compiler_options."""
  return xla_options.compile_lowered(lowered, config, 'train', extra)


def make_train_step(config, optimizer: optax.GradientTransformation):
  """Builds `train_step(state, batch)`. Models and schedule are closed over (static)."""
  generator = models.build_generator(config)
  encoder = models.build_encoder(config)
  cond_encoder = models.build_condition_encoder(config) if config.stage == 2 else None
  schedule = schedules.from_config(config)
  lr = state_lib.learning_rate_schedule(config)
  ema_decay = state_lib.ema_decay_schedule(config)

  def loss_fn(params, batch, rng, step):
    return losses.compute_loss(params, batch, rng, step, config=config, generator=generator,
                               encoder=encoder, schedule=schedule, cond_encoder=cond_encoder)

  def train_step(state: state_lib.TrainState, batch: dict):
    # Per-step randomness from the step number: a resumed run draws exactly the same numbers.
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng, state.step)
    decay = ema_decay(state.step)
    # A non-finite loss or gradient leaves the state untouched (step included); the host loop sees
    # `finite == 0` and stops, so the last checkpoint stays good.
    params, ema, opt_state, grad_norm, finite = update_lib.apply(config, optimizer, state, grads, loss, decay)
    new_state = state.replace(step=state.step + finite.astype(jnp.int32), params=params, ema_params=ema,
                              opt_state=opt_state)
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr(state.step), ema_decay=decay,
                   finite=finite.astype(jnp.float32), step=state.step)
    return new_state, metrics

  return train_step
