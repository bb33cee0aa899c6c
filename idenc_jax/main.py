"""Entry point: `python -m idenc_jax.main --config=configs/base.py[:variant] --workdir=DIR [--mode=...]`.

Parses flags, optionally joins a multi-host job, and hands over to one importable function per mode.
"""

import importlib
import importlib.util
import os

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
  import jax
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
  """Drops the INFO chatter of orbax and grain (every save logs dozens of lines); warnings pass."""

  def filter(self, record):
    noisy = '/orbax/' in record.pathname or '/grain/' in record.pathname
    return not noisy or record.levelno >= logging.logging.WARNING


# Each mode: (module, function(config, workdir)). Modules are imported only when their mode runs.
_MODES = {
    'train': ('idenc_jax.train.loop', 'train_and_evaluate'),
    'sample': ('idenc_jax.personalize', 'sample_from_config'),
    'eval': ('idenc_jax.evaluate.harness', 'evaluate'),
}


def check_mode(mode: str) -> None:
  """A clear error when the module of `mode` is not part of this installation (checked without
  importing it, so before any JAX initialisation)."""
  module_name, _ = _MODES[mode]
  try:
    spec = importlib.util.find_spec(module_name)
  except (ModuleNotFoundError, ValueError):
    spec = None
  if spec is None:
    raise app.UsageError(f'--mode={mode} needs the module {module_name}, which this installation '
                         'does not have.')


def mode_function(mode: str):
  """The function that runs `mode`."""
  module_name, fn_name = _MODES[mode]
  fn = getattr(importlib.import_module(module_name), fn_name, None)
  if fn is None:
    raise app.UsageError(f'--mode={mode} needs {module_name}.{fn_name}, which does not exist.')
  return fn


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = FLAGS.config
  check_mode(FLAGS.mode)  # fail fast, before joining a multi-host job
  if config.distributed:
    initialize_distributed()
  import jax
  # Keep TensorFlow (used by clu's writer and tfds) off the accelerators.
  try:
    import tensorflow as tf
    tf.config.set_visible_devices([], 'GPU')
  except ImportError:
    pass
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  mode_function(FLAGS.mode)(config, FLAGS.workdir)


if __name__ == '__main__':
  cli.run(main)
