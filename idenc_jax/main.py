"""Entry point: `python -m idenc_jax.main --config=configs/base.py[:variant] --workdir=DIR [--mode=...]`.

Parses flags, optionally joins a multi-host job, and hands over to one importable function per mode.
"""

import importlib
import importlib.util
import os
import sys

import jax
from absl import app, flags, logging

from idenc_jax import cli

FLAGS = flags.FLAGS
cli.define_config_flag()
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'], 'What to run.')
flags.mark_flag_as_required('workdir')


def initialize_distributed():
  """Joins a multi-process JAX job. Coordinates come from the environment: on TPU VMs and SLURM JAX
  finds them itself (launch/tpu_vm.sh, launch/slurm.sbatch); elsewhere (launch/local_multiprocess.sh)
  from IDENC_COORDINATOR, IDENC_NUM_PROCESSES and IDENC_PROCESS_ID."""
  if os.environ.get('IDENC_COORDINATOR'):
    if os.environ.get('JAX_PLATFORMS', '').startswith('cpu'):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=os.environ['IDENC_COORDINATOR'],
                               num_processes=int(os.environ['IDENC_NUM_PROCESSES']),
                               process_id=int(os.environ['IDENC_PROCESS_ID']))
  else:
    # IDENC_LOCAL_DEVICE_IDS (e.g. 0,1,2,3): the devices of this process when it drives several GPUs;
    # unset, JAX's cluster detection decides (one GPU per process under SLURM).
    ids = os.environ.get('IDENC_LOCAL_DEVICE_IDS')
    jax.distributed.initialize(local_device_ids=[int(i) for i in ids.split(',')] if ids else None)


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of orbax and grain (every save logs dozens of lines) and of JAX's backend search
  (no TPU found); warnings pass."""

  def filter(self, record):
    noisy = any(part in record.pathname for part in ('/orbax/', '/grain/', '/jax/_src/xla_bridge'))
    return not noisy or record.levelno >= logging.logging.WARNING


# (mode, stage) -> (module, function(config, workdir)): the one place that chooses by stage. Stage 0
# trains the unconditional generator; stage 1 the identity encoder with it; stage 2 restoration.
# Modules are imported only when their mode runs (training needs TensorFlow for clu's writer, eval dlib).
_MODES = {
    ('train', 0): ('idenc_jax.train.loop', 'train_and_evaluate'),
    ('train', 1): ('idenc_jax.train.loop', 'train_and_evaluate'),
    ('train', 2): ('idenc_jax.train.loop', 'train_and_evaluate'),
    ('sample', 1): ('idenc_jax.personalize.sample_mode', 'sample_from_config'),
    ('sample', 2): ('idenc_jax.personalize.sample_mode', 'restore_from_config'),
    ('eval', 1): ('idenc_jax.evaluate.generation', 'evaluate_generation'),
    ('eval', 2): ('idenc_jax.evaluate.restoration', 'evaluate_restoration'),
}


def mode_target(mode: str, stage: int) -> tuple[str, str]:
  """(module, function) that runs `mode` for a config of `stage`; a UsageError for a pair that has none."""
  if (mode, stage) not in _MODES:
    raise app.UsageError(f'--mode={mode} does not apply to a stage-{stage} config (a stage-0 generator has no '
                         'identity encoder to personalize or evaluate; train stage 1 from it).')
  return _MODES[mode, stage]


def check_mode(mode: str, stage: int) -> None:
  """A clear error when the module of (mode, stage) is not part of this installation (checked without
  importing it, so before any JAX initialisation)."""
  module_name, _ = mode_target(mode, stage)
  try:
    spec = importlib.util.find_spec(module_name)
  except (ModuleNotFoundError, ValueError):
    spec = None
  if spec is None:
    raise app.UsageError(f'--mode={mode} needs the module {module_name}, which this installation '
                         'does not have.')


def mode_function(mode: str, stage: int):
  """The function that runs `mode` for a config of `stage`."""
  module_name, fn_name = mode_target(mode, stage)
  fn = getattr(importlib.import_module(module_name), fn_name, None)
  if fn is None:
    raise app.UsageError(f'--mode={mode} needs {module_name}.{fn_name}, which does not exist.')
  return fn


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = FLAGS.config
  check_mode(FLAGS.mode, config.stage)  # fail fast, before joining a multi-host job
  if config.distributed:
    initialize_distributed()
  # Keep TensorFlow (used by clu's writer and tfds) off the accelerators.
  try:
    import tensorflow as tf  # lazy: optional here, and slow to import
    tf.config.set_visible_devices([], 'GPU')
  except ImportError:
    pass
  cache = cli.enable_compilation_cache(config.compilation_cache_dir)
  logging.info('JAX process %d/%d, local devices: %s; compilation cache: %s', jax.process_index(),
               jax.process_count(), jax.local_devices(), cache or 'off')
  mode_function(FLAGS.mode, config.stage)(config, FLAGS.workdir)


def _with_mode(mode: str) -> None:
  sys.argv[1:1] = [f'--mode={mode}']   # a --mode the user gives comes later and wins
  cli.run(main)


def train_command() -> None:
  """`idenc-train ...`: `python -m idenc_jax.main --mode=train ...`."""
  _with_mode('train')


def sample_command() -> None:
  """`idenc-sample ...`: `python -m idenc_jax.main --mode=sample ...`."""
  _with_mode('sample')


def eval_command() -> None:
  """`idenc-eval ...`: `python -m idenc_jax.main --mode=eval ...`."""
  _with_mode('eval')


if __name__ == '__main__':
  cli.run(main)
