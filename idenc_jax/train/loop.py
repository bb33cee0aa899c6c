"""train_and_evaluate: the training loop (mesh, input, state, compiled step, checkpoints, metrics, samples)."""

import io
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
from idenc_jax.train import resume as resume_lib
from idenc_jax.train.run_control import ETA, PreemptionFlag, TimeBudget, format_duration
from idenc_jax.train import sharding as sharding_lib
from idenc_jax.train import state as state_lib
from idenc_jax.train import step as step_lib


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
    state, shardings = resume_lib.initial_state(config, mesh, checkpointer, data_position)
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
    writer.write_hparams(resume_lib.flat_fields(config.to_dict()))
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

