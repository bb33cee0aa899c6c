"""The train state a run starts from: the workdir's newest readable checkpoint, after checking that it holds this
config's model and batch layout (an optimizer state written with the other `train.flat_update` layout is
converted), else fresh parameters, overwritten with an earlier stage's where `config.init_from` names one."""

import functools
import json
import logging

import jax
from etils import epath

from idenc_jax.train import checkpoint as ckpt_lib
from idenc_jax.train import sharding as sharding_lib
from idenc_jax.train import state as state_lib
from idenc_jax.train import update as update_lib


def initial_state(config, mesh, checkpointer, data_position):
  """The train state, sharded over `mesh`, and its shardings.

  Resumes from the workdir's latest checkpoint (model and data position); else initialises fresh
  parameters on the devices, already sharded (never a full copy on one host), and with
  `config.init_from` overwrites those an earlier stage provides.
  """
  rng = jax.random.key(config.seed)
  create = lambda r: state_lib.create_train_state(config, r)  # one function: traced once, below
  abstract = jax.eval_shape(create, rng)
  shardings = sharding_lib.state_shardings(abstract, mesh)
  saved = checkpointer.step_dirs()
  if saved:
    check_same_batch_layout(config, checkpointer.workdir)
    abstract_sharded = _with_shardings(abstract, shardings)

    def resume(step_dir):
      other_layout = check_resumable(config, abstract, step_dir, checkpointer.workdir)
      logging.info('Resuming from the workdir checkpoint at step %s.', step_dir.name)
      if not other_layout:
        return checkpointer.restore(int(step_dir.name), abstract_sharded, data_position)
      return _restore_other_layout(config, abstract, shardings, mesh, checkpointer, int(step_dir.name),
                                   data_position)
    # A damaged newest step (a truncated file, flipped bytes) falls back to the one before, with a warning; the
    # damaged ones are set aside (not deleted), as training will save at their step numbers again.
    damaged = []
    state = ckpt_lib.newest_readable(saved, resume, f'checkpoint in {checkpointer.workdir}', damaged)
    if damaged:
      checkpointer.set_aside(damaged)
    return state, shardings

  state = jax.jit(create, out_shardings=shardings)(rng)
  if config.init_from:
    state = _init_from_earlier_stage(config, state)
  return state, shardings


def _with_shardings(abstract, shardings):
  """The shape structs of `abstract`, each with its sharding: the target a checkpoint is restored into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _restore_other_layout(config, abstract, shardings, mesh, checkpointer, step: int, data_position):
  """The checkpoint at `step`, whose optimizer state was written with config.train.flat_update flipped, restored
  in that layout and converted to this config's (the same numbers; the next save writes this config's)."""
  logging.info('Its optimizer state was written with config.train.flat_update=%s; converting it to this '
               'config\'s layout.', not update_lib.is_flat(config))
  optimizer = state_lib.make_optimizer(config, abstract.params)
  saved = abstract.replace(opt_state=update_lib.other_layout_shapes(config, optimizer, abstract.params))
  restored = checkpointer.restore(step, _with_shardings(saved, sharding_lib.state_shardings(saved, mesh)),
                                  data_position)
  relayout = jax.jit(functools.partial(update_lib.relayout_opt_state, config, optimizer),
                     out_shardings=shardings.opt_state)
  return restored.replace(opt_state=relayout(restored.params, restored.opt_state))


def check_resumable(config, abstract_state, step_dir, workdir: str) -> bool:
  """IncompatibleCheckpointError (a ValueError), before anything is restored or written, when the checkpoint at
  `step_dir` holds another model than `config` builds (it names the first differing parameter) or an optimizer
  state of another shape, with the config fields that differ from the run's config.json. Returns whether its
  optimizer state has the other layout (config.train.flat_update flipped), which the restore converts."""
  want, got = ckpt_lib.shapes_by_path(abstract_state.params), ckpt_lib.saved_shapes(str(step_dir))
  bad = ckpt_lib.first_shape_difference(want, got)
  # The optimizer state's paths are spelt differently in checkpoint metadata (namedtuples), so its arrays
  # are compared by shape: one flat vector per moment, or one array per parameter.
  shapes = lambda tree: sorted(ckpt_lib.shapes_by_path(tree).values())
  got_opt = sorted(ckpt_lib.saved_shapes(str(step_dir), 'opt_state').values())
  if bad is None and got_opt == shapes(abstract_state.opt_state):
    return False
  if bad is None and config.stage != 2:   # stage 2 has no flat layout
    optimizer = state_lib.make_optimizer(config, abstract_state.params)
    if got_opt == shapes(update_lib.other_layout_shapes(config, optimizer, abstract_state.params)):
      return True
  fields = ''
  if (epath.Path(workdir) / 'config.json').exists():
    diff = [f'{k}: {old!r} -> {new!r}' for k, (old, new) in config_changes(config, workdir).items()]
    fields = f'; config fields changed since config.json: {", ".join(diff[:6]) or "none"}'
  if bad is not None:
    what = f'a checkpoint of another model: params{bad} is {got.get(bad)} there but {want.get(bad)} in this config'
  else:
    what = (f'a checkpoint whose optimizer state differs ({len(got_opt)} arrays there, '
            f'{len(shapes(abstract_state.opt_state))} in this config)')
  raise ckpt_lib.IncompatibleCheckpointError(
      f'{workdir} holds {what}{fields}. Train in a new --workdir, or pass the config the checkpoint was trained '
      'with.')


def config_changes(config, workdir: str) -> dict[str, tuple]:
  """{field: (value in the workdir's config.json, value in `config`)} for every dotted field that differs, in
  sorted order; None stands for a field one side lacks (values other than numbers, strings and booleans are
  compared as strings, so a real None is 'None'). {} without a config.json."""
  saved = epath.Path(workdir) / 'config.json'
  if not saved.exists():
    return {}
  old = flat_fields(json.loads(saved.read_text()))
  new = flat_fields(json.loads(config.to_json_best_effort()))
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


# The batch layout's fields, and the value a config.json written before the field existed trained with.
_LAYOUT_FIELDS = (('agnostic_fraction', 0.5), ('images_per_identity', None))


def check_same_batch_layout(config, workdir: str) -> None:
  """IncompatibleCheckpointError when the workdir's config.json trained with another batch layout (agnostic
  share or images per identity; a config.json from before the agnostic share existed had the paper's half):
  resuming would change the batches, and a resumed run is meant to see the batches it would have seen."""
  saved = epath.Path(workdir) / 'config.json'
  if not saved.exists():
    return
  data = json.loads(saved.read_text()).get('data', {})
  for field, before in _LAYOUT_FIELDS:
    old, new = data.get(field, before), config.data[field]
    if old is not None and old != new:
      raise ckpt_lib.IncompatibleCheckpointError(
          f'{workdir} was trained with data.{field}={old} (its config.json), this config has {new}: pass '
          f'--config.data.{field}={old} to continue it, or train in a new --workdir.')


def _init_from_earlier_stage(config, state: state_lib.TrainState) -> state_lib.TrainState:
  """Copies an earlier stage's EMA parameters into a fresh state (params and EMA alike).

  Adam's moments and count are zero whatever the parameters, so the fresh optimizer state stands.
  """
  loaded = ckpt_lib.load_params(config.init_from, ema=True)
  merged = state_lib.params_from_earlier_stage(config, state.params, loaded)

  def place(new, fresh):
    # Copied arrays are host arrays: each process puts its own shards on its devices.
    if new is fresh:
      return fresh
    return jax.make_array_from_callback(fresh.shape, fresh.sharding, lambda index: new[index])

  params = jax.tree.map(place, merged, state.params)
  # A second copy for the EMA: params and EMA must be distinct buffers (the state is donated).
  ema = jax.tree.map(lambda new, p, e: e if new is p else place(new, e), merged, state.params,
                     state.ema_params)
  logging.info('Initialised from %s (step %d).', config.init_from,
               ckpt_lib.checkpoint_step(config.init_from))
  return state.replace(params=params, ema_params=ema)


def flat_fields(d, prefix=''):
  """{'train.batch_size': 16, ...}: a nested dict's leaves by dotted path (values other than numbers, strings and
  booleans as strings)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat_fields(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
