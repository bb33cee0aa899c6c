"""What the benchmark, the profile and the check run on: synthetic batches, random parameters, a train
state, a fixed batch's loss and gradients, the input feed and the sampling step's network call.

Batches are synthetic uint8 images of the training batch's structure, built on the host; there is no
data pipeline (grain, TensorFlow), so all of this runs on a bare accelerator image. Parameters are
random (numpy, seeded) rather than a fresh model's: its zero-initialised output layers would hide
whole branches, and zeros can run faster than real data on some devices.
"""

from __future__ import annotations

import itertools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from idenc_jax import models, xla_options
from idenc_jax.data.batch_layout import batch_spec
from idenc_jax.diffusion import schedules
from idenc_jax.train import losses
from idenc_jax.train import prefetch as prefetch_lib
from idenc_jax.train import state as state_lib
from idenc_jax.train import step as step_lib
from idenc_jax.train import update as update_lib


def synthetic_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A host batch of the training batch's structure: K groups of M identity images + the agnostic images."""
  spec = batch_spec(config, 0, 1, training=False)   # timing only: one group is allowed
  b, r, m, n_id = config.train.batch_size, config.model.resolution, spec.images_per_identity, spec.id_size
  rng = np.random.default_rng(seed)
  groups = np.repeat(np.arange(n_id // m, dtype=np.int32), m)
  return {
      'id_images': rng.integers(0, 256, (n_id, r, r, 3), dtype=np.uint8),
      'id_labels': groups + 1000 * seed,
      'id_groups': groups,
      'agnostic_images': rng.integers(0, 256, (b - n_id, r, r, 3), dtype=np.uint8),
  }


def random_params(abstract_params, seed: int = 0):
  """Numpy-random parameters of the given shapes (identical on every platform).

  Kernels ~ N(0, 1/fan_in) (the last axis is the output), norm scales ~ 1 + N(0, 0.1^2), biases and
  everything else ~ N(0, 0.1^2). Unlike a fresh model, no output layer is zero.
  """
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  out = []
  for path, leaf in leaves:
    names = [str(getattr(k, 'key', k)) for k in path]
    shape = tuple(leaf.shape)
    noise = rng.standard_normal(shape).astype(np.float32)
    if names[-1] == 'kernel':
      # DenseGeneral's query/key/value kernels are [in, heads, head_dim]; every other kernel has its
      # inputs on all but the last axis.
      split_out = len(shape) == 3 and len(names) > 1 and names[-2] in ('query', 'key', 'value')
      fan_in = shape[0] if split_out else int(np.prod(shape[:-1]))
      value = noise / math.sqrt(max(fan_in, 1))
    elif names[-1] == 'scale':
      value = 1.0 + 0.1 * noise
    else:
      value = 0.1 * noise
    out.append(value.astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def model_params(config, seed: int = 0):
  """`random_params` of the shapes `config`'s model has ({'generator', 'encoder', ...})."""
  abstract = jax.eval_shape(lambda k: state_lib.init_params(config, k), jax.random.key(seed))
  return random_params(abstract, seed)


def build_state(config, seed: int = 0):
  """(train state on the default device with random parameters, optimizer)."""
  host_params = model_params(config, seed)
  params = jax.device_put(host_params)
  optimizer = state_lib.make_optimizer(config, params)
  opt_state = jax.jit(lambda p: update_lib.init_opt_state(config, optimizer, p))(params)
  # EMA gets buffers of its own: the donated state must not hold one buffer twice.
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               ema_params=jax.device_put(host_params), opt_state=opt_state,
                               rng=jax.random.key_data(jax.random.key(seed + 1)))
  return state, optimizer


def fixed_batch_loss_and_grads(config, seed: int = 0, step: int | None = None,
                               compiler_options: dict | None = None):
  """(loss, metrics, gradients) of a fixed synthetic batch with seeded random parameters.

  Everything random comes from numpy or threefry, so the values are the same on every platform up to
  the compute dtype's rounding. `step` defaults to the end of the curriculum, so that most groups
  keep their identity and every loss term takes part.
  """
  if step is None:
    step = config.loss.curriculum_steps
  params = model_params(config, seed)
  batch = synthetic_batch(config, seed)
  gen, enc = models.build_generator(config), models.build_encoder(config)
  sched = schedules.from_config(config)

  def loss_fn(p):
    return losses.compute_loss(p, batch, jax.random.key(seed + 7), step, config=config, generator=gen,
                               encoder=enc, schedule=sched)

  lowered = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(params)
  fn = step_lib.compile_with_options(lowered, config, compiler_options)   # as the trainer, then the caller's
  (loss, metrics), grads = fn(params)
  return float(loss), jax.device_get(metrics), jax.device_get(grads)


def fixed_batch_loss(config, seed: int = 0, step: int | None = None,
                     compiler_options: dict | None = None) -> dict[str, float]:
  """Loss, gradient norm and identity diffusion term of `fixed_batch_loss_and_grads`."""
  loss, metrics, grads = fixed_batch_loss_and_grads(config, seed, step, compiler_options)
  grad_norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads))))
  return {'loss': loss, 'grad_norm': grad_norm, 'diff_id': float(metrics.get('diff_id', loss))}


class Feeder(prefetch_lib.Prefetcher):
  """Host batches (cycled) -> device, `depth` batches ahead on a thread (depth 0: synchronously), as the
  trainer's DevicePrefetcher, so that a timed step includes what the trainer's step waits for."""

  def __init__(self, host_batches: list[dict], depth: int):
    batches = itertools.cycle(host_batches)
    super().__init__(lambda: jax.device_put(next(batches)), depth)


def compile_sample_step(config, params, batch: int):
  """(compiled generator forward, its arguments, compile seconds): a sampling step's network call, compiled
  with config.sample.compiler_options as the samplers are."""
  if config.stage == 2:
    raise ValueError('sample-step timing covers stage 0/1 generators (stage 2 needs condition tokens).')
  gen = models.build_generator(config)
  r = config.model.resolution
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (batch, r, r, 3), jnp.float32)
  t = jax.random.randint(keys[1], (batch,), 0, config.diffusion.timesteps)
  z = None if config.stage == 0 else jax.random.normal(keys[2], (batch, config.model.embed_dim))
  fn = jax.jit(lambda p, x, t, z: gen.apply({'params': p}, x, t, z))
  t0 = time.perf_counter()
  compiled = xla_options.compile_lowered(fn.lower(params, x, t, z), config, 'sample')
  return compiled, (params, x, t, z), time.perf_counter() - t0
