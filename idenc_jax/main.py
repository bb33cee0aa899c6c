"""Entry point: `python -m idenc_jax.main --config=configs/base.py[:variant] --workdir=DIR [--mode=...]`.

Parses flags, optionally joins a multi-host job, and hands over to one importable function per mode.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Configuration file (configs/base.py[:variant]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'], 'What to run.')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed():
  """Joins a multi-process JAX job. Coordinates come from the environment: on TPU VMs and SLURM JAX
  finds them itself; elsewhere (launch/local_multiprocess.sh) from IDENC_COORDINATOR,
  IDENC_NUM_PROCESSES and IDENC_PROCESS_ID."""
  import jax
  if os.environ.get('IDENC_COORDINATOR'):
    if os.environ.get('JAX_PLATFORMS', '').startswith('cpu'):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=os.environ['IDENC_COORDINATOR'],
                               num_processes=int(os.environ['IDENC_NUM_PROCESSES']),
                               process_id=int(os.environ['IDENC_PROCESS_ID']))
  else:
    jax.distributed.initialize()


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of orbax and grain (every save logs dozens of lines); warnings pass."""

  def filter(self, record):
    noisy = '/orbax/' in record.pathname or '/grain/' in record.pathname
    return not noisy or record.levelno >= logging.logging.WARNING


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = FLAGS.config
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
  if FLAGS.mode == 'train':
    from idenc_jax.train import loop
    loop.train_and_evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == 'sample':
    from idenc_jax import personalize
    personalize.sample_from_config(config, FLAGS.workdir)
  elif FLAGS.mode == 'eval':
    from idenc_jax.evaluate import harness
    harness.evaluate(config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
