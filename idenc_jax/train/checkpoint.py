"""Checkpoints: the train state and the input pipeline's position, saved together with orbax.

Layout: WORKDIR/checkpoints/<step>/{state, data}. `data` holds one JSON file per process (grain's
format). Saves are asynchronous; `wait()` before exiting.
"""

import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


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

  def save(self, step: int, state, data: DataPosition, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), data=grain.checkpoint.CheckpointSave(data)), force=force)

  def restore(self, step: int, abstract_state, data: DataPosition):
    """Restores into `abstract_state`'s structure and shardings; sets the data position."""
    data_file = (epath.Path(checkpoint_dir(self.workdir)) / str(step) / 'data' /
                 f'process_{jax.process_index()}-of-{jax.process_count()}.json')
    if not data_file.exists():
      raise FileNotFoundError(
          f'{data_file} is missing: the checkpoint at step {step} was written by a different number of '
          f'processes than the {jax.process_count()} of this run (resume with the same process count).')
    state_args = ocp.args.PyTreeRestore(
        item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=state_args, data=grain.checkpoint.CheckpointRestore(data)))
    return out['state']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _resolve_step_dir(path: str) -> epath.Path:
  """A workdir, its checkpoints/ folder or one step folder -> the step folder to read."""
  p = epath.Path(absolute(path))
  if (p / 'checkpoints').exists():
    p = p / 'checkpoints'
  if (p / 'state').exists():
    return p
  steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit()) if p.exists() else []
  if not steps:
    raise FileNotFoundError(f'No checkpoint found in {path} (expected WORKDIR/checkpoints/<step>/state).')
  return p / str(steps[-1])


def load_params(path: str, *, ema: bool = True) -> dict[str, Any]:
  """Parameters ({'generator', 'encoder', ...}) of the latest checkpoint under `path`, as numpy arrays.

  EMA parameters by default (what sampling and evaluation use). Only that part of the state is read,
  whatever the mesh or process count that wrote it.
  """
  step_dir = _resolve_step_dir(path)
  key = 'ema_params' if ema else 'params'
  tree = ocp.PyTreeCheckpointHandler().metadata(step_dir / 'state').tree
  with ocp.PyTreeCheckpointer() as ckptr:
    if key not in tree:
      raise ValueError(f'{step_dir}/state holds no {key!r}; is it a checkpoint of this trainer?')
    item = {key: tree[key]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = ckptr.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  return out[key]


def checkpoint_step(path: str) -> int:
  return int(_resolve_step_dir(path).name)
