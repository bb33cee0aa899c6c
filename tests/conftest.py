"""Test setup: 8 simulated CPU devices and parsed absl flags, before anything imports jax."""

import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One BLAS thread per process: the tests run beside XLA's own threads on a 2-core machine.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
# Test modules compile the same tiny models again and again: a persistent compilation cache turns
# the repeats (also in subprocesses, which inherit these variables) into cache hits.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.pytest_cache', 'jax_compilation_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

# grain's multiprocessing reads absl flags; under pytest nothing parses them.
flags.FLAGS.mark_as_parsed()
