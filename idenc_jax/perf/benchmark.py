"""`python -m idenc_jax.perf.benchmark`: speed of the train step and the sampling step on one device.

  python -m idenc_jax.perf.benchmark --config=configs/base.py:cpu --variants=fp32,bf16,bf16+remat,bf16+fused

prints a short table and, as its last line, one JSON object with train_images_per_s, train_step_ms
(median, or with --statistic=min the minimum, over timed steps after warm-up, each synchronised
with block_until_ready), compile_s, peak_memory_bytes, flops_per_image_xla (XLA's cost analysis
of the compiled step / batch),
flops_per_image_analytic (`idenc_jax.perf.flops`), peak_flops (--peak_flops, else a large matmul in the
compute dtype on the same device), mfu (analytic FLOPs x images/s / peak), sample_step_ms (one
generator forward at --sample_batch) and device (with host: CPU model, cores, jax version). With
several variants the object also holds `variants`, one such record per variant with its `speedup`
over the first; by default each variant runs in a fresh subprocess (its own peak memory; a crash or
hang costs only that variant).

A variant is levers joined by '+': fp32 | bf16 (model.dtype), remat (model.remat), fused / xla
(model.attention), mmgrad (model.conv_grad='matmul'), gnfused / gnflax (model.group_norm), b<N>
(train.batch_size), prefetch<N> (data.prefetch), or any `section.field=value`; a lever a variant does
not name keeps the config's value (the cpu configs use the fused group norm, so their plain float32
step is fp32+gnflax). --interleave times all variants in one process in turns, for fair ratios on a
loaded machine. --profile_dir=DIR adds, per variant, where the step's time goes (`idenc_jax.perf.op_profile`).

Batches are synthetic uint8 images of the training batch's structure, built on the host and fed
through a prefetch thread of depth data.prefetch, as the trainer does; there is no data pipeline.
Parameters are random (numpy, seeded), not the zero-initialised output layers of a fresh model: zeros
can run faster than real data on some devices. This module imports neither tensorflow, grain, clu nor
absl's config flags; without ml_collections installed it reads the config through a small stand-in.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np

from idenc_jax.train import prefetch as prefetch_lib

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST_COMPILE = {'xla_backend_optimization_level': 0}
KEYS = ('train_images_per_s', 'train_step_ms', 'compile_s', 'peak_memory_bytes', 'flops_per_image_xla',
        'flops_per_image_analytic', 'peak_flops', 'mfu', 'sample_step_ms', 'device')


# ---------------------------------------------------------------------------------------------------------
# Config: configs/base.py loaded by path; a stand-in for ml_collections where it is not installed.
# ---------------------------------------------------------------------------------------------------------
class _FallbackConfigDict:
  """The part of ml_collections.ConfigDict that configs/base.py and the models use: nested fields
  read and written as attributes; assigning an unknown field through `override` is an error."""

  def __init__(self):
    object.__setattr__(self, '_fields', {})

  def __getattr__(self, name):
    try:
      return self._fields[name]
    except KeyError:
      raise AttributeError(f'config has no field {name!r}') from None

  def __setattr__(self, name, value):
    self._fields[name] = value

  def __contains__(self, name):
    return name in self._fields

  def items(self):
    return self._fields.items()

  def to_dict(self):
    return {k: v.to_dict() if isinstance(v, _FallbackConfigDict) else v for k, v in self._fields.items()}


def _fallback_ml_collections() -> types.ModuleType:
  config_dict = types.ModuleType('ml_collections.config_dict')
  config_dict.ConfigDict = _FallbackConfigDict
  config_dict.placeholder = lambda field_type, required=False: None
  root = types.ModuleType('ml_collections')
  root.config_dict = config_dict
  root.ConfigDict = _FallbackConfigDict
  return root


def _import_config_module(path: Path):
  try:
    import ml_collections  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    fallback = _fallback_ml_collections()
    sys.modules['ml_collections'] = fallback
    sys.modules['ml_collections.config_dict'] = fallback.config_dict
  spec = importlib.util.spec_from_file_location(f'_idenc_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec: str = 'configs/base.py:cpu', overrides: dict[str, Any] | None = None):
  """`path[:variant]` (path relative to the working directory or the repository) -> config."""
  path_str, _, variant = spec.partition(':')
  path = Path(path_str)
  if not path.is_file():
    path = REPO_ROOT / path_str
  if not path.is_file():
    raise FileNotFoundError(f'config file {path_str!r} not found (also looked in {REPO_ROOT}).')
  config = _import_config_module(path).get_config(variant or None)
  for key, value in (overrides or {}).items():
    override(config, key, value)
  return config


def _parse_value(text: str, current: Any) -> Any:
  if not isinstance(text, str):
    return text
  if isinstance(current, bool):
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise ValueError(f'expected a boolean, got {text!r}')
  if isinstance(current, str) or current is None:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
    return value if current is None else text
  value = ast.literal_eval(text)
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  return value


def override(config, key: str, value: Any) -> None:
  """Sets `section.field` (dotted, an existing field) to value (a string is parsed per the field's type)."""
  *parents, field = key.split('.')
  node = config
  for part in parents:
    if not hasattr(node, part):
      raise ValueError(f'unknown config section {part!r} in override {key!r}')
    node = getattr(node, part)
  if field not in node:
    raise ValueError(f'unknown config field {key!r}')
  current = getattr(node, field)
  try:
    parsed = _parse_value(value, current)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f'bad value {value!r} for config field {key!r}: {e}') from None
  if hasattr(node, 'unlocked'):
    with node.unlocked():
      setattr(node, field, parsed)
  else:
    setattr(node, field, parsed)


# ---------------------------------------------------------------------------------------------------------
# Variants: '+'-joined levers.
# ---------------------------------------------------------------------------------------------------------
_LEVERS = {
    'fp32': {'model.dtype': 'float32'},
    'bf16': {'model.dtype': 'bfloat16'},
    'remat': {'model.remat': True},
    'noremat': {'model.remat': False},
    'fused': {'model.attention': 'fused'},
    'xla': {'model.attention': 'xla'},
    'mmgrad': {'model.conv_grad': 'matmul'},
    'gnfused': {'model.group_norm': 'fused'},
    'gnflax': {'model.group_norm': 'flax'},
}


def variant_overrides(variant: str) -> dict[str, Any]:
  """'bf16+remat+b256' -> {'model.dtype': 'bfloat16', 'model.remat': True, 'train.batch_size': 256}."""
  out = {}
  for lever in filter(None, (p.strip() for p in variant.split('+'))):
    if lever in _LEVERS:
      out.update(_LEVERS[lever])
    elif lever[0] == 'b' and lever[1:].isdigit():
      out['train.batch_size'] = int(lever[1:])
    elif lever.startswith('prefetch') and lever[8:].isdigit():
      out['data.prefetch'] = int(lever[8:])
    elif '=' in lever:
      key, value = lever.split('=', 1)
      out[key] = value
    else:
      raise ValueError(f'unknown lever {lever!r} in variant {variant!r}; levers: {sorted(_LEVERS)}, '
                       'b<N>, prefetch<N> or section.field=value')
  return out


# ---------------------------------------------------------------------------------------------------------
# Synthetic inputs and parameters.
# ---------------------------------------------------------------------------------------------------------
def synthetic_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A host batch of the training batch's structure: K groups of M identity images + agnostic half."""
  b, r = config.train.batch_size, config.model.resolution
  m = config.data.images_per_identity
  if b < 2 or b % 2:
    raise ValueError(f'train.batch_size={b} must be even and positive (half identity, half agnostic).')
  n_id = b // 2
  if n_id % m:
    raise ValueError(f'the identity half-batch {n_id} is not divisible by data.images_per_identity={m}.')
  rng = np.random.default_rng(seed)
  groups = np.repeat(np.arange(n_id // m, dtype=np.int32), m)
  return {
      'id_images': rng.integers(0, 256, (n_id, r, r, 3), dtype=np.uint8),
      'id_labels': groups + 1000 * seed,
      'id_groups': groups,
      'agnostic_images': rng.integers(0, 256, (b - n_id, r, r, 3), dtype=np.uint8),
  }


def random_params(abstract_params, seed: int = 0):
  """Numpy-random parameters of the given shapes (identical on every platform).

  Kernels ~ N(0, 1/fan_in) (the last axis is the output), norm scales ~ 1 + N(0, 0.1^2), biases and
  everything else ~ N(0, 0.1^2). Unlike a fresh model, no output layer is zero.
  """
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  out = []
  for path, leaf in leaves:
    names = [str(getattr(k, 'key', k)) for k in path]
    shape = tuple(leaf.shape)
    noise = rng.standard_normal(shape).astype(np.float32)
    if names[-1] == 'kernel':
      # DenseGeneral's query/key/value kernels are [in, heads, head_dim]; every other kernel has its
      # inputs on all but the last axis.
      split_out = len(shape) == 3 and len(names) > 1 and names[-2] in ('query', 'key', 'value')
      fan_in = shape[0] if split_out else int(np.prod(shape[:-1]))
      value = noise / math.sqrt(max(fan_in, 1))
    elif names[-1] == 'scale':
      value = 1.0 + 0.1 * noise
    else:
      value = 0.1 * noise
    out.append(value.astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def build_state(config, seed: int = 0):
  """(train state on the default device with random parameters, optimizer)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from idenc_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(lambda k: state_lib.init_params(config, k), jax.random.key(seed))
  host_params = random_params(abstract, seed)
  params = jax.device_put(host_params)
  optimizer = state_lib.make_optimizer(config, params)
  opt_state = jax.jit(optimizer.init)(params)
  # EMA gets buffers of its own: the donated state must not hold one buffer twice.
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               ema_params=jax.device_put(host_params), opt_state=opt_state,
                               rng=jax.random.key_data(jax.random.key(seed + 1)))
  return state, optimizer


def fixed_batch_loss_and_grads(config, seed: int = 0, step: int | None = None,
                               compiler_options: dict | None = None):
  """(loss, metrics, gradients) of a fixed synthetic batch with seeded random parameters.

  Everything random comes from numpy or threefry, so the values are the same on every platform up to
  the compute dtype's rounding. `step` defaults to the end of the curriculum, so that most groups
  keep their identity and every loss term takes part.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from idenc_jax import losses, models  # pylint: disable=g-import-not-at-top
  from idenc_jax.diffusion import schedules  # pylint: disable=g-import-not-at-top
  from idenc_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  if step is None:
    step = config.loss.curriculum_steps
  abstract = jax.eval_shape(lambda k: state_lib.init_params(config, k), jax.random.key(seed))
  params = random_params(abstract, seed)
  batch = synthetic_batch(config, seed)
  gen, enc = models.build_generator(config), models.build_encoder(config)
  sched = schedules.from_config(config)

  def loss_fn(p):
    return losses.compute_loss(p, batch, jax.random.key(seed + 7), step, config=config, generator=gen,
                               encoder=enc, schedule=sched)

  fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(params).compile(compiler_options)
  (loss, metrics), grads = fn(params)
  return float(loss), jax.device_get(metrics), jax.device_get(grads)


def fixed_batch_loss(config, seed: int = 0, step: int | None = None,
                     compiler_options: dict | None = None) -> dict[str, float]:
  """Loss, gradient norm and identity diffusion term of `fixed_batch_loss_and_grads`."""
  loss, metrics, grads = fixed_batch_loss_and_grads(config, seed, step, compiler_options)
  import jax  # pylint: disable=g-import-not-at-top
  grad_norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads))))
  return {'loss': loss, 'grad_norm': grad_norm, 'diff_id': float(metrics.get('diff_id', loss))}


class _Feeder(prefetch_lib.Prefetcher):
  """Host batches (cycled) -> device, `depth` batches ahead on a thread (depth 0: synchronously), as the
  trainer's DevicePrefetcher."""

  def __init__(self, host_batches: list[dict], depth: int):
    import jax  # pylint: disable=g-import-not-at-top
    batches = itertools.cycle(host_batches)
    super().__init__(lambda: jax.device_put(next(batches)), depth)


# ---------------------------------------------------------------------------------------------------------
# Measurements.
# ---------------------------------------------------------------------------------------------------------
def _cost_flops(stage) -> float | None:
  try:
    cost = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (a backend without cost analysis)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


_STATISTICS = {'median': np.median, 'min': np.min}


def _time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1, statistic: str = 'median') -> float:
  """Seconds of one synchronised call of fn: the median (or min) of `repeats` after `warmup` calls."""
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(_STATISTICS[statistic](times))


def matmul_probe(dtype_name: str, size: int | None = None) -> tuple[Callable[[], Any], float]:
  """(a call of a size^3 matmul of random data in `dtype_name` on the default device, its FLOPs)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if size is None:
    size = 2048 if jax.default_backend() == 'cpu' else 8192
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[dtype_name]
  keys = jax.random.split(jax.random.key(0), 2)
  a = jax.random.normal(keys[0], (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(keys[1], (size, size), jnp.float32).astype(dtype)
  mm = jax.jit(lambda x, y: x @ y)
  return (lambda: mm(a, b)), 2.0 * size ** 3


def measure_peak_flops(dtype_name: str, size: int | None = None, repeats: int = 5,
                       statistic: str = 'median') -> float:
  """FLOP/s of a size^3 matmul of random data in `dtype_name` on the default device."""
  call, flops = matmul_probe(dtype_name, size)
  return flops / _time_calls(call, repeats, warmup=2, statistic=statistic)


def device_name() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  return f'{d.platform}:{d.device_kind}'


def host_info() -> str:
  """The host CPU's model, the cores this process may use and the jax version ('cpu:cpu' alone does
  not say which machine a CPU figure came from)."""
  import platform  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return f'{model}, {cores} cores, jax {jax.__version__}'


def _memory(compiled) -> tuple[int | None, int | None]:
  """(device peak bytes in use, compiled-executable estimate); either may be None."""
  import jax  # pylint: disable=g-import-not-at-top
  device_peak = None
  try:
    stats = jax.devices()[0].memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
      device_peak = int(stats['peak_bytes_in_use'])
  except Exception:  # pylint: disable=broad-except
    pass
  estimate = None
  try:
    m = compiled.memory_analysis()
    # XLA:CPU's peak_memory_in_bytes leaves the temporaries out (arguments + outputs only), so the
    # larger of it and arguments + outputs + temporaries - aliased: an upper bound on every backend.
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    estimate = int(max(getattr(m, 'peak_memory_in_bytes', 0) or 0, total))
  except Exception:  # pylint: disable=broad-except
    pass
  return device_peak, estimate


def analytic_flops_per_image(config) -> float | None:
  try:
    from idenc_jax.perf import flops  # pylint: disable=g-import-not-at-top
    return float(flops.training_flops_per_image(config))
  except (ImportError, AttributeError):
    return None


def lower_train_step(config, batch_size: int | None = None):
  """The jitted train step lowered on abstract shapes (nothing materialised): a jax `Lowered`."""
  import jax  # pylint: disable=g-import-not-at-top
  from idenc_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from idenc_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  if batch_size is not None:
    override(config, 'train.batch_size', batch_size)
  abstract_state = jax.eval_shape(lambda k: state_lib.create_train_state(config, k), jax.random.key(0))
  optimizer = state_lib.make_optimizer(config, abstract_state.params)
  step = step_lib.make_train_step(config, optimizer)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), synthetic_batch(config))
  return jax.jit(step, donate_argnums=(0,)).lower(abstract_state, batch)


def compile_sample_step(config, params, batch: int):
  """(compiled generator forward, its arguments, compile seconds): a sampling step's network call."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from idenc_jax import models  # pylint: disable=g-import-not-at-top
  if config.stage == 2:
    raise ValueError('sample-step timing covers stage 0/1 generators (stage 2 needs condition tokens).')
  gen = models.build_generator(config)
  r = config.model.resolution
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (batch, r, r, 3), jnp.float32)
  t = jax.random.randint(keys[1], (batch,), 0, config.diffusion.timesteps)
  z = None if config.stage == 0 else jax.random.normal(keys[2], (batch, config.model.embed_dim))
  fn = jax.jit(lambda p, x, t, z: gen.apply({'params': p}, x, t, z))
  t0 = time.perf_counter()
  compiled = fn.lower(params, x, t, z).compile()
  return compiled, (params, x, t, z), time.perf_counter() - t0


def profile_train(bench: 'TrainBench', out_dir: str, steps: int = 3, top: int = 20) -> dict:
  """`op_profile` breakdown of `steps` more train steps of a compiled TrainBench (written to out_dir)."""
  from idenc_jax.perf import op_profile  # pylint: disable=g-import-not-at-top
  for _ in range(2):   # steady state only in the trace (a no-op after timed steps)
    bench.step(timed=False)
  return op_profile.profile_compiled(bench.compiled, lambda: bench.step(timed=False), steps, out_dir,
                                     'train_profile', top=top)


def profile_sample(compiled_step, out_dir: str, steps: int = 3, top: int = 20) -> dict:
  """`op_profile` breakdown of a sampling step's network call, `compile_sample_step`'s (compiled, args)
  (written to out_dir)."""
  import jax  # pylint: disable=g-import-not-at-top
  from idenc_jax.perf import op_profile  # pylint: disable=g-import-not-at-top
  compiled, args = compiled_step
  run = lambda: jax.block_until_ready(compiled(*args))
  run()
  run()
  return op_profile.profile_compiled(compiled, run, steps, out_dir, 'sample_profile', top=top)


def _profile_digest(profile: Callable[[], dict]) -> dict:
  """The part of an op_profile summary that goes into a benchmark record. A profile that fails (no
  profiler on this machine, a trace it cannot read) records its error instead: it must not cost the
  variant's timings."""
  try:
    summary = profile()
  except Exception as e:  # pylint: disable=broad-except
    return {'error': f'{type(e).__name__}: {e}'}
  return {k: summary.get(k) for k in ('op_ms_per_step', 'wall_ms_per_step', 'by_category_ms', 'by_part_ms')}


class TrainBench:
  """One variant's compiled train step on the default device, ready to be timed step by step."""

  def __init__(self, config, log: Callable[[str], None] = lambda s: None,
               compiler_options: dict | None = None, first_in_process: bool = True):
    import jax  # pylint: disable=g-import-not-at-top
    from idenc_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
    self.config, self.log, self.first_in_process = config, log, first_in_process
    b = config.train.batch_size
    self.record: dict[str, Any] = {
        'device': device_name(), 'host': host_info(), 'batch_size': b, 'dtype': config.model.dtype,
        'remat': bool(config.model.remat), 'attention': config.model.attention,
        'conv_grad': config.model.conv_grad, 'group_norm': config.model.group_norm,
        'prefetch': int(config.data.prefetch)}
    self.host_batches = [synthetic_batch(config, seed) for seed in range(3)]
    t0 = time.perf_counter()
    self.state, optimizer = build_state(config)
    jax.block_until_ready(self.state)
    self.record['init_s'] = time.perf_counter() - t0

    # As the trainer: the state is donated, so the step updates it in place.
    jitted = jax.jit(step_lib.make_train_step(config, optimizer), donate_argnums=(0,))
    t0 = time.perf_counter()
    lowered = jitted.lower(self.state, jax.device_put(self.host_batches[0]))
    self.compiled = lowered.compile(compiler_options)
    self.record['compile_s'] = time.perf_counter() - t0
    log(f'compiled in {self.record["compile_s"]:.1f} s')
    # The compiled module's count, unless the backend hides work in library calls it cannot cost
    # (e.g. convolutions as cuDNN custom calls): then the unoptimised module's.
    compiled_flops, lowered_flops = _cost_flops(self.compiled), _cost_flops(lowered)
    flops, source = compiled_flops, 'compiled'
    if lowered_flops and not (compiled_flops and 0.5 < compiled_flops / lowered_flops < 2.0):
      flops, source = lowered_flops, 'lowered'
    per_image = lambda f: f / b if f else None
    self.record.update(flops_per_image_xla=per_image(flops), flops_source=source,
                       flops_per_image_xla_compiled=per_image(compiled_flops),
                       flops_per_image_xla_lowered=per_image(lowered_flops),
                       flops_per_image_analytic=analytic_flops_per_image(config))
    self.feeder = _Feeder(self.host_batches, int(config.data.prefetch))
    self.times: list[float] = []
    self.metrics = None
    self.sample = None                   # (compiled sampling call, its arguments) once compiled
    self.sample_times: list[float] = []

  def step(self, timed: bool = True) -> float:
    """One train step, from taking the batch to the updated state being ready; returns seconds."""
    import jax  # pylint: disable=g-import-not-at-top
    t0 = time.perf_counter()
    self.state, self.metrics = self.compiled(self.state, self.feeder.next())
    jax.block_until_ready(self.state)
    seconds = time.perf_counter() - t0
    if timed:
      self.times.append(seconds)
    return seconds

  def finish(self, sample_batch: int = 0, sample_repeats: int = 5, statistic: str = 'median',
             profile_dir: str = '') -> dict[str, Any]:
    """Times the sampling step if asked, profiles both into `profile_dir` if given
    (`idenc_jax.perf.op_profile`), closes the feeder and returns the record (without MFU)."""
    import jax  # pylint: disable=g-import-not-at-top
    r, b = self.record, self.config.train.batch_size
    if not self.times:
      raise ValueError('no timed steps were run')
    metrics = jax.device_get(self.metrics)
    r['loss'], r['finite'] = float(metrics['loss']), bool(metrics['finite'])
    step_s = float(_STATISTICS[statistic](self.times))
    r.update(train_step_ms=1e3 * step_s, train_step_ms_median=1e3 * float(np.median(self.times)),
             train_step_ms_min=1e3 * float(np.min(self.times)), train_images_per_s=b / step_s,
             timed_steps=len(self.times), statistic=statistic)
    # The device's high-water mark covers the whole process: it is this variant's only when nothing
    # else ran before it here; otherwise the compiled executable's own footprint stands in.
    r['device_peak_bytes_in_use'], r['compiled_memory_bytes'] = _memory(self.compiled)
    own_peak = r['device_peak_bytes_in_use'] if self.first_in_process else None
    r['peak_memory_bytes'] = own_peak if own_peak is not None else r['compiled_memory_bytes']
    r['peak_memory_source'] = 'device' if own_peak is not None else 'compiled'
    self.log(f'train step {r["train_step_ms"]:.1f} ms')
    if profile_dir:
      os.makedirs(profile_dir, exist_ok=True)
      r['train_profile'] = _profile_digest(lambda: profile_train(self, profile_dir))
      self.log(f'train step profile in {profile_dir}')
    self.feeder.close()
    r['sample_batch'], r['sample_step_ms'] = sample_batch, None
    if sample_batch:
      if self.sample is None:
        self.compile_sample(sample_batch)
      if self.sample_times:   # timed in turns with other variants (run_interleaved)
        r['sample_step_ms'] = 1e3 * float(_STATISTICS[statistic](self.sample_times))
      else:
        compiled, args = self.sample
        r['sample_step_ms'] = 1e3 * _time_calls(lambda: compiled(*args), sample_repeats, warmup=2)
      self.log(f'sample step {r["sample_step_ms"]:.1f} ms')
      if profile_dir:
        r['sample_profile'] = _profile_digest(lambda: profile_sample(self.sample, profile_dir))
    self.state = self.compiled = self.sample = None   # free device memory before the next variant
    return r

  def compile_sample(self, batch: int) -> None:
    """Compiles the sampling step's network call at `batch` on a copy of the generator's parameters
    (the train step donates, and so deletes, the state's own buffers)."""
    import jax  # pylint: disable=g-import-not-at-top
    params = jax.tree.map(lambda a: a.copy(), self.state.params['generator'])
    compiled, args, self.record['sample_compile_s'] = compile_sample_step(self.config, params, batch)
    self.sample = (compiled, args)

  def sample_step(self, timed: bool = True) -> float:
    """One sampling-step network call, synchronised; returns seconds."""
    import jax  # pylint: disable=g-import-not-at-top
    compiled, args = self.sample
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds = time.perf_counter() - t0
    if timed:
      self.sample_times.append(seconds)
    return seconds


def add_mfu(record: dict, peak_flops: float, source: str, matmul_flops: float | None = None) -> dict:
  """MFU = analytic model FLOPs per image x images/s / peak (recomputation under remat not counted)."""
  record['peak_flops'], record['peak_flops_source'] = float(peak_flops), source
  analytic = record.get('flops_per_image_analytic')
  record['mfu'] = analytic * record['train_images_per_s'] / peak_flops if analytic else None
  if matmul_flops:   # the measured matmul beside a peak given on the command line
    record['matmul_flops_measured'] = float(matmul_flops)
    record['mfu_vs_matmul'] = analytic * record['train_images_per_s'] / matmul_flops if analytic else None
  return record


def run_variant(config, *, steps: int = 5, warmup: int = 2, sample_batch: int = 0,
                peak_flops: float | None = None, peak_matmul_size: int | None = None,
                measure_matmul: bool = False, log: Callable[[str], None] = lambda s: None,
                compiler_options: dict | None = None, first_in_process: bool = True,
                statistic: str = 'median', profile_dir: str = '') -> dict[str, Any]:
  """Measures the train step (and optionally the sampling step) of `config` on the default device."""
  if steps < 1 or warmup < 0:
    raise ValueError(f'need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}.')
  bench = TrainBench(config, log, compiler_options, first_in_process)
  for i in range(warmup + steps):
    bench.step(timed=i >= warmup)
  record = bench.finish(sample_batch, max(steps, 3), statistic, profile_dir)
  measured = None
  if measure_matmul or not peak_flops:
    measured = measure_peak_flops(config.model.dtype, peak_matmul_size, statistic=statistic)
  if not peak_flops:
    return add_mfu(record, measured, 'measured')
  return add_mfu(record, peak_flops, 'flag', measured)


def run_interleaved(configs: dict[str, Any], *, steps: int = 5, warmup: int = 2, sample_batch: int = 0,
                    peak_flops: float | None = None, peak_matmul_size: int | None = None,
                    statistic: str = 'median', log: Callable[[str], None] = lambda s: None,
                    compiler_options: dict | None = None, profile_dir: str = '') -> list[dict[str, Any]]:
  """All variants compiled first, then timed in turns (A B C A B C ...), each round also timing the
  peak matmul of every compute dtype, so that a shared machine's changing load affects every
  variant and the peak alike; their ratios (and MFU) stay fair. With `sample_batch`, each round also
  times every variant's sampling step."""
  import jax  # pylint: disable=g-import-not-at-top
  if steps < 1 or warmup < 0:
    raise ValueError(f'need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}.')
  benches = {}
  for name, config in configs.items():
    benches[name] = TrainBench(config, lambda s, n=name: log(f'{n}: {s}'), compiler_options,
                               first_in_process=len(configs) == 1)
  if sample_batch:
    for bench in benches.values():
      bench.compile_sample(sample_batch)
  probes = {} if peak_flops else {
      c.model.dtype: matmul_probe(c.model.dtype, peak_matmul_size) for c in configs.values()}
  probe_times = {dtype: [] for dtype in probes}
  for i in range(warmup + steps):
    for bench in benches.values():
      bench.step(timed=i >= warmup)
      if sample_batch:
        bench.sample_step(timed=i >= warmup)
    for dtype, (call, _) in probes.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      if i >= warmup:
        probe_times[dtype].append(time.perf_counter() - t0)
    log(f'round {i + 1}/{warmup + steps} done')
  peaks = {dtype: flops / float(_STATISTICS[statistic](probe_times[dtype]))
           for dtype, (_, flops) in probes.items()}
  records = []
  for name, bench in benches.items():
    record = {'variant': name, **bench.finish(sample_batch, max(steps, 3), statistic,
                                              profile_dir and os.path.join(profile_dir, _dirname(name)))}
    dtype = configs[name].model.dtype
    records.append(add_mfu(record, peak_flops or peaks[dtype], 'flag' if peak_flops else 'measured'))
  return records


# ---------------------------------------------------------------------------------------------------------
# Correctness on the device: the fixed batch's loss against the CPU's, and a few real train steps.
# ---------------------------------------------------------------------------------------------------------
CHECK_TOLERANCES = {'float32': (1e-4, 1e-3), 'bfloat16': (2e-2, 5e-2)}   # relative: (loss, grad norm)


def reference_values(config, compiler_options: dict | None = None) -> dict[str, float]:
  """`fixed_batch_loss` in float32 at the highest matmul/conv precision (no TF32 on GPUs)."""
  import jax  # pylint: disable=g-import-not-at-top
  previous = getattr(jax.config, 'jax_default_matmul_precision', None)
  jax.config.update('jax_default_matmul_precision', 'highest')
  try:
    return fixed_batch_loss(config, compiler_options=compiler_options)
  finally:
    jax.config.update('jax_default_matmul_precision', previous)


def cpu_reference_process(config_spec: str, overrides: dict[str, Any], out_path: str,
                          fast_compile: bool = False) -> subprocess.Popen:
  """Starts the float32 reference of `config_spec` on the CPU in a subprocess (runs beside the device)."""
  cmd = [sys.executable, '-m', 'idenc_jax.perf.benchmark', f'--config={config_spec}', '--reference',
         f'--json_out={out_path}'] + ['--fast_compile'] * fast_compile + [
             f'--config.{k}={v}' for k, v in overrides.items()]
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')])))
  env.pop('XLA_FLAGS', None)
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_steps_finite(config, steps: int = 3, compiler_options: dict | None = None) -> dict[str, Any]:
  """`steps` train steps from a real initialisation on synthetic batches: losses and the step counter."""
  import jax  # pylint: disable=g-import-not-at-top
  from idenc_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from idenc_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  state = jax.jit(lambda k: state_lib.create_train_state(config, k))(jax.random.key(config.seed))
  optimizer = state_lib.make_optimizer(config, state.params)
  batch = synthetic_batch(config)
  step = jax.jit(step_lib.make_train_step(config, optimizer), donate_argnums=(0,)).lower(
      state, batch).compile(compiler_options)
  losses_seen = []
  for i in range(steps):
    state, metrics = step(state, synthetic_batch(config, seed=i))
    losses_seen.append(float(metrics['loss']))
  finite = bool(np.all(np.isfinite(losses_seen))) and int(state.step) == steps
  return {'losses': losses_seen, 'final_step': int(state.step), 'pass': finite}


def run_check(config_spec: str, overrides: dict[str, Any], variants: list[str], steps: int = 3,
              log: Callable[[str], None] = lambda s: None, fast_compile: bool = False) -> dict[str, Any]:
  """The device's fixed-batch loss and gradient norm per variant against the CPU's float32 values
  (within the variant dtype's CHECK_TOLERANCES), plus `steps` finite train steps of the first variant."""
  with tempfile.TemporaryDirectory() as tmp:
    ref_path = os.path.join(tmp, 'reference.json')
    proc = cpu_reference_process(config_spec, overrides, ref_path, fast_compile)
    options = FAST_COMPILE if fast_compile else None
    result: dict[str, Any] = {'device': device_name(), 'host': host_info(), 'config': config_spec,
                              'variants': {}}
    for index, v in enumerate(variants):
      config = load_config(config_spec, {**overrides, **variant_overrides(v)})
      rec: dict[str, Any] = {}
      log(f'check {v}: started')
      try:
        rec.update(reference_values(config, options) if config.model.dtype == 'float32'
                   else fixed_batch_loss(config, compiler_options=options))
        if index == 0:
          rec['train_steps'] = train_steps_finite(config, steps, options)
      except Exception as e:  # pylint: disable=broad-except  (report, go on with the next variant)
        rec['error'] = f'{type(e).__name__}: {e}'
      result['variants'][v] = rec
      log(f'check {v}: {rec}')
    stdout, stderr = proc.communicate(timeout=600)
    if proc.returncode or not os.path.exists(ref_path):
      raise RuntimeError(f'the CPU reference failed (exit {proc.returncode}): {stderr[-2000:]}')
    with open(ref_path) as f:
      ref = json.load(f)
  result['cpu_reference'] = ref
  ok = True
  for v, rec in result['variants'].items():
    if 'error' in rec:
      ok = rec['pass'] = False
      continue
    dtype = load_config(config_spec, {**overrides, **variant_overrides(v)}).model.dtype
    tol_loss, tol_grad = CHECK_TOLERANCES[dtype]
    rec['loss_rel_err'] = abs(rec['loss'] - ref['loss']) / abs(ref['loss'])
    rec['grad_norm_rel_err'] = abs(rec['grad_norm'] - ref['grad_norm']) / abs(ref['grad_norm'])
    rec['tolerance'] = [tol_loss, tol_grad]
    rec['pass'] = (rec['loss_rel_err'] <= tol_loss and rec['grad_norm_rel_err'] <= tol_grad
                   and rec.get('train_steps', {'pass': True})['pass'])
    ok = ok and rec['pass']
  result['pass'] = ok
  return result


def format_check(result: dict) -> str:
  ref = result['cpu_reference']
  lines = [f'correctness on {result["device"]} ({result["config"]}); CPU float32 loss {ref["loss"]:.6f}, '
           f'grad norm {ref["grad_norm"]:.6f}']
  for v, rec in result['variants'].items():
    if 'error' in rec:
      lines.append(f'  {v:<14} FAILED: {rec["error"][:100]}')
      continue
    steps = rec.get('train_steps')
    stepped = f', steps {["%.4f" % x for x in steps["losses"]]}' if steps else ''
    lines.append(f'  {v:<14} loss {rec["loss"]:.6f} (rel err {rec["loss_rel_err"]:.1e}), grad norm rel err '
                 f'{rec["grad_norm_rel_err"]:.1e}, tol {rec["tolerance"]}{stepped}: '
                 f'{"pass" if rec["pass"] else "FAIL"}')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------
# Reporting and the command line.
# ---------------------------------------------------------------------------------------------------------
def _fmt(value, scale=1.0, digits=1):
  return '-' if value is None else f'{value / scale:.{digits}f}'


def format_table(records: list[dict]) -> str:
  head = (f'{"variant":<22}{"img/s":>9}{"step ms":>10}{"speedup":>8}{"MFU %":>7}{"compile s":>10}'
          f'{"mem GiB":>9}{"GF/img xla":>11}{"GF/img ana":>11}{"sample ms":>10}')
  lines = [head]
  for r in records:
    if 'error' in r:
      lines.append(f'{r["variant"]:<22}  FAILED: {r["error"][:90]}')
      continue
    lines.append(
        f'{r["variant"]:<22}{_fmt(r["train_images_per_s"], 1, 2):>9}{_fmt(r["train_step_ms"]):>10}'
        f'{_fmt(r.get("speedup"), 1, 2):>8}{_fmt(r["mfu"] and 100 * r["mfu"]):>7}{_fmt(r["compile_s"]):>10}'
        f'{_fmt(r["peak_memory_bytes"], 2 ** 30, 2):>9}{_fmt(r["flops_per_image_xla"], 1e9, 2):>11}'
        f'{_fmt(r["flops_per_image_analytic"], 1e9, 2):>11}{_fmt(r["sample_step_ms"]):>10}')
  return '\n'.join(lines)


def _with_speedups(records: list[dict]) -> list[dict]:
  base = next((r for r in records if 'error' not in r), None)
  for r in records:
    if 'error' not in r and base is not None:
      r['speedup'] = r['train_images_per_s'] / base['train_images_per_s']
  return records


def _parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m idenc_jax.perf.benchmark', description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='configs/base.py:cpu', help='path[:variant], e.g. configs/base.py:paper')
  p.add_argument('--variants', default='', help="comma-separated variants, e.g. 'fp32,bf16,bf16+remat'")
  p.add_argument('--steps', type=int, default=5, help='timed train steps')
  p.add_argument('--statistic', choices=tuple(_STATISTICS), default='median',
                 help='of the timed steps (and matmuls): median, or min on a machine shared with other load')
  p.add_argument('--warmup', type=int, default=2, help='untimed train steps after compilation')
  p.add_argument('--sample_batch', type=int, default=0, help='batch of the sampling-step timing (0: skip)')
  p.add_argument('--peak_flops', type=float, default=0.0, help='peak FLOP/s for MFU (0: measure a matmul)')
  p.add_argument('--peak_matmul_size', type=int, default=0, help='matmul size for the measured peak')
  p.add_argument('--measure_matmul', action='store_true',
                 help='with --peak_flops: also measure the matmul and report mfu_vs_matmul')
  p.add_argument('--fast_compile', action='store_true',
                 help='compile at LLVM -O0 (quicker compiles, slower steps: for smoke tests only)')
  p.add_argument('--sample_first_only', action='store_true',
                 help='time the sampling step in the first variant only')
  p.add_argument('--isolate', choices=('auto', 'yes', 'no'), default='auto',
                 help='one subprocess per variant (auto: when there are several and not --interleave)')
  p.add_argument('--interleave', action='store_true',
                 help='compile all variants in this process, then time their steps in turns (fair ratios '
                      'on a loaded, shared machine)')
  p.add_argument('--variant_timeout', type=float, default=0.0, help='seconds per isolated variant (0: none)')
  p.add_argument('--deadline', type=float, default=0.0,
                 help='seconds after launch by which variants must end: a variant starts only if one as '
                      'long as the longest so far would end in time (0: no deadline)')
  p.add_argument('--deadline_fraction', type=float, default=1.0,
                 help='with --deadline: start a variant if this fraction of the longest so far still fits '
                      '(below 1 under an outer hard timeout: a variant cut short loses only itself)')
  p.add_argument('--check', action='store_true',
                 help='correctness instead of speed: each variant\'s fixed-batch loss on this device against '
                      'a CPU float32 reference (computed in a subprocess), and a few finite train steps')
  p.add_argument('--reference', action='store_true', help='print the float32 fixed-batch loss (--check uses it)')
  p.add_argument('--profile_dir', default='',
                 help='after timing, profile each variant\'s train step (and sampling step) into '
                      'DIR/<variant> and add its time by kind of operation to the record (idenc_jax.perf.op_profile)')
  p.add_argument('--json_out', default='', help='also write the JSON object to this file')
  p.add_argument('--records_out', default='', help='append one JSON line per finished variant to this file')
  return parse_known_with_overrides(p, argv)


def parse_known_with_overrides(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, dict]:
  """(parsed flags, {'section.field': 'value'}) from --config.section.field=value arguments, as with
  ml_collections' config flags; any other unknown argument is a parser error."""
  args, rest = parser.parse_known_args(list(argv))
  overrides = {}
  for item in rest:
    if not item.startswith('--config.') or '=' not in item:
      parser.error(f'unrecognised argument {item!r}')
    key, value = item[len('--config.'):].split('=', 1)
    overrides[key] = value
  return args, overrides


def fits_deadline(elapsed: float, longest: float, deadline: float, fraction: float = 1.0) -> bool:
  """Whether a variant may start: `fraction` of the longest variant so far ends by the deadline (0: none)."""
  return not deadline or elapsed + fraction * longest <= deadline


def _dirname(variant: str) -> str:
  """A variant's profile directory name ('bf16+fused' -> 'bf16+fused'; '' -> 'default')."""
  return ''.join(ch if ch.isalnum() or ch in '+-_.' else '_' for ch in variant) or 'default'


def _log(msg: str) -> None:
  print(f'[benchmark] {msg}', file=sys.stderr, flush=True)


def _run_in_process(args, overrides, variant: str, sample_batch: int, first: bool) -> dict:
  config = load_config(args.config, {**overrides, **variant_overrides(variant)})
  rec = run_variant(config, steps=args.steps, warmup=args.warmup, sample_batch=sample_batch,
                    peak_flops=args.peak_flops or None, peak_matmul_size=args.peak_matmul_size or None,
                    measure_matmul=args.measure_matmul, log=lambda s: _log(f'{variant}: {s}'),
                    compiler_options=FAST_COMPILE if args.fast_compile else None, first_in_process=first,
                    statistic=args.statistic,
                    profile_dir=args.profile_dir and os.path.join(args.profile_dir, _dirname(variant)))
  return {'variant': variant, **rec}


def _run_isolated(args, overrides, variant: str, peak: float | None, timeout: float | None,
                  sample_batch: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out_path = os.path.join(tmp, 'record.json')
    cmd = [sys.executable, '-m', 'idenc_jax.perf.benchmark', f'--config={args.config}', f'--variants={variant}',
           f'--steps={args.steps}', f'--warmup={args.warmup}', f'--sample_batch={sample_batch}',
           f'--peak_matmul_size={args.peak_matmul_size}', '--isolate=no', f'--json_out={out_path}',
           f'--statistic={args.statistic}']
    if peak:
      cmd.append(f'--peak_flops={peak}')
    cmd += ['--measure_matmul'] * args.measure_matmul + ['--fast_compile'] * args.fast_compile
    if args.profile_dir:   # the child profiles into profile_dir/<variant> itself
      cmd.append(f'--profile_dir={args.profile_dir}')
    cmd += [f'--config.{k}={v}' for k, v in overrides.items()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                    os.environ.get('PYTHONPATH')])))
    try:
      proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            timeout=timeout or None)
    except subprocess.TimeoutExpired:
      return {'variant': variant, 'error': f'timed out after {timeout:.0f} s'}
    sys.stderr.write(proc.stderr)
    if proc.returncode or not os.path.exists(out_path):
      tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
      return {'variant': variant, 'error': f'exit {proc.returncode}: {tail}'}
    with open(out_path) as f:
      return json.load(f)


def main(argv=None) -> dict:
  launched = time.monotonic()
  args, overrides = _parse_args(sys.argv[1:] if argv is None else argv)
  variants = [v.strip() for v in args.variants.split(',') if v.strip()] or ['']
  for v in variants:   # fail fast on a misspelt lever or field before any compilation
    load_config(args.config, {**overrides, **variant_overrides(v)})
  if args.reference or args.check:
    if args.reference:
      result = reference_values(load_config(args.config, overrides),
                                FAST_COMPILE if args.fast_compile else None)
      print(json.dumps(result))
    else:
      result = run_check(args.config, overrides, variants, steps=max(args.steps, 1), log=_log,
                         fast_compile=args.fast_compile)
      print(format_check(result))
      print(json.dumps(result), flush=True)
    if args.json_out:
      with open(args.json_out, 'w') as f:
        f.write(json.dumps(result) + '\n')
    return result
  isolate = args.isolate == 'yes' or (args.isolate == 'auto' and len(variants) > 1 and not args.interleave)
  records, peaks = [], {}
  if args.interleave:
    if isolate:
      raise ValueError('--interleave runs every variant in one process; it excludes --isolate=yes.')
    configs = {v or 'default': load_config(args.config, {**overrides, **variant_overrides(v)})
               for v in variants}
    records = run_interleaved(configs, steps=args.steps, warmup=args.warmup, sample_batch=args.sample_batch,
                              peak_flops=args.peak_flops or None,
                              peak_matmul_size=args.peak_matmul_size or None, statistic=args.statistic,
                              log=_log, compiler_options=FAST_COMPILE if args.fast_compile else None,
                              profile_dir=args.profile_dir)
    variants = []
    if args.records_out:
      with open(args.records_out, 'a') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
  longest = 0.0   # the longest variant so far: a variant starts only if one as long would still fit
  for index, v in enumerate(variants):
    sample_batch = 0 if args.sample_first_only and index else args.sample_batch
    elapsed = time.monotonic() - launched
    began = time.monotonic()
    if not fits_deadline(elapsed, longest, args.deadline, args.deadline_fraction):
      rec = {'variant': v, 'error': f'skipped: {elapsed:.0f} s + {longest:.0f} s would pass the deadline '
                                    f'of {args.deadline:.0f} s'}
    elif isolate:
      dtype = load_config(args.config, {**overrides, **variant_overrides(v)}).model.dtype
      timeout = args.variant_timeout or None
      if args.deadline:
        timeout = min(timeout or math.inf, max(args.deadline - elapsed, 1.0))
      rec = _run_isolated(args, overrides, v, args.peak_flops or peaks.get(dtype), timeout, sample_batch)
      if 'error' not in rec and rec.get('peak_flops_source') == 'measured':
        peaks.setdefault(dtype, rec['peak_flops'])   # later variants of this dtype share one peak
    else:
      try:
        rec = _run_in_process(args, overrides, v, sample_batch, first=index == 0)
      except Exception as e:  # pylint: disable=broad-except  (one failed variant must not stop the rest)
        if len(variants) == 1:
          raise
        rec = {'variant': v, 'error': f'{type(e).__name__}: {e}'}
    rec['variant'] = rec.get('variant') or v or 'default'
    if 'error' not in rec:
      longest = max(longest, time.monotonic() - began)
    records.append(rec)
    if args.records_out:
      with open(args.records_out, 'a') as f:
        f.write(json.dumps(rec) + '\n')
  _with_speedups(records)
  first = next((r for r in records if 'error' not in r), records[0])
  result = dict(first, config=args.config, overrides=overrides)
  if len(records) > 1:
    result['variants'] = records
  print(format_table(records))
  line = json.dumps(result)
  print(line, flush=True)
  if args.json_out:
    with open(args.json_out, 'w') as f:
      f.write(line + '\n')
  return result


if __name__ == '__main__':
  main()
