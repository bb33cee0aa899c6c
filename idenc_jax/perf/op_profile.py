"""Where a compiled step's device time goes: a profiler trace joined with the step's optimised HLO.

  python -m idenc_jax.perf.op_profile --config=configs/base.py:cpu [--variant=bf16] [--sample_batch=16]

compiles the train step (and, with --sample_batch, one sampling-step network call), runs a few steps
under `jax.profiler.trace`, and prints per step: the time of the compiled module's operations by kind
(convolution, matmul, fused attention, elementwise, reduction, copy/transpose, communication, other),
by part of the model (generator / encoders, forward / backward, everything outside the networks:
noise, loss, optimizer, EMA), the most expensive operations with their source (the flax module path
XLA keeps in each operation's metadata), and how much of the step's wall time no operation covers
(host work, launch gaps). `python -m idenc_jax.perf.benchmark --profile_dir=DIR` records the same for each
variant it times, without compiling again.

Each trace event is matched to an instruction of the optimised module by name (the event's `hlo_op`
argument on GPUs, the event name itself for XLA:CPU's thunks); what an instruction is comes from its
opcode, its custom-call target (cuDNN, cuBLAS) and, for fusions, the operations of the computation it
calls. Where the profiler derives an "XLA Ops" line from the device's streams, only that line is
counted, so no kernel is counted twice.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import time
from typing import Any, Callable

from absl import app, flags
import jax

from idenc_jax import cli
from idenc_jax.perf import fixtures, levers, measure
from idenc_jax.train import step as step_lib

CATEGORIES = ('convolution', 'matmul', 'attention (fused)', 'elementwise', 'reduction', 'copy/transpose',
              'communication', 'other')
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_NETWORKS = ('UNet', 'IdentityEncoder', 'ConditionEncoder')

_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$')


@dataclasses.dataclass(frozen=True)
class HloOp:
  """One instruction of an optimised HLO module, as far as the breakdown needs it."""
  name: str
  opcode: str
  shape: str
  op_name: str = ''        # metadata: the jax/flax source path, e.g. jit(step)/jvp(UNet)/down_0_0/conv_0/...
  fusion_kind: str = ''    # kLoop, kInput, kOutput, kCustom
  target: str = ''         # custom-call target, or the custom fusion's kind (e.g. __cudnn$fusion)
  called: tuple[str, ...] = ()   # opcodes (and custom-call targets) inside a fusion's computation
  operands: tuple[str, ...] = ()


def parse_hlo(text: str) -> tuple[str, dict[str, HloOp]]:
  """(module name, {instruction name: HloOp}) of an HLO module's text (`compiled.as_text()`)."""
  module = ''
  first = text.split('\n', 1)[0]
  if first.startswith('HloModule '):
    module = first.split()[1].rstrip(',')
  contents: dict[str, list[str]] = collections.defaultdict(list)   # computation -> opcodes/targets
  raw = []   # (name, shape, opcode, rest of the line, custom-call target match)
  current = None
  for line in text.splitlines():
    head = _COMPUTATION.match(line)
    if head and ' = ' not in line:
      current = head.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    call_target = re.search(r'custom_call_target="([^"]*)"', rest)
    contents[current].append(call_target.group(1) if call_target else opcode)
    raw.append((name, shape, opcode, rest, call_target))
  ops = {}
  for name, shape, opcode, rest, call_target in raw:
    op_name = re.search(r'op_name="([^"]*)"', rest)
    kind = re.search(r'kind=(\w+)', rest)
    # A custom call's target, or a custom fusion's kind (cuDNN / Triton GEMM / XLA:CPU's YNNPACK fusions).
    target = call_target or re.search(r'"kind":"(__[^"]*)"', rest)
    calls = re.search(r'calls=%?([\w.\-]+)', rest)
    operands = tuple(re.findall(r'%([\w.\-]+)', rest[:rest.find(')')]))
    ops[name] = HloOp(name=name, opcode=opcode, shape=shape, op_name=op_name.group(1) if op_name else '',
                      fusion_kind=kind.group(1) if kind and opcode == 'fusion' else '',
                      target=target.group(1) if target else '',
                      called=tuple(contents.get(calls.group(1), ())) if calls else (), operands=operands)
  return module, ops


def category(op: HloOp) -> str:
  """The kind of work an instruction does (one of CATEGORIES).

  From what it contains; the source path's primitive decides only for opaque library calls and
  custom fusions (a loop fusion that carries a convolution's source path is still elementwise work).
  """
  inside = set(op.called) | {op.opcode}
  target = op.target.lower()
  opaque = op.opcode == 'custom-call' or op.fusion_kind == 'kCustom'
  primitive = op.op_name.rsplit('/', 1)[-1] if opaque else ''
  if 'fmha' in target or 'flash' in target or (opaque and 'dot_product_attention' in op.op_name):
    return 'attention (fused)'
  # Library targets inside fusions are matched by name, opcodes exactly ('conv' is in 'convert').
  libraries = ' '.join(c.lower() for c in op.called if c.startswith('__'))
  if ('convolution' in inside or 'conv' in target or 'conv' in libraries
      or primitive.startswith('conv_general_dilated')):
    return 'convolution'
  if ('dot' in inside or 'gemm' in target or 'matmul' in target or 'gemm' in libraries
      or 'matmul' in libraries or primitive == 'dot_general'):
    return 'matmul'
  if op.opcode in _COLLECTIVES or any(c.startswith(_COLLECTIVES) for c in inside):
    return 'communication'
  if op.opcode in ('copy', 'transpose', 'copy-start', 'copy-done') or (
      op.opcode == 'fusion' and inside - {'fusion', 'parameter', 'bitcast'} <= {'copy', 'transpose'}):
    return 'copy/transpose'
  if op.opcode == 'reduce' or op.fusion_kind == 'kInput' or 'reduce' in inside or primitive.startswith('reduce_'):
    return 'reduction'
  if op.opcode == 'fusion' or op.opcode in ('add', 'multiply', 'subtract', 'divide', 'exponential', 'select',
                                            'convert', 'broadcast', 'maximum', 'minimum', 'concatenate'):
    return 'elementwise'
  return 'other'


def _source_part(op_name: str) -> str | None:
  for net in _NETWORKS:
    if f'transpose(jvp({net}))' in op_name:
      return f'{net} backward'
    if f'jvp({net})' in op_name or re.search(rf'(^|/){net}(/|$)', op_name):
      return f'{net} forward'
  return None


def part(op: HloOp, ops: dict[str, HloOp] | None = None, depth: int = 4) -> str:
  """Which network an instruction belongs to and in which pass, from its source path.

  An instruction XLA made without source metadata (a layout transpose, a kernel-gradient convolution
  of XLA:CPU) is charged to its nearest operands that have one, a backward pass first.
  """
  if op.op_name:
    return _source_part(op.op_name) or 'outside the networks'
  frontier, seen = list(op.operands), set()
  for _ in range(depth if ops else 0):
    found = []
    for name in frontier:
      source = ops.get(name)
      if source is not None and source.op_name:
        found.append(_source_part(source.op_name) or 'outside the networks')
    if found:
      return next((f for f in found if f.endswith('backward')), found[0])
    seen.update(frontier)
    frontier = [o for name in frontier if name in ops for o in ops[name].operands if o not in seen]
  return 'outside the networks'


def read_trace(trace_dir: str) -> dict:
  """The newest Chrome-trace JSON that `jax.profiler.trace(trace_dir)` wrote, as a dict."""
  paths = sorted(glob.glob(os.path.join(trace_dir, 'plugins', 'profile', '*', '*.trace.json.gz')),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f'no *.trace.json.gz under {trace_dir}/plugins/profile: was a trace captured?')
  with gzip.open(paths[-1], 'rt') as f:
    return json.load(f)


def kernel_names(ops: dict[str, HloOp]) -> dict[str, str]:
  """{GPU kernel name: instruction}: XLA:GPU names a fusion's kernel after the instruction with '.' and
  '-' made '_' (loop_add_fusion.22 -> loop_add_fusion_22)."""
  return {re.sub(r'[.\-]', '_', name): name for name in ops}


def _event_op(event: dict, ops: dict[str, HloOp], kernels: dict[str, str] | None = None) -> str | None:
  """The instruction an event ran: its `hlo_op` argument (GPU kernels; a comma-separated list where
  one kernel serves several, charged to the first known), its name (XLA:CPU thunks), or, for a kernel
  replayed from a CUDA graph (`hlo_op` names the command buffer, not an instruction), its kernel name."""
  args = event.get('args') or {}
  for candidate in (args.get('hlo_op'), event.get('name')):
    for name in str(candidate or '').split(','):
      name = re.split(r'[\s:]', name.strip().lstrip('%'), maxsplit=1)[0]
      if name in ops:
        return name
  return (kernels or {}).get(str(event.get('name', '')))


def op_times(trace: dict, module: str, ops: dict[str, HloOp]) -> tuple[collections.Counter, collections.Counter]:
  """({instruction: total microseconds}, {instruction: events}) of the module's operations in a trace."""
  total, count, _ = device_times(trace, module, ops)
  return total, count


def device_times(trace: dict, module: str, ops: dict[str, HloOp]
                 ) -> tuple[collections.Counter, collections.Counter, float]:
  """`op_times` and the microseconds of device events on the same lines that match no instruction.

  On a trace with device processes (GPU, TPU) only their events count, and of those only the
  "XLA Ops" lines where the profiler derived them (they repeat the streams' kernels per operation);
  events naming another module are skipped (instruction names repeat across modules). The unmatched
  time (memset and memcpy kernels, kernels this join cannot name) is counted on device lines only: on
  XLA:CPU every host event would count.
  """
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  processes = {e['pid']: e.get('args', {}).get('name', '') for e in events
               if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  threads = {(e['pid'], e.get('tid')): e.get('args', {}).get('name', '') for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  devices = {pid for pid, name in processes.items() if name.startswith('/device:')}
  kernels = kernel_names(ops) if devices else {}
  lines: dict[Any, tuple[collections.Counter, collections.Counter]] = collections.defaultdict(
      lambda: (collections.Counter(), collections.Counter()))
  unmatched: dict[Any, float] = collections.Counter()
  for e in events:
    if e.get('ph') != 'X' or (devices and e.get('pid') not in devices):
      continue
    event_module = str((e.get('args') or {}).get('hlo_module', ''))
    if event_module and module and event_module.split('(')[0] != module:
      continue
    key = (e.get('pid'), e.get('tid'))
    name = _event_op(e, ops, kernels)
    if name is None:
      unmatched[key] += float(e.get('dur', 0.0)) if devices else 0.0
      continue
    total, count = lines[key]
    total[name] += float(e.get('dur', 0.0))
    count[name] += 1
  xla_ops = [key for key in lines if 'XLA Ops' in threads.get(key, '')]
  total, count = collections.Counter(), collections.Counter()
  for key in xla_ops or list(lines):
    total.update(lines[key][0])
    count.update(lines[key][1])
  return total, count, sum(unmatched[key] for key in (xla_ops or list(lines)))


def summarize(trace: dict, hlo_text: str, steps: int, wall_s: float | None = None, top: int = 20) -> dict:
  """Per-step milliseconds of the module's operations by category and part, and the top operations."""
  module, ops = parse_hlo(hlo_text)
  total, count, unmatched_us = device_times(trace, module, ops)
  if not total:
    raise ValueError(f'the trace holds no operation of module {module!r}: was it captured while the step ran?')
  per_step = lambda us: us / 1e3 / steps
  by_category = dict.fromkeys(CATEGORIES, 0.0)
  by_part: dict[str, float] = collections.Counter()
  matrix: dict[str, dict[str, float]] = collections.defaultdict(lambda: dict.fromkeys(CATEGORIES, 0.0))
  for name, us in total.items():
    op = ops[name]
    c, p = category(op), part(op, ops)
    by_category[c] += per_step(us)
    by_part[p] += per_step(us)
    matrix[p][c] += per_step(us)
  op_ms = per_step(sum(total.values()))
  out = {
      'module': module, 'steps': steps, 'op_ms_per_step': op_ms,
      # Device time the join could not name: were it large, the breakdown would leave work out.
      'unmatched_device_ms_per_step': per_step(unmatched_us),
      'wall_ms_per_step': None if wall_s is None else 1e3 * wall_s / steps,
      'by_category_ms': by_category, 'by_part_ms': dict(by_part), 'part_by_category_ms': dict(matrix),
      'top_ops': [{'name': n, 'ms': per_step(us), 'calls_per_step': count[n] / steps,
                   'category': category(ops[n]), 'part': part(ops[n], ops), 'shape': ops[n].shape,
                   'source': ops[n].op_name} for n, us in total.most_common(top)],
  }
  if wall_s is not None:
    # Operations of XLA:CPU run on several threads at once, so their sum can pass the wall time.
    out['uncovered_ms_per_step'] = max(out['wall_ms_per_step'] - op_ms, 0.0)
  return out


def format_summary(s: dict, title: str = '') -> str:
  lines = [f'{title or s["module"]}: operations {s["op_ms_per_step"]:.2f} ms per step'
           + (f' (wall {s["wall_ms_per_step"]:.2f} ms)' if s.get('wall_ms_per_step') else '')
           + (f', {s["unmatched_device_ms_per_step"]:.2f} ms of device events matched no operation'
              if s.get('unmatched_device_ms_per_step') else '')]
  total = s['op_ms_per_step'] or 1.0
  lines.append('  by kind:  ' + ', '.join(f'{c} {ms:.2f} ms ({100 * ms / total:.0f}%)'
                                          for c, ms in s['by_category_ms'].items() if ms > 0))
  lines.append('  by part:')
  for p, ms in sorted(s['by_part_ms'].items(), key=lambda kv: -kv[1]):
    kinds = ', '.join(f'{c} {v:.2f}' for c, v in s['part_by_category_ms'][p].items() if v > 0.005 * total)
    lines.append(f'    {p:<28}{ms:9.2f} ms ({100 * ms / total:4.1f}%)  [{kinds}]')
  lines.append('  top operations:')
  for o in s['top_ops']:
    lines.append(f'    {o["ms"]:8.3f} ms {o["category"]:<17} {o["shape"][:34]:<34} {o["source"][-70:] or o["name"]}')
  return '\n'.join(lines)


def capture(run: Callable[[], Any], steps: int, trace_dir: str) -> float:
  """Runs `run` (one synchronised step) `steps` times under the profiler; returns their wall seconds."""
  os.makedirs(trace_dir, exist_ok=True)
  with jax.profiler.trace(trace_dir):
    t0 = time.perf_counter()
    for _ in range(steps):
      run()
    wall = time.perf_counter() - t0
  return wall


def profile_compiled(compiled, run: Callable[[], Any], steps: int, out_dir: str, name: str,
                     top: int = 20, keep_xplane: bool = False) -> dict:
  """Profiles `steps` calls of `run` (which calls `compiled`); writes NAME.json (and the trace) to out_dir."""
  trace_dir = os.path.join(out_dir, f'{name}_trace')
  wall = capture(run, steps, trace_dir)
  summary = summarize(read_trace(trace_dir), compiled.as_text(), steps, wall, top)
  with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  if not keep_xplane:   # the raw protobuf is large; the Chrome trace beside it is enough to look again
    for path in glob.glob(os.path.join(trace_dir, 'plugins', 'profile', '*', '*.xplane.pb')):
      os.remove(path)
  return summary


def profile_call(compiled, args: tuple, steps: int, out_dir: str, name: str, top: int = 20) -> dict:
  """`profile_compiled` of synchronised calls `compiled(*args)`, after two untraced ones (so that the
  trace holds the steady state only)."""
  run = lambda: jax.block_until_ready(compiled(*args))
  run()
  run()
  return profile_compiled(compiled, run, steps, out_dir, name, top=top)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags; defined at start-up, not at import, since the other entry points define
  flags of the same names (--config, --steps) and may be imported into the same process."""
  cli.define_config_flag(default='configs/base.py:cpu', required=False, flag_values=flag_values)
  flags.DEFINE_string('variant', '', "levers as in the benchmark, e.g. 'bf16+fused'", flag_values=flag_values)
  flags.DEFINE_integer('steps', 3, 'profiled steps (after 2 warm-up steps)', flag_values=flag_values)
  flags.DEFINE_integer('sample_batch', 0, 'also profile the sampling step at this batch',
                       flag_values=flag_values)
  flags.DEFINE_string('out', '/tmp/idenc_op_profile', 'directory for the traces and summaries',
                      flag_values=flag_values)
  flags.DEFINE_integer('top', 20, 'operations listed', flag_values=flag_values)
  flags.DEFINE_bool('fast_compile', False, 'compile the train step at LLVM -O0 (a smoke test: the profile '
                    'is then not representative)', flag_values=flag_values)


def run_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """Profiles the train step of --config with --variant (and a sampling step with --sample_batch);
  returns {'train': summary, 'sample': summary}."""
  f = flag_values
  try:
    config = levers.variant_config(f.config, f.variant)
  except ValueError as e:
    sys.exit(f'FATAL {e}')
  os.makedirs(f.out, exist_ok=True)
  # As the benchmark: random parameters, a donated state, synthetic batches fed ahead as the trainer's.
  state, optimizer = fixtures.build_state(config)
  host_batches = [fixtures.synthetic_batch(config, seed) for seed in range(3)]
  lowered = jax.jit(step_lib.make_train_step(config, optimizer), donate_argnums=(0,)).lower(
      state, jax.device_put(host_batches[0]))
  # With the config's compiler options, as the trainer compiles it.
  compiled = step_lib.compile_with_options(lowered, config, measure.FAST_COMPILE if f.fast_compile else None)
  print('[op_profile] train step compiled', file=sys.stderr)
  feeder = fixtures.Feeder(host_batches, int(config.data.prefetch))
  current = {'state': state}

  def train_step():
    current['state'], _ = compiled(current['state'], feeder.next())
    jax.block_until_ready(current['state'])

  try:
    train_step()
    train_step()
    result = {'train': profile_compiled(compiled, train_step, f.steps, f.out, 'train_profile', top=f.top)}
    print(format_summary(result['train'], 'train step'))
    if f.sample_batch:
      # A copy: the next train step would donate, and so delete, the state's own buffers.
      params = jax.tree.map(lambda a: a.copy(), current['state'].params['generator'])
      sample, args, _ = fixtures.compile_sample_step(config, params, f.sample_batch)
      result['sample'] = profile_call(sample, args, f.steps, f.out, 'sample_profile', top=f.top)
      print(format_summary(result['sample'], f'sampling step at batch {f.sample_batch}'))
  finally:
    feeder.close()
  print(json.dumps({k: {kk: v[kk] for kk in ('op_ms_per_step', 'wall_ms_per_step', 'by_category_ms')}
                    for k, v in result.items()}))
  return result


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run_from_flags()   # app.run exits with what main returns: None, not the summaries


if __name__ == '__main__':
  define_flags()
  cli.run(main)
