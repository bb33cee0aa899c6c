"""The train state, the optimizer and parameter initialisation (fresh or from an earlier stage)."""

import logging
from typing import Any, Callable

import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from idenc_jax import models
from idenc_jax.train import update as update_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any            # {'generator': ..., 'encoder': ...} (+ 'cond_encoder' in stage 2)
  ema_params: Any
  opt_state: Any
  rng: jax.Array          # raw uint32 key data: checkpoints hold plain arrays


LR_SCHEDULES = ('constant', 'cosine')


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warm-up from 0 to the learning rate, then constant (paper appendix A) or, with
  `train.lr_schedule='cosine'`, a cosine decay to 0 at `train.num_steps` (a short run ends at a low rate
  instead of at the noisy peak)."""
  t = config.train
  if t.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f'Unknown learning-rate schedule {t.lr_schedule!r} (config.train.lr_schedule); '
                     f'choose from {list(LR_SCHEDULES)}.')
  warmup = max(t.warmup_steps, 1)
  if t.lr_schedule == 'constant':
    after = optax.constant_schedule(t.learning_rate)
  else:
    after = optax.cosine_decay_schedule(t.learning_rate, max(t.num_steps - warmup, 1))
  return optax.join_schedules([optax.linear_schedule(0.0, t.learning_rate, warmup), after], [warmup])


def ema_decay_schedule(config) -> Callable[[jax.Array], jax.Array]:
  """EMA decay at update n: min(ema_decay, (1 + n) / (ema_warmup + n)), or ema_decay with no warm-up.

  Without the warm-up the average keeps ema_decay^n of the initial weights, whose zero-initialised
  output layers predict no noise: after 1,000 steps at 0.998 that is 13%, enough to turn every sample
  of a short run into saturated noise. With it the average forgets the initialisation at once and
  reaches ema_decay after about (ema_warmup - 1) / (1 - ema_decay) updates.
  """
  decay, warmup = config.train.ema_decay, config.train.ema_warmup
  if warmup <= 0:
    return lambda n: jnp.asarray(decay, jnp.float32)
  return lambda n: jnp.minimum(decay, (1.0 + n) / (warmup + jnp.asarray(n, jnp.float32)))


def trainable_mask(config, params) -> Any:
  """True for parameters that train. Stage 2 trains only the condition encoder and cross-attention."""
  if config.stage != 2:
    return jax.tree.map(lambda _: True, params)
  flat = flax.traverse_util.flatten_dict(params)
  mask = {k: k[0] == 'cond_encoder' or any(part.endswith('_xattn') for part in k) for k in flat}
  return flax.traverse_util.unflatten_dict(mask)


def make_optimizer(config, params) -> optax.GradientTransformation:
  t = config.train
  chain = []
  if t.grad_clip and t.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(t.grad_clip))
  chain.append(optax.adamw(learning_rate_schedule(config), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay))
  opt = optax.chain(*chain)
  if config.stage == 2:
    mask = trainable_mask(config, params)
    labels = jax.tree.map(lambda m: 'train' if m else 'frozen', mask)
    opt = optax.multi_transform({'train': opt, 'frozen': optax.set_to_zero()}, labels)
  return opt


def init_params(config, rng: jax.Array) -> dict:
  """Fresh parameters for the models of `config.stage` (call under jit/eval_shape)."""
  r, d = config.model.resolution, config.model.embed_dim
  x = jnp.zeros((1, r, r, 3), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  rg, re, rc = jax.random.split(rng, 3)
  params = {}
  z = None if config.stage == 0 else jnp.zeros((1, d), jnp.float32)
  context = None
  if config.stage == 2:
    cond_enc = models.build_condition_encoder(config)
    cond_in = jnp.zeros((1, r, r, condition_channels(config)), jnp.float32)
    params['cond_encoder'] = cond_enc.init(rc, cond_in)['params']
    context = cond_enc.apply({'params': params['cond_encoder']}, cond_in)
  params['generator'] = models.build_generator(config).init(rg, x, t, z, context)['params']
  if config.stage >= 1:
    params['encoder'] = models.build_encoder(config).init(re, x)['params']
  return params


def condition_channels(config) -> int:
  """Channels of the stage-2 condition image: RGB, plus the mask for inpainting."""
  return 4 if config.stage2.task == 'inpaint' else 3


def create_train_state(config, rng: jax.Array, params=None) -> TrainState:
  """A fresh train state (call under jit with out_shardings to build it sharded)."""
  rng_params, rng_train = jax.random.split(rng)
  if params is None:
    params = init_params(config, rng_params)
  opt = make_optimizer(config, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=update_lib.init_opt_state(config, opt, params), rng=jax.random.key_data(rng_train))


def merge_pretrained(fresh: dict, loaded: dict, prefix: str = '') -> tuple[dict, list[str], list[str]]:
  """Copy every array of `loaded` into `fresh` where the path and shape match.

  Returns the merged tree, the copied paths and the paths left at their fresh values (new parts,
  such as the identity-conditioning projections added in stage 1).
  """
  flat_fresh = flax.traverse_util.flatten_dict(fresh, sep='/')
  flat_loaded = flax.traverse_util.flatten_dict(loaded, sep='/')
  unused = sorted(set(flat_loaded) - set(flat_fresh))
  if unused:
    raise ValueError(f'init_from: the checkpoint holds {len(unused)} arrays this model lacks (e.g. '
                     f'{prefix}{unused[0]}); the architectures differ.')
  merged, copied, kept = {}, [], []
  for path, value in flat_fresh.items():
    src = flat_loaded.get(path)
    if src is not None and tuple(src.shape) == tuple(value.shape):
      merged[path] = np.asarray(src, value.dtype)  # host copy; the caller places it on the devices
      copied.append(prefix + path)
    else:
      if src is not None:
        raise ValueError(f'init_from: {prefix}{path} has shape {tuple(src.shape)} in the checkpoint but '
                         f'{tuple(value.shape)} in this model; the architectures differ.')
      merged[path] = value
      kept.append(prefix + path)
  return flax.traverse_util.unflatten_dict(merged, sep='/'), copied, kept


def params_from_earlier_stage(config, fresh: dict, loaded: dict) -> dict:
  """Initialise this stage's parameters from an earlier stage's (EMA) parameters.

  Stage 1 from stage 0: the generator is copied, its new conditioning layers and the encoder stay
  fresh. Stage 2 from stage 1: generator and identity encoder are copied, the condition encoder and
  cross-attention layers stay fresh.
  """
  if 'generator' not in loaded:
    raise ValueError(f'init_from={config.init_from!r}: the checkpoint has no generator parameters '
                     f'(it holds {sorted(loaded)}).')
  out = dict(fresh)
  for name in ('generator', 'encoder'):
    if name in fresh and name in loaded:
      out[name], copied, kept = merge_pretrained(fresh[name], loaded[name], prefix=f'{name}/')
      logging.info('init_from: copied %d arrays of %s, %d new: %s', len(copied), name, len(kept),
                   ', '.join(kept[:20]) + (' ...' if len(kept) > 20 else ''))
  return out


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
