"""Measurements on the default device: synchronised timing, the peak of a large matmul, which device and
host a figure came from, a compiled step's memory and FLOPs (XLA's cost analysis, and the analytic count).
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from idenc_jax.perf import flops

# LLVM -O0: quicker compiles and slower steps, for smoke tests; the arithmetic XLA emits is the same.
FAST_COMPILE = {'xla_backend_optimization_level': 0}
STATISTICS = {'median': np.median, 'min': np.min}


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1, statistic: str = 'median') -> float:
  """Seconds of one synchronised call of fn: the median (or min) of `repeats` after `warmup` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(STATISTICS[statistic](times))


def peak_matmul_size() -> int:
  """Side of the square peak matmul: 4096 on CPU (2048 read ~2x below what the same cores reach at 4096,
  once it ran right after a train step), 8192 on accelerators."""
  return 4096 if jax.default_backend() == 'cpu' else 8192


def matmul_probe(dtype_name: str, size: int | None = None) -> tuple[Callable[[], Any], float]:
  """(a call of a size^3 matmul of random data in `dtype_name` on the default device, its FLOPs)."""
  size = size or peak_matmul_size()
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[dtype_name]
  keys = jax.random.split(jax.random.key(0), 2)
  a = jax.random.normal(keys[0], (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(keys[1], (size, size), jnp.float32).astype(dtype)
  mm = jax.jit(lambda x, y: x @ y)
  return (lambda: mm(a, b)), 2.0 * size ** 3


def measure_peak_flops(dtype_name: str, size: int | None = None, repeats: int = 5,
                       statistic: str = 'min') -> float:
  """FLOP/s of a size^3 matmul of random data in `dtype_name` on the default device: the best of `repeats`
  calls after two warm-up calls (a peak is what the device can do, so the fastest call, not the typical)."""
  call, matmul_flops = matmul_probe(dtype_name, size)
  return matmul_flops / time_calls(call, repeats, warmup=2, statistic=statistic)


def device_name() -> str:
  d = jax.devices()[0]
  return f'{d.platform}:{d.device_kind}'


def emit(result: dict, table: str = '', json_out: str = '') -> None:
  """A perf tool's output: `table` (if any), then the result as the last line (one JSON object), also written
  to json_out."""
  line = json.dumps(result)
  if table:
    print(table)
  print(line, flush=True)
  if json_out:
    with open(json_out, 'w') as f:
      f.write(line + '\n')


def host_info() -> str:
  """The host CPU's model, the cores this process may use and the jax version ('cpu:cpu' alone does
  not say which machine a CPU figure came from)."""
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return f'{model}, {cores} cores, jax {jax.__version__}'


def memory(compiled) -> tuple[int | None, int | None]:
  """(device peak bytes in use, compiled-executable estimate); either may be None."""
  device_peak = None
  try:
    stats = jax.devices()[0].memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
      device_peak = int(stats['peak_bytes_in_use'])
  except Exception:  # pylint: disable=broad-except  (a backend without memory statistics)
    pass
  estimate = None
  try:
    m = compiled.memory_analysis()
    # XLA:CPU's peak_memory_in_bytes leaves the temporaries out (arguments + outputs only), so the
    # larger of it and arguments + outputs + temporaries - aliased: an upper bound on every backend.
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    estimate = int(max(getattr(m, 'peak_memory_in_bytes', 0) or 0, total))
  except Exception:  # pylint: disable=broad-except  (a backend without memory analysis)
    pass
  return device_peak, estimate


def cost_flops(stage) -> float | None:
  """FLOPs of XLA's cost analysis of a `Lowered` or `Compiled` stage (None where the backend has none)."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (a backend without cost analysis)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def choose_flops(compiled: float | None, lowered: float | None) -> tuple[float | None, str]:
  """(FLOPs, 'compiled' or 'lowered'): the optimised module's count where it is within 10% of the
  unoptimised module's, else the unoptimised one. The optimised count errs both ways: a backend's library
  calls go uncounted (convolutions as cuDNN custom calls: far lower), and an elementwise producer fused
  into several consumers is counted whole in each (the flat update's 460 slices: 1.38x on the `cpu` model)."""
  if lowered and not (compiled and 0.9 < compiled / lowered < 1.1):
    return lowered, 'lowered'
  return compiled, 'compiled'


def analytic_flops_per_image(config) -> float | None:
  """`flops.training_flops_per_image`, or None for a model structure it does not count."""
  try:
    return float(flops.training_flops_per_image(config))
  except AttributeError:
    return None
