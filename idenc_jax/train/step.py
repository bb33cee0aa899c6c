"""The train step: a pure function (state, batch) -> (state, metrics), jitted once with shardings."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from idenc_jax import models
from idenc_jax.train import losses
from idenc_jax.diffusion import schedules
from idenc_jax.train import state as state_lib
from idenc_jax.train import update as update_lib


_PLATFORM_PREFIXES = {'cpu': 'xla_cpu_', 'gpu': 'xla_gpu_', 'tpu': 'xla_tpu_'}


def compiler_options(config, extra: dict[str, Any] | None = None,
                     platform: str | None = None) -> dict[str, Any] | None:
  """config.train.compiler_options 'name=value;name=value' -> {name: value} for `Lowered.compile`, with
  `extra` (a caller's options) over them; None when empty. 'true' / 'false' become booleans and numbers
  numbers; anything else stays text (enum names). Options of another platform's compiler (xla_cpu_* on a
  GPU, xla_gpu_* on a CPU...) are left out, so one config serves every backend; `platform` defaults to
  jax's default backend."""
  platform = platform or jax.default_backend()
  foreign = tuple(prefix for name, prefix in _PLATFORM_PREFIXES.items() if name != platform)
  out = {}
  for item in filter(None, (p.strip() for p in config.train.compiler_options.split(';'))):
    name, sep, value = item.partition('=')
    if not sep or not name.strip():
      raise ValueError(f'config.train.compiler_options entry {item!r} is not name=value.')
    value = value.strip()
    lowered = value.lower()
    if lowered in ('true', 'false'):
      out[name.strip()] = lowered == 'true'
    else:
      try:
        out[name.strip()] = int(value)
      except ValueError:
        try:
          out[name.strip()] = float(value)
        except ValueError:
          out[name.strip()] = value
  out = {name: value for name, value in out.items() if not name.startswith(foreign)}
  return {**out, **(extra or {})} or None


def compile_with_options(lowered, config, extra: dict[str, Any] | None = None):
  """`lowered.compile` with `compiler_options(config, extra)`; an option XLA rejects (a misspelt name, a
  value of the wrong kind) is a one-line ValueError naming the field, not XLA's runtime error."""
  options = compiler_options(config, extra)
  try:
    return lowered.compile(options)
  except jax.errors.JaxRuntimeError as e:
    message = str(e).split('\n')[0]
    if options and message.startswith('INVALID_ARGUMENT') and 'option' in message:
      raise ValueError(f'config.train.compiler_options / compiler options {sorted(options)}: XLA says '
                       f'{message}') from e
    raise


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
