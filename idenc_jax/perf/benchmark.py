"""`python -m idenc_jax.perf.benchmark`: speed of the train step and the sampling step on one device.

  python -m idenc_jax.perf.benchmark --config=configs/base.py:cpu --variants=fp32,bf16,bf16+remat,bf16+fused

prints a short table and, as its last line, one JSON object with train_images_per_s, train_step_ms
(the median over timed steps after warm-up, each synchronised with block_until_ready), compile_s,
peak_memory_bytes, flops_per_image_xla (XLA's cost analysis of the step / batch, `measure.choose_flops`),
flops_per_image_analytic (`idenc_jax.perf.flops`), peak_flops (--peak_flops, else the fastest of several
--peak_size^3 matmuls in the compute dtype on the same device, warmed; its side in peak_matmul_size),
mfu (analytic FLOPs x images/s / peak), sample_step_ms (one generator forward at --sample_batch) and
device (with host: CPU model, cores, jax version). With several variants the object also holds
`variants`, one such record per variant with its `speedup` over the first; by default each variant
runs in a fresh subprocess (its own peak memory; a crash or hang costs only that variant).

A variant is levers joined by '+' (`idenc_jax.perf.levers`): fp32 | bf16, remat, fused / xla, mmgrad,
gnfused / gnflax, flat / perarray, b<N>, prefetch<N>, or any `section.field=value`; a lever a variant does
not name keeps the config's value (the cpu configs use the fused group norm, so their plain float32 step is
fp32+gnflax). Config fields are overridden as everywhere, `--config.section.field=value`.
--interleave times all variants in one process in turns, for fair ratios on a loaded machine.
--profile_dir=DIR adds, per variant, where the step's time goes (`idenc_jax.perf.op_profile`).
--check measures correctness instead of speed (`idenc_jax.perf.check`).

Batches are synthetic and parameters random (`idenc_jax.perf.fixtures`); nothing here imports
tensorflow, grain or clu, so the benchmark runs on a bare accelerator image with jax, flax, optax,
ml_collections and absl.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from idenc_jax import cli
from idenc_jax.perf import bench, check, levers, measure, torch_reference

KEYS = ('train_images_per_s', 'train_step_ms', 'compile_s', 'peak_memory_bytes', 'flops_per_image_xla',
        'flops_per_image_analytic', 'peak_flops', 'mfu', 'sample_step_ms', 'device')
_OVERRIDE = re.compile(r'^--?(no)?config\.')


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags; defined at start-up, not at import, since the other entry points define
  flags of the same names (--config, --steps) and may be imported into the same process."""
  where = {'flag_values': flag_values}
  cli.define_config_flag(default='configs/base.py:cpu', required=False, **where)
  flags.DEFINE_list('variants', [], "comma-separated variants, e.g. 'fp32,bf16,bf16+remat'", **where)
  flags.DEFINE_integer('steps', 5, 'timed train steps', **where)
  flags.DEFINE_integer('warmup', 2, 'untimed train steps after compilation', **where)
  flags.DEFINE_integer('sample_batch', 0, 'batch of the sampling-step timing (0: skip)', **where)
  flags.DEFINE_float('peak_flops', 0.0, 'peak FLOP/s for MFU (0: measure a matmul)', **where)
  flags.DEFINE_integer('peak_size', 0, 'side of the measured peak matmul (0: 4096 on CPU, 8192 on '
                       'accelerators)', **where)
  flags.DEFINE_bool('measure_matmul', False, 'with --peak_flops: also measure the matmul and report '
                    'mfu_vs_matmul', **where)
  flags.DEFINE_bool('fast_compile', False, 'compile at LLVM -O0 (quicker compiles, slower steps: for smoke '
                    'tests only)', **where)
  flags.DEFINE_enum('isolate', 'auto', ['auto', 'yes', 'no'], 'one subprocess per variant (auto: when '
                    'there are several and not --interleave)', **where)
  flags.DEFINE_bool('interleave', False, 'compile all variants in this process, then time their steps in '
                    'turns (fair ratios on a loaded, shared machine)', **where)
  flags.DEFINE_float('deadline', 0.0, 'seconds after launch by which variants must end: a variant starts '
                     'only if one as long as the longest so far would end in time (0: no deadline)', **where)
  flags.DEFINE_float('deadline_fraction', 1.0, 'with --deadline: start a variant if this fraction of the '
                     'longest so far still fits (below 1 under an outer hard timeout: a variant cut short '
                     'loses only itself)', **where)
  flags.DEFINE_bool('check', False, "correctness instead of speed: each variant's fixed-batch loss on this "
                    'device against a CPU float32 reference (computed in a subprocess), and a few finite '
                    'train steps', **where)
  flags.DEFINE_bool('reference_loss', False, 'print the float32 fixed-batch loss (the CPU side of --check)',
                    **where)
  flags.DEFINE_enum('reference', '', ['', 'torch'], 'also time the PyTorch reference of the config '
                    '(`perf.torch_reference`: same architecture, batch, optimizer and EMA) in the same process, '
                    'in turns with the variants under --interleave, and report each variant\'s speed against it',
                    **where)
  flags.DEFINE_string('profile_dir', '', "after timing, profile each variant's train step (and sampling "
                      'step) into DIR/<variant> and add its time by kind of operation to the record', **where)
  flags.DEFINE_string('json_out', '', 'also write the JSON object to this file', **where)
  flags.DEFINE_string('records_out', '', 'append one JSON line per finished variant to this file', **where)


# ---------------------------------------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------------------------------------
def _fmt(value, scale=1.0, digits=1):
  return '-' if value is None else f'{value / scale:.{digits}f}'


def format_table(records: list[dict]) -> str:
  """One line per variant record (a failed one with its error)."""
  head = (f'{"variant":<22}{"img/s":>9}{"step ms":>10}{"speedup":>8}{"vs torch":>9}{"MFU %":>7}{"compile s":>10}'
          f'{"mem GiB":>9}{"GF/img xla":>11}{"GF/img ana":>11}{"sample ms":>10}')
  lines = [head]
  for r in records:
    if 'error' in r:
      lines.append(f'{r["variant"]:<22}  FAILED: {r["error"][:90]}')
      continue
    lines.append(
        f'{r["variant"]:<22}{_fmt(r["train_images_per_s"], 1, 2):>9}{_fmt(r["train_step_ms"]):>10}'
        f'{_fmt(r.get("speedup"), 1, 2):>8}{_fmt(r.get("vs_torch"), 1, 2):>9}{_fmt(r.get("mfu") and 100 * r["mfu"]):>7}'
        f'{_fmt(r.get("compile_s")):>10}{_fmt(r.get("peak_memory_bytes"), 2 ** 30, 2):>9}'
        f'{_fmt(r.get("flops_per_image_xla", r.get("flops_per_image_torch")), 1e9, 2):>11}'
        f'{_fmt(r["flops_per_image_analytic"], 1e9, 2):>11}{_fmt(r["sample_step_ms"]):>10}')
  peaks = dict.fromkeys((r['peak_flops'], r['peak_flops_source'], r.get('peak_matmul_size'))
                        for r in records if 'error' not in r and 'peak_flops' in r)
  for peak, source, size in peaks:
    how = f'the best {size}^3 matmul timed in this run' if source == 'measured' else 'from --peak_flops'
    lines.append(f'MFU peak: {peak / 1e9:.1f} GFLOP/s ({how})')
  return '\n'.join(lines)


def _with_speedups(records: list[dict]) -> list[dict]:
  base = next((r for r in records if 'error' not in r), None)
  for r in records:
    if 'error' not in r and base is not None:
      r['speedup'] = r['train_images_per_s'] / base['train_images_per_s']
  return records


def with_torch_ratio(records: list[dict]) -> list[dict]:
  """Each record's images/s (and sampling step) against the PyTorch reference's record, when there is one."""
  ref = next((r for r in records if r.get('variant') == 'torch' and 'error' not in r), None)
  for r in records:
    if ref is not None and 'error' not in r:
      r['vs_torch'] = r['train_images_per_s'] / ref['train_images_per_s']
      if r.get('sample_step_ms') and ref.get('sample_step_ms'):
        r['sample_vs_torch'] = ref['sample_step_ms'] / r['sample_step_ms']
  return records


def _log(msg: str) -> None:
  print(f'[benchmark] {msg}', file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Isolation and deadlines.
# ---------------------------------------------------------------------------------------------------------
def fits_deadline(elapsed: float, longest: float, deadline: float, fraction: float = 1.0) -> bool:
  """Whether a variant may start: `fraction` of the longest variant so far ends by the deadline (0: none)."""
  return not deadline or elapsed + fraction * longest <= deadline


def config_overrides(argv: list[str]) -> list[str]:
  """The `--config.*` arguments of a command line, to give a subprocess the same config (ml_collections
  reads them from sys.argv too)."""
  return [a for a in argv[1:] if _OVERRIDE.match(a)]


def _run_isolated(f: flags.FlagValues, spec: str, overrides: list[str], variant: str, peak: float | None,
                  timeout: float | None) -> dict:
  """One variant in a fresh `python -m idenc_jax.perf.benchmark` process: its record, or its error."""
  with tempfile.TemporaryDirectory() as tmp:
    out_path = os.path.join(tmp, 'record.json')
    cmd = [*check.BENCHMARK, f'--config={spec}', *overrides, f'--variants={variant}', f'--steps={f.steps}',
           f'--warmup={f.warmup}', f'--sample_batch={f.sample_batch}', '--isolate=no',
           f'--json_out={out_path}', f'--peak_size={f.peak_size}']
    cmd += [f'--peak_flops={peak}'] * bool(peak) + ['--measure_matmul'] * f.measure_matmul
    cmd += ['--fast_compile'] * f.fast_compile
    cmd += [f'--profile_dir={f.profile_dir}'] * bool(f.profile_dir)   # the child adds /<variant> itself
    try:
      proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=check.subprocess_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
      return {'variant': variant, 'error': f'timed out after {timeout:.0f} s'}
    sys.stderr.write(proc.stderr)
    if proc.returncode or not os.path.exists(out_path):
      tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
      return {'variant': variant, 'error': f'exit {proc.returncode}: {tail}'}
    with open(out_path) as fh:
      return json.load(fh)


def _run_in_process(f: flags.FlagValues, variant: str, config, first: bool) -> dict:
  name = variant or 'default'
  rec = bench.run_variant(
      config, steps=f.steps, warmup=f.warmup, sample_batch=f.sample_batch, peak_flops=f.peak_flops or None,
      measure_matmul=f.measure_matmul, log=lambda s: _log(f'{name}: {s}'),
      compiler_options=measure.FAST_COMPILE if f.fast_compile else None, first_in_process=first,
      profile_dir=f.profile_dir and os.path.join(f.profile_dir, bench.variant_dirname(variant)),
      peak_size=f.peak_size or None)
  return {'variant': variant, **rec}


# ---------------------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------------------
def run_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """Runs the benchmark (or --check, --reference_loss) the flags ask for; returns the printed JSON object."""
  launched = time.monotonic()
  f = flag_values
  spec = config_flags.get_config_filename(f['config'])
  overrides = config_overrides(sys.argv)
  options = measure.FAST_COMPILE if f.fast_compile else None
  variants = [v.strip() for v in f.variants if v.strip()] or ['']
  try:   # fail fast on a misspelt lever or field, before any compilation
    configs = {v: levers.variant_config(f.config, v) for v in variants}
  except ValueError as e:
    sys.exit(f'FATAL {e}')
  if f.reference_loss:
    result = check.reference_values(f.config, options)
    measure.emit(result, '', f.json_out)
    return result
  if f.check:
    result = check.run_check(f.config, spec, overrides, variants, steps=max(f.steps, 1), log=_log,
                             fast_compile=f.fast_compile)
    measure.emit(result, check.format_check(result), f.json_out)
    return result
  isolate = f.isolate == 'yes' or (f.isolate == 'auto' and len(variants) > 1 and not f.interleave)
  records, peaks = [], {}
  torch_bench = None
  if f.reference == 'torch':
    try:
      torch_bench = torch_reference.TorchBench(f.config, lambda s: _log(f'torch: {s}'))
    except ImportError as e:
      sys.exit(f'FATAL --reference=torch needs torch ({e}); pip install torch')
    except ValueError as e:
      sys.exit(f'FATAL {e}')
  if f.interleave:
    if isolate:
      sys.exit('FATAL --interleave runs every variant in one process; it excludes --isolate=yes.')
    records = bench.run_interleaved({v or 'default': c for v, c in configs.items()}, steps=f.steps,
                                    warmup=f.warmup, sample_batch=f.sample_batch,
                                    peak_flops=f.peak_flops or None, log=_log, compiler_options=options,
                                    profile_dir=f.profile_dir, peak_size=f.peak_size or None,
                                    others={'torch': torch_bench} if torch_bench else None)
    variants = []
    if f.records_out:
      with open(f.records_out, 'a') as fh:
        fh.writelines(json.dumps(r) + '\n' for r in records)
  longest = 0.0   # the longest variant so far: a variant starts only if one as long would still fit
  for index, v in enumerate(variants):
    elapsed = time.monotonic() - launched
    began = time.monotonic()
    if not fits_deadline(elapsed, longest, f.deadline, f.deadline_fraction):
      rec = {'variant': v, 'error': f'skipped: {elapsed:.0f} s + {longest:.0f} s would pass the deadline '
                                    f'of {f.deadline:.0f} s'}
    elif isolate:
      dtype = configs[v].model.dtype
      timeout = max(f.deadline - elapsed, 1.0) if f.deadline else None
      rec = _run_isolated(f, spec, overrides, v, f.peak_flops or peaks.get(dtype), timeout)
      if 'error' not in rec and rec.get('peak_flops_source') == 'measured':
        peaks.setdefault(dtype, rec['peak_flops'])   # later variants of this dtype share one peak
    else:
      try:
        rec = _run_in_process(f, v, configs[v], first=index == 0)
      except Exception as e:  # pylint: disable=broad-except  (one failed variant must not stop the rest)
        if len(variants) == 1:
          raise
        rec = {'variant': v, 'error': f'{type(e).__name__}: {e}'}
    rec['variant'] = rec.get('variant') or v or 'default'
    if 'error' not in rec:
      longest = max(longest, time.monotonic() - began)
    records.append(rec)
    if f.records_out:
      with open(f.records_out, 'a') as fh:
        fh.write(json.dumps(rec) + '\n')
  if torch_bench is not None and not f.interleave:   # timed after the variants, in this process
    for i in range(f.warmup + f.steps):
      torch_bench.step(timed=i >= f.warmup)
    records.append({'variant': 'torch', **torch_bench.finish(f.sample_batch, max(f.steps, 3))})
  _with_speedups(records)
  with_torch_ratio(records)
  first = next((r for r in records if 'error' not in r), records[0])
  result = dict(first, config=spec, overrides=config_flags.get_override_values(f['config']))
  if len(records) > 1:
    result['variants'] = records
  measure.emit(result, format_table(records), f.json_out)
  return result


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run_from_flags()   # app.run exits with what main returns: None, not the record


def console_main() -> None:
  """`python -m idenc_jax.perf.benchmark` and its console command."""
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  console_main()
