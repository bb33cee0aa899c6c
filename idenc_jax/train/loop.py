"""train_and_evaluate: the training loop (mesh, input, state, compiled step, checkpoints, metrics, samples)."""

import functools
import io
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers, parameter_overview
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image

from idenc_jax import models, xla_options
from idenc_jax.data import batch_layout
from idenc_jax.data import images as images_lib
from idenc_jax.data import pipeline
from idenc_jax.diffusion import generate as generate_lib
from idenc_jax.diffusion import samplers, schedules
from idenc_jax.train import checkpoint as ckpt_lib
from idenc_jax.train import prefetch as prefetch_lib
from idenc_jax.train.run_control import ETA, PreemptionFlag, TimeBudget, format_duration
from idenc_jax.train import sharding as sharding_lib
from idenc_jax.train import state as state_lib
from idenc_jax.train import step as step_lib
from idenc_jax.train import update as update_lib


class NonFiniteLossError(RuntimeError):
  pass


class Interrupted(RuntimeError):
  """Training stopped on SIGTERM or Ctrl-C, with a checkpoint (train_and_evaluate(raise_on_signal=True))."""


# ---------------------------------------------------------------------------------------------------------
# Input: a background thread takes batches from grain and puts them on the devices ahead of the step.
# ---------------------------------------------------------------------------------------------------------
class DevicePrefetcher(prefetch_lib.Prefetcher):
  """Yields (global batch, data position after it); `depth` batches are transferred ahead."""

  def __init__(self, iterator, mesh, depth: int):
    def take():
      local = next(iterator)
      position = ckpt_lib.DataPosition(iterator)
      return sharding_lib.global_batch(local, mesh), position
    super().__init__(take, depth)


# ---------------------------------------------------------------------------------------------------------
# Sample grids: held-out identities, their references beside EMA samples.
# ---------------------------------------------------------------------------------------------------------
class SampleGrid:
  def __init__(self, config):
    tc = config.train
    self.enabled = config.stage == 1 and tc.sample_every > 0 and tc.sample_identities > 0
    if not self.enabled:
      return
    ids = pipeline.make_eval_identities(config, 'test', max_identities=tc.sample_identities)
    n_ref = tc.num_references
    usable = {k: v for k, v in ids.items() if len(v) > n_ref}
    if not usable:
      raise ValueError(f'No held-out identity has more than {n_ref} images for the sample grid.')
    self.references = np.stack([v[:n_ref] for v in usable.values()])  # [I, R, H, W, 3] uint8
    schedule = schedules.from_config(config)
    start_t = config.diffusion.sample_start_t
    samplers.timestep_subsequence(schedule, tc.sample_steps, start_t=start_t)  # errors now, not at the first grid
    self.fn = generate_lib.make_identity_sampler(
        models.build_generator(config), models.build_encoder(config), schedule,
        num=4, sampler='ddim', num_steps=tc.sample_steps, start_t=start_t, guidance=config.eval.guidance,
        prediction=config.diffusion.prediction, compiler_options=xla_options.checked(config, 'sample'))
    self.rng = jax.random.key(config.seed + 1)

  def __call__(self, ema_params) -> np.ndarray:
    refs = images_lib.to_float(jnp.asarray(self.references))
    samples = self.fn(ema_params['generator'], ema_params['encoder'], refs, self.rng)
    # Parameters may be sharded over several hosts (FSDP); every process takes part in the sampler
    # and receives the whole grid.
    samples = images_lib.to_uint8(multihost_utils.process_allgather(samples, tiled=True))
    rows = [np.concatenate([self.references[i], samples[i]]) for i in range(len(samples))]
    return images_lib.image_grid(rows)


# ---------------------------------------------------------------------------------------------------------
# State: restore from the workdir, else initialise from an earlier stage (config.init_from), else fresh.
# ---------------------------------------------------------------------------------------------------------
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
    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)

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


def _restore_other_layout(config, abstract, shardings, mesh, checkpointer, step: int, data_position):
  """The checkpoint at `step`, whose optimizer state was written with config.train.flat_update flipped, restored
  in that layout and converted to this config's (the same numbers; the next save writes this config's)."""
  logging.info('Its optimizer state was written with config.train.flat_update=%s; converting it to this '
               'config\'s layout.', not update_lib.is_flat(config))
  optimizer = state_lib.make_optimizer(config, abstract.params)
  saved = abstract.replace(opt_state=update_lib.other_layout_shapes(config, optimizer, abstract.params))
  saved_shardings = sharding_lib.state_shardings(saved, mesh)
  saved = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), saved, saved_shardings)
  restored = checkpointer.restore(step, saved, data_position)
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
  old = _flat(json.loads(saved.read_text()))
  new = _flat(json.loads(config.to_json_best_effort()))
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


def _write_config(config, workdir: str):
  (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=2))


def _write_png(path: epath.Path, image: np.ndarray):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  path.write_bytes(buffer.getvalue())


def _mean_metrics(pending: list) -> tuple[dict, int | None]:
  """Means of the pending steps' metrics, and the state step of the first non-finite one (or None)."""
  host = jax.device_get(pending)
  out = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k not in ('step', 'finite')}
  bad = [int(m['step']) for m in host if not m['finite']]
  return out, (bad[0] if bad else None)


def train_and_evaluate(config, workdir: str, *, on_checkpoint=None,
                       raise_on_signal: bool = False) -> state_lib.TrainState:
  """Trains per `config`, writing checkpoints, TensorBoard logs and sample grids under `workdir`.

  Resumes from the workdir's latest checkpoint when there is one. Raises NonFiniteLossError (after
  keeping the last good checkpoint) when a step's loss or gradient is not finite. With
  `config.train.time_budget_minutes` > 0 it stops (with a checkpoint) at the first step past that wall time,
  counted from this call. on_checkpoint(step): called after each checkpoint is written (e.g. to time it).
  SIGTERM or Ctrl-C saves a checkpoint and returns, or with `raise_on_signal` raises Interrupted (for callers
  that would otherwise go on to other work, such as the next variant of a curve).
  """
  t_call = time.time()
  workdir = ckpt_lib.absolute(workdir)  # a local path or a URL (gs://...) all hosts can write
  is_main = jax.process_index() == 0
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  tc = config.train
  # Installed first: a preemption during start-up (compilation takes a while) still ends cleanly.
  preemption = PreemptionFlag()
  finished = False   # the loop returned normally (else a save error while closing must not hide its error)
  checkpointer = None
  prefetcher = None
  writer = None
  try:
    # ---- Mesh and input. ----
    mesh = sharding_lib.make_mesh(config)
    logging.info('Mesh %s over %d devices (%d processes).', dict(mesh.shape), mesh.size,
                 jax.process_count())
    spec = batch_layout.batch_spec(config)
    sharding_lib.check_batch_split(spec.id_size, spec.agnostic_size, mesh)
    iterator = pipeline.make_train_iterator(config)
    data_position = ckpt_lib.DataPosition(iterator)

    # ---- State: resume, init_from or fresh. ----
    checkpointer = ckpt_lib.Checkpointer(workdir, save_every=tc.checkpoint_every, keep=tc.keep_checkpoints)
    state, shardings = initial_state(config, mesh, checkpointer, data_position)
    if is_main:   # only once a checkpoint (if any) has been found compatible: it records how the model trained
      _write_config(config, workdir)
    start_step = int(state.step)
    if start_step >= tc.num_steps:
      logging.info('The workdir holds step %d >= train.num_steps=%d: nothing to train.', start_step,
                   tc.num_steps)
      return state
    # The per-array table goes to a file, one summary line to the console. Statistics need every shard on this
    # host; across hosts only shapes are listed.
    if is_main:
      table = parameter_overview.get_parameter_overview(state.params, include_stats=jax.process_count() == 1)
      (epath.Path(workdir) / 'parameters.txt').write_text(table + '\n')
    counts = {k: state_lib.count_params(v) for k, v in state.params.items()}
    logging.info('Parameters: %s (per array: %s/parameters.txt).',
                 ', '.join(f'{k} {n:,}' for k, n in counts.items()), workdir)

    # ---- The compiled step: jitted once, ahead of the loop, so compile time and memory are logged. ----
    optimizer = state_lib.make_optimizer(config, state.params)
    train_step = step_lib.make_train_step(config, optimizer)
    jitted = jax.jit(train_step, in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                     out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))
    prefetcher = DevicePrefetcher(iterator, mesh, config.data.prefetch)
    batch, position = prefetcher.next()
    t0 = time.time()
    lowered = jitted.lower(state, batch)
    t1 = time.time()
    compiled = step_lib.compile_with_options(lowered, config)
    logging.info('Train step traced in %.1f s, compiled (or read from the compilation cache) in %.1f s.',
                 t1 - t0, time.time() - t1)
    mem = compiled.memory_analysis()
    if mem is not None:
      logging.info('Step memory per device: arguments %.1f MiB, temporaries %.1f MiB.',
                   mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20)

    # ---- Metrics and samples: only process 0 writes files. ----
    # TensorBoard only (the console has its own one line per log point); hyperparameters there and in config.json.
    writer = (metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir)) if is_main
              else metric_writers.MultiWriter([]))
    writer.write_hparams(_flat(config.to_dict()))
    grids = SampleGrid(config)
    time_budget = TimeBudget(tc.time_budget_minutes, t_call)
    pending, last_log = [], time.time()
    step = start_step
    eta = ETA(start_step, tc.num_steps, time_budget)

    def flush_metrics(step):
      nonlocal pending, last_log
      if not pending:
        return
      means, bad = _mean_metrics(pending)
      if bad is not None:
        # The step left the state as it was, so every checkpoint on disk holds finite parameters.
        raise NonFiniteLossError(
            f'Non-finite loss or gradient at train step {bad + 1} (the update from step {bad}); the run '
            f'stops and keeps its last checkpoint (step {checkpointer.latest_step()}). Lower the '
            'learning rate or check the data.')
      dt = time.time() - last_log
      means['images_per_s'] = len(pending) * tc.batch_size / dt
      means['step_time_s'] = dt / len(pending)
      writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
      logging.info('step %d/%d | loss %.4f | %.1f img/s | ETA %s', step, tc.num_steps, means['loss'],
                   means['images_per_s'], format_duration(eta(step)))
      pending, last_log = [], time.time()

    while step < tc.num_steps:
      with jax.profiler.StepTraceAnnotation('train', step_num=step), jax.transfer_guard('disallow'):
        state, metrics = compiled(state, batch)
      pending.append(metrics)
      step += 1
      if step % tc.log_every == 0 or step == tc.num_steps:
        flush_metrics(step)
        checkpointer.check_for_errors()
      out_of_time = step < tc.num_steps and time_budget.check(step, tc.log_every)
      if step % tc.checkpoint_every == 0 or step == tc.num_steps or out_of_time:
        flush_metrics(step)  # never checkpoint a state whose steps have not been checked
        checkpointer.save(step, state, position, force=True)
        if on_checkpoint is not None:
          checkpointer.wait()
          on_checkpoint(step)
      if out_of_time:
        logging.info('Time budget of %g min reached at step %d: checkpoint saved, stopping.',
                     tc.time_budget_minutes, step)
        break
      if grids.enabled and (step % tc.sample_every == 0 or step == tc.num_steps):
        grid = grids(state.ema_params)
        if is_main:
          (epath.Path(workdir) / 'samples').mkdir(exist_ok=True)
          _write_png(epath.Path(workdir) / 'samples' / f'step_{step:07d}.png', grid)
          writer.write_images(step, {'samples/references_then_samples': grid[None]})
      if step < tc.num_steps and preemption.check(step, tc.log_every):
        flush_metrics(step)
        if checkpointer.latest_step() != step:
          checkpointer.save(step, state, position, force=True)
        logging.warning('Preempted at step %d: checkpoint saved, exiting.', step)
        if raise_on_signal:
          raise Interrupted(f'Training in {workdir} was interrupted at step {step} (checkpoint saved).')
        break
      if step < tc.num_steps:
        batch, position = prefetcher.next()
    finished = True
    return state
  finally:
    if prefetcher is not None:
      prefetcher.close()
    preemption.restore()
    if checkpointer is not None:
      checkpointer.close(raise_errors=finished)  # waits for the asynchronous saves
    if writer is not None:
      writer.flush()


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
