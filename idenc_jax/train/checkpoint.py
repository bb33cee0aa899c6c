"""Checkpoints: the train state and the input pipeline's position, saved together with orbax.

Layout: WORKDIR/checkpoints/<step>/{state, data}. `data` holds one JSON file per process (grain's
format). Saves are asynchronous; `wait()` before exiting.
"""

import json
import logging
import os
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils


class DataPosition:
  """The input pipeline's position after the last batch the train step consumed.

  Batches are prefetched, so the live iterator runs ahead of training; the loop records the
  iterator's state as each batch is taken and checkpoints that, in grain's format.
  """

  def __init__(self, iterator=None):
    self.iterator = iterator
    self.state = None if iterator is None else iterator.get_state()

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, state: bytes):
    self.state = json.loads(state.decode() if isinstance(state, bytes) else state)
    if self.iterator is not None:
      self.iterator.set_state(self.state)

  def start_prefetch(self):  # called by grain's handler after a restore
    pass


def absolute(path: str) -> str:
  """An absolute local path (orbax needs one); URLs such as gs://bucket/run pass unchanged."""
  return path if '://' in path else os.path.abspath(path)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(absolute(workdir), 'checkpoints')


# Replica-parallel saving (the replicas of a replicated array each write a slice of it) pays off for
# large arrays; for small ones slicing costs more than it saves (on CPU each slice is a compiled program:
# seconds per save for a small model on 8 simulated devices). Only slices of at least this size use it.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 2**20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """orbax's default handler for pytrees of arrays, but for the replica-parallel threshold."""
  try:  # the per-array metadata orbax's default array handler also keeps (no public path to it)
    from orbax.checkpoint._src.metadata import array_metadata_store  # private path: may move
    store = array_metadata_store.Store()
  except ImportError:
    store = None
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(
          min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL,
          array_metadata_store=store)),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (np.number, ocp.type_handlers.ScalarHandler()),
      (int, ocp.type_handlers.ScalarHandler()),
      (float, ocp.type_handlers.ScalarHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class IncompatibleCheckpointError(ValueError):
  """A readable checkpoint of another model than the config builds (no fallback to earlier steps)."""


class CheckpointSaveError(RuntimeError):
  """An asynchronous checkpoint save failed (e.g. a full disk)."""


class Checkpointer:
  """Saves and restores (train state, data position) pairs in WORKDIR/checkpoints, keeping the last `keep`."""

  def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(save_every, 1), max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.workdir = workdir
    self.manager = ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options,
        item_handlers={'state': _state_handler(), 'data': grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dirs(self) -> list[epath.Path]:
    """The saved steps' folders, newest first ([] when none)."""
    root = epath.Path(checkpoint_dir(self.workdir))
    return [root / str(s) for s in sorted(self.manager.all_steps(), reverse=True)]

  def save(self, step: int, state, data: DataPosition, *, force: bool = False) -> bool:
    """Starts an asynchronous save (orbax first waits for the previous one: its failure surfaces here too)."""
    try:
      return self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state), data=grain.checkpoint.CheckpointSave(data)), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from e

  def _save_error(self, e: BaseException) -> 'CheckpointSaveError':
    detail = ' '.join(str(e).split())
    if 'No space left' in detail:
      detail = 'No space left on device'
    return CheckpointSaveError(f'Saving a checkpoint under {checkpoint_dir(self.workdir)} failed ({type(e).__name__}: '
                               f'{detail[:300]}); is the disk full? The run stops; earlier checkpoints are intact.')

  def restore(self, step: int, abstract_state, data: DataPosition):
    """Restores into `abstract_state`'s structure and shardings; sets the data position."""
    data_file = (epath.Path(checkpoint_dir(self.workdir)) / str(step) / 'data' /
                 f'process_{jax.process_index()}-of-{jax.process_count()}.json')
    if not data_file.exists():
      raise IncompatibleCheckpointError(
          f'{data_file} is missing: the checkpoint at step {step} was written by a different number of '
          f'processes than the {jax.process_count()} of this run (resume with the same process count).')
    state_args = ocp.args.PyTreeRestore(
        item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=state_args, data=grain.checkpoint.CheckpointRestore(data)))
    check_finite({'params': out['state'].params, 'ema_params': out['state'].ema_params},
                 f'{checkpoint_dir(self.workdir)}/{step}/state ')
    return out['state']

  def set_aside(self, step_dirs: list[epath.Path]) -> None:
    """Moves damaged step folders to WORKDIR/damaged_checkpoints/ (kept for inspection, never deleted), so that
    training past their step numbers can save there again."""
    if jax.process_index() == 0:
      aside = epath.Path(self.workdir) / 'damaged_checkpoints'
      aside.mkdir(exist_ok=True)
      for d in step_dirs:
        target = aside / d.name
        while target.exists():
          target = aside / f'{target.name}_'
        d.rename(target)
        logging.warning('Moved the damaged checkpoint %s to %s.', d, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('damaged checkpoints set aside')
    self.manager.reload()

  def check_for_errors(self) -> None:
    """CheckpointSaveError if an asynchronous save that has finished failed; called at every log point so
    that a run stops at once rather than at its next checkpoint."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except  (orbax re-raises the writer's error as is)
      raise self._save_error(e) from e

  def wait(self):
    self.manager.wait_until_finished()

  def close(self, raise_errors: bool = True):
    """Waits for the asynchronous saves and closes; raise_errors=False (an error is already on its way out) logs
    a failed save instead of raising over that error."""
    try:
      self.manager.wait_until_finished()
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if raise_errors:
        raise self._save_error(e) from e
      logging.error('While stopping: %s', self._save_error(e))


def step_dirs(path: str) -> list[epath.Path]:
  """A workdir or its checkpoints/ folder -> its step folders, newest first; a step folder -> [itself]."""
  p = epath.Path(absolute(path))
  if (p / 'checkpoints').exists():
    p = p / 'checkpoints'
  if (p / 'state').exists():
    return [p]
  steps = sorted((int(c.name) for c in p.iterdir() if c.name.isdigit()), reverse=True) if p.exists() else []
  if not steps:
    raise FileNotFoundError(f'No checkpoint found in {path} (expected WORKDIR/checkpoints/<step>/state).')
  return [p / str(s) for s in steps]


def _resolve_step_dir(path: str) -> epath.Path:
  """A workdir, its checkpoints/ folder or one step folder -> the (newest) step folder to read."""
  return step_dirs(path)[0]


def first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0][:300] if text else ""}'


def newest_readable(candidates: list, read: Callable[[Any], Any], what: str, damaged: list | None = None) -> Any:
  """read(candidate) for the newest candidate that reads; a damaged newer one is skipped with a warning that names
  it (never deleted; appended to `damaged`). All damaged: ValueError naming the newest and its error. An
  IncompatibleCheckpointError is not damage: it propagates at once."""
  errors = []
  for i, candidate in enumerate(candidates):
    try:
      return read(candidate)
    except IncompatibleCheckpointError:
      raise
    except (ValueError, OSError, KeyError) as e:   # what damage looks like (TensorStore DATA_LOSS, JSON, files)
      errors.append(e)
      if damaged is not None:
        damaged.append(candidate)
      if i + 1 < len(candidates):
        logging.warning('Checkpoint %s is damaged (%s); falling back to %s. The damaged one is kept: move or '
                        'delete it.', candidate, first_line(e), candidates[i + 1])
  raise ValueError(f'No readable {what}: {candidates[0]} is damaged ({first_line(errors[0])})'
                   + (f', and so are the {len(candidates) - 1} earlier steps' if len(candidates) > 1 else '')
                   + '.') from errors[0]


def load_params(path: str, *, ema: bool = True) -> dict[str, Any]:
  """Parameters ({'generator', 'encoder', ...}) of the latest checkpoint under `path`, as numpy arrays.

  EMA parameters by default (what sampling and evaluation use). Only that part of the state is read,
  whatever the mesh or process count that wrote it. The values are checked to be finite; a damaged newest step
  (unreadable or non-finite) falls back to the previous one, with a warning.
  """
  key = 'ema_params' if ema else 'params'

  def read(step_dir):
    tree = ocp.PyTreeCheckpointHandler().metadata(step_dir / 'state').tree
    if key not in tree:
      raise ValueError(f'{step_dir}/state holds no {key!r}; is it a checkpoint of this trainer?')
    item = {key: tree[key]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with ocp.PyTreeCheckpointer() as ckptr:
      out = ckptr.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    check_finite(out[key], f'{step_dir}/state {key}')
    return out[key]

  return newest_readable(step_dirs(path), read, f'checkpoint under {path}')


def check_finite(tree, source: str) -> None:
  """ValueError naming the first array of `tree` (numpy or jax, any sharding) that holds NaN or inf."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  finite = jax.device_get([jnp.isfinite(v).all() if isinstance(v, jax.Array) else np.isfinite(v).all()
                           for _, v in leaves])
  for (path, _), ok in zip(leaves, finite):
    if not ok:
      raise ValueError(f'{source}{jax.tree_util.keystr(path)} holds NaN or inf: the checkpoint is damaged; '
                       'resume from an earlier step (delete the damaged step folder) or retrain.')


def shapes_by_path(tree) -> dict[str, tuple]:
  """{parameter path, e.g. "['conv_out']['kernel']": shape} of a tree of arrays or shape structs."""
  return {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def first_shape_difference(want: dict[str, tuple], got: dict[str, tuple]) -> str | None:
  """The first path (sorted) whose shape differs, or that only one side has; None when the two match."""
  return next((k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)), None)


def saved_shapes(path: str, key: str = 'params') -> dict[str, tuple]:
  """{parameter path: shape} of `key` in the checkpoint at `path` (a step folder, else the newest under it), from
  its metadata (no array read)."""
  tree = ocp.PyTreeCheckpointHandler().metadata(_resolve_step_dir(path) / 'state').tree
  return shapes_by_path(tree.get(key, {}))


def checkpoint_step(path: str) -> int:
  return int(_resolve_step_dir(path).name)


def checkpoint_step_or_none(path: str) -> int | None:
  """`checkpoint_step`, or None where `path` holds no checkpoint yet."""
  try:
    return checkpoint_step(path)
  except FileNotFoundError:
    return None
