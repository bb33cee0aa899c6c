"""Speed of one variant's train step (and sampling step) on the default device, as a record.

`run_variant` compiles and times one config; `run_interleaved` compiles several and times their steps in
turns (A B C A B C ...), each round also timing the peak matmul of every compute dtype, so that a shared
machine's changing load affects every variant and the peak alike. A record holds train_images_per_s,
train_step_ms (the median of the timed steps, each synchronised with block_until_ready), compile_s,
peak_memory_bytes, flops_per_image_xla (XLA's cost analysis of the step / batch),
flops_per_image_analytic (`idenc_jax.perf.flops`), peak_flops, mfu (analytic FLOPs x images/s / peak),
sample_step_ms (one generator forward at the sample batch), device and host; with a profile directory
also where the step's time goes (`idenc_jax.perf.op_profile`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import numpy as np

from idenc_jax import cli, models
from idenc_jax.perf import fixtures, measure, op_profile
from idenc_jax.train import state as state_lib
from idenc_jax.train import step as step_lib


def lower_train_step(config, batch_size: int | None = None):
  """The jitted train step lowered on abstract shapes (nothing materialised): a jax `Lowered`."""
  if batch_size is not None:
    config = cli.apply_overrides(config, {'train.batch_size': batch_size})
  abstract_state = jax.eval_shape(lambda k: state_lib.create_train_state(config, k), jax.random.key(0))
  optimizer = state_lib.make_optimizer(config, abstract_state.params)
  step = step_lib.make_train_step(config, optimizer)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fixtures.synthetic_batch(config))
  return jax.jit(step, donate_argnums=(0,)).lower(abstract_state, batch)


def variant_dirname(variant: str) -> str:
  """A variant's profile directory name ('bf16+fused' -> 'bf16+fused'; '' -> 'default')."""
  return ''.join(ch if ch.isalnum() or ch in '+-_.' else '_' for ch in variant) or 'default'


def profile_train(bench: TrainBench, out_dir: str, steps: int = 3, top: int = 20) -> dict:
  """`op_profile` breakdown of `steps` more train steps of a compiled TrainBench (written to out_dir)."""
  for _ in range(2):   # steady state only in the trace (a no-op after timed steps)
    bench.step(timed=False)
  return op_profile.profile_compiled(bench.compiled, lambda: bench.step(timed=False), steps, out_dir,
                                     'train_profile', top=top)


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
    self.config, self.log, self.first_in_process = config, log, first_in_process
    b = config.train.batch_size
    self.record: dict[str, Any] = {
        'device': measure.device_name(), 'host': measure.host_info(), 'batch_size': b,
        'dtype': config.model.dtype, 'remat': bool(config.model.remat), 'attention': config.model.attention,
        **models.op_choices(config.model),
        'prefetch': int(config.data.prefetch)}
    self.host_batches = [fixtures.synthetic_batch(config, seed) for seed in range(3)]
    t0 = time.perf_counter()
    self.state, optimizer = fixtures.build_state(config)
    jax.block_until_ready(self.state)
    self.record['init_s'] = time.perf_counter() - t0

    # As the trainer: the state is donated, so the step updates it in place.
    jitted = jax.jit(step_lib.make_train_step(config, optimizer), donate_argnums=(0,))
    t0 = time.perf_counter()
    lowered = jitted.lower(self.state, jax.device_put(self.host_batches[0]))
    # The config's own options (train.compiler_options, as the trainer compiles) under the caller's.
    self.compiled = step_lib.compile_with_options(lowered, config, compiler_options)
    self.record['compile_s'] = time.perf_counter() - t0
    log(f'compiled in {self.record["compile_s"]:.1f} s')
    compiled_flops, lowered_flops = measure.cost_flops(self.compiled), measure.cost_flops(lowered)
    flops, source = measure.choose_flops(compiled_flops, lowered_flops)
    per_image = lambda f: f / b if f else None
    self.record.update(flops_per_image_xla=per_image(flops), flops_source=source,
                       flops_per_image_xla_compiled=per_image(compiled_flops),
                       flops_per_image_xla_lowered=per_image(lowered_flops),
                       flops_per_image_analytic=measure.analytic_flops_per_image(config))
    self.feeder = fixtures.Feeder(self.host_batches, int(config.data.prefetch))
    self.times: list[float] = []
    self.metrics = None
    self.sample = None                   # (compiled sampling call, its arguments) once compiled
    self.sample_times: list[float] = []

  def step(self, timed: bool = True) -> float:
    """One train step, from taking the batch to the updated state being ready; returns seconds."""
    t0 = time.perf_counter()
    self.state, self.metrics = self.compiled(self.state, self.feeder.next())
    jax.block_until_ready(self.state)
    seconds = time.perf_counter() - t0
    if timed:
      self.times.append(seconds)
    return seconds

  def finish(self, sample_batch: int = 0, sample_repeats: int = 5, profile_dir: str = '') -> dict[str, Any]:
    """Times the sampling step if asked, profiles both into `profile_dir` if given
    (`idenc_jax.perf.op_profile`), closes the feeder and returns the record (without MFU)."""
    r, b = self.record, self.config.train.batch_size
    if not self.times:
      raise ValueError('no timed steps were run')
    metrics = jax.device_get(self.metrics)
    r['loss'], r['finite'] = float(metrics['loss']), bool(metrics['finite'])
    step_s = float(np.median(self.times))
    r.update(train_step_ms=1e3 * step_s, train_step_ms_median=1e3 * step_s,
             train_step_ms_min=1e3 * float(np.min(self.times)), train_images_per_s=b / step_s,
             timed_steps=len(self.times), statistic='median')
    # The device's high-water mark covers the whole process: it is this variant's only when nothing
    # else ran before it here; otherwise the compiled executable's own footprint stands in.
    r['device_peak_bytes_in_use'], r['compiled_memory_bytes'] = measure.memory(self.compiled)
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
      compiled, args = self.sample
      if self.sample_times:   # timed in turns with other variants (run_interleaved)
        r['sample_step_ms'] = 1e3 * float(np.median(self.sample_times))
      else:
        r['sample_step_ms'] = 1e3 * measure.time_calls(lambda: compiled(*args), sample_repeats, warmup=2)
      self.log(f'sample step {r["sample_step_ms"]:.1f} ms')
      if profile_dir:
        r['sample_profile'] = _profile_digest(
            lambda: op_profile.profile_call(compiled, args, 3, profile_dir, 'sample_profile'))
    self.state = self.compiled = self.sample = None   # free device memory before the next variant
    return r

  def compile_sample(self, batch: int) -> None:
    """Compiles the sampling step's network call at `batch` on a copy of the generator's parameters
    (the train step donates, and so deletes, the state's own buffers)."""
    params = jax.tree.map(lambda a: a.copy(), self.state.params['generator'])
    compiled, args, self.record['sample_compile_s'] = fixtures.compile_sample_step(self.config, params, batch)
    self.sample = (compiled, args)

  def sample_step(self, timed: bool = True) -> float:
    """One sampling-step network call, synchronised; returns seconds."""
    compiled, args = self.sample
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds = time.perf_counter() - t0
    if timed:
      self.sample_times.append(seconds)
    return seconds


def add_mfu(record: dict, peak_flops: float, source: str, matmul_flops: float | None = None,
            matmul_size: int | None = None) -> dict:
  """MFU = analytic model FLOPs per image x images/s / peak (recomputation under remat not counted).
  matmul_size: the side of the measured matmul behind a measured peak (or behind matmul_flops)."""
  record['peak_flops'], record['peak_flops_source'] = float(peak_flops), source
  record['peak_matmul_size'] = matmul_size if (source == 'measured' or matmul_flops) else None
  analytic = record.get('flops_per_image_analytic')
  record['mfu'] = analytic * record['train_images_per_s'] / peak_flops if analytic else None
  if matmul_flops:   # the measured matmul beside a peak given on the command line
    record['matmul_flops_measured'] = float(matmul_flops)
    record['mfu_vs_matmul'] = analytic * record['train_images_per_s'] / matmul_flops if analytic else None
  return record


def _check_counts(steps: int, warmup: int) -> None:
  if steps < 1 or warmup < 0:
    raise ValueError(f'need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}.')


def run_variant(config, *, steps: int = 5, warmup: int = 2, sample_batch: int = 0,
                peak_flops: float | None = None, measure_matmul: bool = False,
                log: Callable[[str], None] = lambda s: None, compiler_options: dict | None = None,
                first_in_process: bool = True, profile_dir: str = '', peak_size: int | None = None) -> dict[str, Any]:
  """Measures the train step (and optionally the sampling step) of `config` on the default device.

  peak_flops: the peak of the MFU (None: a large matmul in the compute dtype, measured here, best of 5);
  measure_matmul: with peak_flops, also measure the matmul and report mfu_vs_matmul.
  peak_size: the side of that matmul (None: measure.peak_matmul_size()).
  """
  _check_counts(steps, warmup)
  bench = TrainBench(config, log, compiler_options, first_in_process)
  for i in range(warmup + steps):
    bench.step(timed=i >= warmup)
  record = bench.finish(sample_batch, max(steps, 3), profile_dir)
  measured, size = None, peak_size or measure.peak_matmul_size()
  if measure_matmul or not peak_flops:
    measured = measure.measure_peak_flops(config.model.dtype, size)
  if not peak_flops:
    return add_mfu(record, measured, 'measured', matmul_size=size)
  return add_mfu(record, peak_flops, 'flag', measured, size)


def run_interleaved(configs: dict[str, Any], *, steps: int = 5, warmup: int = 2, sample_batch: int = 0,
                    peak_flops: float | None = None, log: Callable[[str], None] = lambda s: None,
                    compiler_options: dict | None = None, profile_dir: str = '',
                    peak_size: int | None = None, others: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """All variants ({name: config}) compiled first, then timed in turns, each round also timing the
  peak matmul of every compute dtype (unless peak_flops is given), so that a shared machine's changing
  load reaches the variants and the peak alike. The peak is the fastest of those matmuls and of five more
  timed after the rounds, with nothing else running (side peak_size, default measure.peak_matmul_size()).
  With `sample_batch`, each round also times every variant's sampling step. Profiles go to
  profile_dir/<variant> (none without profile_dir). `others`: {name: bench} of another framework
  (`torch_reference.TorchBench`: step(timed), sample_step(batch, timed), finish(...)), timed in the same turns
  and returned after the variants, without MFU."""
  _check_counts(steps, warmup)
  benches = {}
  for name, config in configs.items():
    benches[name] = TrainBench(config, lambda s, n=name: log(f'{n}: {s}'), compiler_options,
                               first_in_process=len(configs) == 1)
  if sample_batch:
    for bench in benches.values():
      bench.compile_sample(sample_batch)
  dtypes = dict.fromkeys(c.model.dtype for c in configs.values())   # in the variants' order
  size = peak_size or measure.peak_matmul_size()
  probes = {} if peak_flops else {dtype: measure.matmul_probe(dtype, size) for dtype in dtypes}
  probe_times = {dtype: [] for dtype in probes}
  for i in range(warmup + steps):
    for bench in benches.values():
      bench.step(timed=i >= warmup)
      if sample_batch:
        bench.sample_step(timed=i >= warmup)
    for other in (others or {}).values():
      other.step(timed=i >= warmup)
      if sample_batch:
        other.sample_step(sample_batch, timed=i >= warmup)
    for dtype, (call, _) in probes.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      if i >= warmup:
        probe_times[dtype].append(time.perf_counter() - t0)
    log(f'round {i + 1}/{warmup + steps} done')
  for dtype, (call, _) in probes.items():   # the quiet measurement
    probe_times[dtype].append(measure.time_calls(call, repeats=5, warmup=0, statistic='min'))
  peaks = {dtype: matmul_flops / min(probe_times[dtype]) for dtype, (_, matmul_flops) in probes.items()}
  records = []
  for name, bench in benches.items():
    profile = profile_dir and os.path.join(profile_dir, variant_dirname(name))
    record = {'variant': name, **bench.finish(sample_batch, max(steps, 3), profile)}
    dtype = configs[name].model.dtype
    records.append(add_mfu(record, peak_flops or peaks[dtype], 'flag' if peak_flops else 'measured',
                           matmul_size=size))
  for name, other in (others or {}).items():
    records.append({'variant': name, **other.finish(sample_batch, max(steps, 3))})
  return records
