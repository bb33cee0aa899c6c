"""Helpers shared by the trainer tests (test_train, test_sharding, test_checkpoint, test_multiprocess)."""

import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from configs import base
from idenc_jax.train import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(variant: str = 'tiny', **overrides):
  """configs/base.py:VARIANT with dotted-path overrides, e.g. tiny_config(**{'train.num_steps': 3})."""
  config = base.get_config(variant)
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def override_flags(**overrides) -> list[str]:
  return [f'--config.{k}={v}' for k, v in overrides.items()]


def read_state(workdir: str, step: int | None = None) -> dict:
  """A whole checkpointed train state (params, ema_params, opt_state, rng, step) as numpy arrays."""
  directory = ckpt_lib.checkpoint_dir(workdir)
  if step is None:
    step = max(int(d) for d in os.listdir(directory) if d.isdigit())
  path = os.path.join(directory, str(step), 'state')
  tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree
  with ocp.PyTreeCheckpointer() as ckptr:
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def flat(tree) -> dict:
  """{path string: numpy array} for every leaf of a tree."""
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(a, b, what: str = ''):
  """Bitwise equality of two trees of arrays with the same structure."""
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys(), f'{what}: structures differ: {sorted(fa.keys() ^ fb.keys())[:5]}'
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, f'{what}{k}: dtype/shape differ'
    assert np.array_equal(fa[k], fb[k]), (
        f'{what}{k}: max |diff| {np.max(np.abs(fa[k].astype(np.float64) - fb[k])):.3g}')


def assert_trees_close(a, b, *, rtol: float, atol: float, what: str = ''):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys(), f'{what}: structures differ'
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=atol, err_msg=f'{what}{k}')


def run_main(args: list[str], *, env: dict | None = None, timeout: float = 600,
             **kwargs) -> subprocess.CompletedProcess:
  """`python -m idenc_jax.main ARGS` in a subprocess (inherits the test environment by default)."""
  return subprocess.run([sys.executable, '-m', 'idenc_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, **kwargs)


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from the TensorBoard event files of `workdir`."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  out = {}
  for name in os.listdir(workdir):
    if not name.startswith('events.out.tfevents'):
      continue
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
      for value in event.summary.value:
        if value.HasField('tensor') and value.metadata.plugin_data.plugin_name == 'scalars':
          out.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
        elif value.HasField('simple_value'):
          out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out
