"""The parameter update of a train step: optimizer, EMA and the non-finite guard.

Per parameter array, or with `config.train.flat_update` (the `cpu` configs' default) on one flat vector of
all the parameters: the same arithmetic, element by element, in a handful of operations instead of several
per array. XLA:CPU runs every operation of a compiled step as a thunk of its own; the per-array update of
the `cpu` model (460 arrays: Adam, the global-norm clip, the EMA and the guard over parameters, EMA and
both moments) was about three quarters of its train step's 9,273 operations, each one to compile, to
load back from the compilation cache and to dispatch at every step. The flat update concatenates every
array into one vector on each device, so it is for replicated parameters (not FSDP-sharded ones), and
its optimizer state holds the moments as flat vectors (`init_opt_state`); a checkpoint written with the
other layout is converted as it is restored (`relayout_opt_state`). Stage 2 freezes parameters array by
array, so it keeps the per-array form.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree


def is_flat(config) -> bool:
  """Whether the update runs on one flat vector (config.train.flat_update; never in stage 2 or with FSDP)."""
  if not config.train.flat_update:
    return False
  if config.stage == 2:
    raise ValueError('config.train.flat_update=True does not apply to stage 2 (it freezes the stage-1 '
                     'parameters array by array): set it to False.')
  if config.mesh.fsdp != 1:
    raise ValueError(f'config.train.flat_update=True needs replicated parameters, but config.mesh.fsdp='
                     f'{config.mesh.fsdp} shards them (the flat vector would gather every shard): set one of '
                     'them back.')
  return True


def init_opt_state(config, optimizer: optax.GradientTransformation, params) -> Any:
  """The optimizer state of `params`, laid out as the update of `config` uses it."""
  return _init(optimizer, params, is_flat(config))


def _init(optimizer: optax.GradientTransformation, params, flat: bool) -> Any:
  return optimizer.init(ravel_pytree(params)[0] if flat else params)


def other_layout_shapes(config, optimizer: optax.GradientTransformation, abstract_params) -> Any:
  """The shapes of the optimizer state that `config` would have with config.train.flat_update flipped."""
  return jax.eval_shape(lambda p: _init(optimizer, p, not is_flat(config)), abstract_params)


def relayout_opt_state(config, optimizer: optax.GradientTransformation, params, saved_opt_state) -> Any:
  """`saved_opt_state`, written with the other layout (config.train.flat_update flipped), in the layout of
  `config`: each moment concatenated into one vector in ravel_pytree's order (the order the flat update
  uses) or split back into arrays; the counters as they are. The same numbers, moved, none recomputed."""
  is_moment = lambda node: jax.tree.structure(node) == jax.tree.structure(params)
  if is_flat(config):
    return jax.tree.map(lambda n: ravel_pytree(n)[0] if is_moment(n) else n, saved_opt_state, is_leaf=is_moment)
  unravel = ravel_pytree(params)[1]
  target = jax.eval_shape(lambda p: _init(optimizer, p, False), params)
  return jax.tree.map(lambda t, s: unravel(s) if is_moment(t) else s, target, saved_opt_state, is_leaf=is_moment)


def apply(config, optimizer: optax.GradientTransformation, state, grads, loss: jax.Array, decay: jax.Array):
  """One update of `state` (a TrainState) by `grads`: returns (params, ema_params, opt_state, grad_norm,
  finite). A non-finite loss or gradient norm leaves parameters, EMA and optimizer state unchanged."""
  # The same arithmetic on either layout: the flat vector is a pytree of one leaf.
  if is_flat(config):
    g, unravel = ravel_pytree(grads)
    p, e = ravel_pytree(state.params)[0], ravel_pytree(state.ema_params)[0]
  else:
    g, p, e, unravel = grads, state.params, state.ema_params, lambda tree: tree
  grad_norm = optax.tree.norm(g)
  updates, opt_state = optimizer.update(g, state.opt_state, p)
  new_p = optax.apply_updates(p, updates)
  # e + (1-d)(p-e) rather than d*e + (1-d)*p: equal in exact arithmetic, but this form leaves an
  # unchanged parameter's average bit-identical (stage 2's frozen weights), which the other rounds.
  new_e = jax.tree.map(lambda e_, p_: e_ + (1.0 - decay) * (p_ - e_), e, new_p)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return unravel(keep(new_p, p)), unravel(keep(new_e, e)), keep(opt_state, state.opt_state), grad_norm, finite
