"""train_and_evaluate: the training loop (mesh, input, state, compiled step, checkpoints, metrics, samples)."""

import json
import logging
import os
import queue
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions
from jax.experimental import multihost_utils
from PIL import Image

from idenc_jax import models, sampling
from idenc_jax.data import pipeline
from idenc_jax.diffusion import schedules
from idenc_jax.train import checkpoint as ckpt_lib
from idenc_jax.train import sharding as sharding_lib
from idenc_jax.train import state as state_lib
from idenc_jax.train import step as step_lib


class NonFiniteLossError(RuntimeError):
  pass


# ---------------------------------------------------------------------------------------------------------
# Input: a background thread takes batches from grain and puts them on the devices ahead of the step.
# ---------------------------------------------------------------------------------------------------------
class DevicePrefetcher:
  """Yields (global batch, data position after it); `depth` batches are transferred ahead."""

  def __init__(self, iterator, mesh, depth: int):
    self.iterator, self.mesh, self.depth = iterator, mesh, depth
    self.queue = queue.Queue(maxsize=max(depth, 1))
    self.stop = threading.Event()
    self.thread = None
    if depth > 0:
      self.thread = threading.Thread(target=self._fill, daemon=True)
      self.thread.start()

  def _take(self):
    local = next(self.iterator)
    position = ckpt_lib.DataPosition(self.iterator)
    return sharding_lib.global_batch(local, self.mesh), position

  def _fill(self):
    try:
      while not self.stop.is_set():
        item = self._take()
        while not self.stop.is_set():
          try:
            self.queue.put(item, timeout=0.1)
            break
          except queue.Full:
            pass
    except BaseException as e:  # surfaced in the main thread
      self.queue.put(e)

  def next(self):
    if self.thread is None:
      return self._take()
    item = self.queue.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self.stop.set()
    if self.thread is not None:
      self.thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM sets a flag; the loop saves and exits at the next step boundary.
# ---------------------------------------------------------------------------------------------------------
class PreemptionFlag:
  def __init__(self):
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning('SIGTERM received: saving a checkpoint and exiting.')
    self.requested = True

  def check(self, step: int, every: int) -> bool:
    if jax.process_count() > 1:
      # Every process must stop at the same step; agreeing costs a host sync, so only every `every` steps.
      if step % every:
        return False
      return bool(multihost_utils.process_allgather(np.array(self.requested)).any())
    return self.requested

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


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
    self.fn = sampling.make_identity_sampler(
        models.build_generator(config), models.build_encoder(config), schedules.from_config(config),
        num=4, sampler='ddim', num_steps=tc.sample_steps)
    self.rng = jax.random.key(config.seed + 1)

  def __call__(self, ema_params) -> np.ndarray:
    refs = jnp.asarray(self.references, jnp.float32) / 127.5 - 1.0
    samples = sampling.to_uint8(self.fn(ema_params['generator'], ema_params['encoder'], refs, self.rng))
    rows = [np.concatenate([self.references[i], samples[i]]) for i in range(len(samples))]
    return sampling.image_grid(rows)


# ---------------------------------------------------------------------------------------------------------
# State: restore from the workdir, else initialise from an earlier stage (config.init_from), else fresh.
# ---------------------------------------------------------------------------------------------------------
def initial_state(config, mesh, checkpointer, data_position):
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(lambda r: state_lib.create_train_state(config, r), rng)
  shardings = sharding_lib.state_shardings(abstract, mesh)
  latest = checkpointer.latest_step()
  if latest is not None:
    logging.info('Resuming from the workdir checkpoint at step %d.', latest)
    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)
    return checkpointer.restore(latest, abstract_sharded, data_position), shardings

  create = jax.jit(lambda r, p: state_lib.create_train_state(config, r, p), out_shardings=shardings)
  if config.init_from:
    loaded = ckpt_lib.load_params(config.init_from, ema=True)
    fresh = jax.jit(lambda r: state_lib.init_params(config, r))(jax.random.split(rng)[0])
    params = state_lib.params_from_earlier_stage(config, fresh, loaded)
    logging.info('Initialised from %s (step %d).', config.init_from, ckpt_lib.checkpoint_step(config.init_from))
    return create(rng, params), shardings
  fresh = jax.jit(lambda r: state_lib.init_params(config, r))(jax.random.split(rng)[0])
  return create(rng, fresh), shardings


def _write_config(config, workdir):
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))


def _mean_metrics(pending: list) -> dict:
  host = jax.device_get(pending)
  out = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k not in ('step', 'finite')}
  bad = [int(m['step']) for m in host if not m['finite']]
  return out, (bad[0] if bad else None)


def train_and_evaluate(config, workdir: str) -> state_lib.TrainState:
  """Trains per `config`, writing checkpoints, TensorBoard logs and sample grids under `workdir`."""
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    _write_config(config, workdir)
  tc = config.train

  # ---- Mesh and input. ----
  mesh = sharding_lib.make_mesh(config)
  logging.info('Mesh %s over %d devices (%d processes).', dict(mesh.shape), mesh.size, jax.process_count())
  iterator = pipeline.make_train_iterator(config)
  data_position = ckpt_lib.DataPosition(iterator)

  # ---- State: resume, init_from or fresh. ----
  checkpointer = ckpt_lib.Checkpointer(workdir, save_every=tc.checkpoint_every, keep=tc.keep_checkpoints)
  state, shardings = initial_state(config, mesh, checkpointer, data_position)
  start_step = int(state.step)
  if is_main:
    parameter_overview.log_parameter_overview(state.params)
  logging.info('Parameters: %s.', {k: state_lib.count_params(v) for k, v in state.params.items()})

  # ---- The compiled step. ----
  optimizer = state_lib.make_optimizer(config, state.params)
  train_step = step_lib.make_train_step(config, optimizer)
  batch_sh = sharding_lib.batch_sharding(mesh)
  jitted = jax.jit(train_step, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))
  prefetcher = DevicePrefetcher(iterator, mesh, config.data.prefetch)
  batch, position = prefetcher.next()
  t0 = time.time()
  compiled = jitted.lower(state, batch).compile()
  logging.info('Compiled the train step in %.1f s.', time.time() - t0)
  mem = compiled.memory_analysis()
  if mem is not None:
    logging.info('Step memory: arguments %.1f MiB, temporaries %.1f MiB.',
                 mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20)

  # ---- Metrics, samples, preemption. ----
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()})
  report = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer)
  grids = SampleGrid(config)
  preemption = PreemptionFlag()
  pending, last_log = [], time.time()
  step = start_step

  def flush_metrics(step):
    nonlocal pending, last_log
    if not pending:
      return
    means, bad_step = _mean_metrics(pending)
    if bad_step is not None:
      raise NonFiniteLossError(
          f'Non-finite loss or gradient at step {bad_step}; the run stops and the last checkpoint '
          f'(step {checkpointer.latest_step()}) is kept. Lower the learning rate or check the data.')
    dt = time.time() - last_log
    means['images_per_s'] = len(pending) * tc.batch_size / dt
    means['step_time_s'] = dt / len(pending)
    writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
    logging.info('step %d: loss %.4f (%.1f img/s)', step, means['loss'], means['images_per_s'])
    pending, last_log = [], time.time()

  try:
    while step < tc.num_steps:
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, metrics = compiled(state, batch)
      pending.append(metrics)
      step += 1
      report(step)
      if step % tc.log_every == 0 or step == tc.num_steps:
        flush_metrics(step)
      if step % tc.checkpoint_every == 0 or step == tc.num_steps:
        flush_metrics(step)  # never checkpoint a state whose steps have not been checked
        checkpointer.save(step, state, position, force=True)
      if grids.enabled and (step % tc.sample_every == 0 or step == tc.num_steps):
        grid = grids(state.ema_params)
        if is_main:
          os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
          Image.fromarray(grid).save(os.path.join(workdir, 'samples', f'step_{step:07d}.png'))
          writer.write_images(step, {'samples/references_then_samples': grid[None]})
      if preemption.check(step, tc.log_every):
        flush_metrics(step)
        checkpointer.save(step, state, position, force=True)
        logging.warning('Preempted at step %d: checkpoint saved, exiting.', step)
        break
      if step < tc.num_steps:
        batch, position = prefetcher.next()
  finally:
    prefetcher.close()
    preemption.restore()
    checkpointer.close()
    writer.flush()
  return state


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
