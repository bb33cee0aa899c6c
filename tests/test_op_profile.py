"""The operation profile: HLO parsing, classification and the trace join, on hand-written inputs with
hand-computed answers, and end to end on a real XLA:CPU trace of a function of known structure."""

import json
import os
import sys

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idenc_jax.perf import op_profile as op

HLO = """HloModule jit_train_step, is_scheduled=true, entry_computation_layout={()->f32[]}

%fused_computation.1 (param_0: f32[8,4]) -> f32[8,4] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  ROOT %multiply.1 = f32[8,4]{1,0} multiply(%param_0, %param_0)
}

%fused_computation.2 (param_0.1: f32[8,4]) -> f32[4,8] {
  %param_0.1 = f32[8,4]{1,0} parameter(0)
  ROOT %transpose.3 = f32[4,8]{1,0} transpose(%param_0.1), dimensions={1,0}
}

%fused_computation.4 (param_0.3: u32[8,4]) -> f32[8,4] {
  %param_0.3 = u32[8,4]{1,0} parameter(0)
  ROOT %convert.2 = f32[8,4]{1,0} convert(%param_0.3)
}

%fused_computation.3 (param_0.2: f32[8,4]) -> f32[8] {
  %param_0.2 = f32[8,4]{1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[8]{0} reduce(%param_0.2, %constant.1), dimensions={1}, to_apply=%add
}

ENTRY %main.9 (Arg_0.1: f32[2,8,8,4], Arg_1.2: f32[3,3,4,4]) -> f32[] {
  %Arg_0.1 = f32[2,8,8,4]{3,2,1,0} parameter(0)
  %custom-call.7 = (f32[2,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%Arg_0.1, %Arg_1.2), custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(UNet)/down_0_0/conv_0/conv_general_dilated"}
  %custom-call.8 = (f32[3,3,4,4]{3,2,1,0}, u8[0]{0}) custom-call(%Arg_0.1, %fusion.2), custom_call_target="__cudnn$convBackwardFilter"
  %fusion.1 = f32[8,4]{1,0} fusion(%Arg_0.1), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(train_step)/transpose(jvp(UNet))/down_0_0/jit(silu)/mul"}
  %fusion.2 = f32[4,8]{1,0} fusion(%fusion.1), kind=kLoop, calls=%fused_computation.2
  %fusion.3 = f32[8]{0} fusion(%fusion.1), kind=kInput, calls=%fused_computation.3, metadata={op_name="jit(train_step)/jvp(IdentityEncoder)/trunk/norm_0/reduce_sum"}
  %cublas-gemm.1 = f32[8,8]{1,0} custom-call(%fusion.1, %fusion.1), custom_call_target="__cublas$gemm", metadata={op_name="jit(train_step)/jvp(UNet)/mid_attn/query/dot_general"}
  %copy.4 = f32[8,4]{1,0} copy(%fusion.1), metadata={op_name="jit(train_step)/mul"}
  %fusion.6 = f32[8,4]{1,0} fusion(%copy.4), kind=kLoop, calls=%fused_computation.4
  %fusion.5 = f32[8,4]{1,0} fusion(%fusion.1), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(train_step)/jvp(UNet)/conv_0/conv_general_dilated"}
  %all-reduce.1 = f32[8]{0} all-reduce(%fusion.3), replica_groups={}, to_apply=%add
  ROOT %fmha.1 = f32[] custom-call(%fusion.1), custom_call_target="__cudnn$fmhaSoftmax"
}
"""


def test_parse_hlo_reads_instructions_and_fusion_contents():
  module, ops = op.parse_hlo(HLO)
  assert module == 'jit_train_step'
  conv = ops['custom-call.7']
  assert (conv.opcode, conv.target) == ('custom-call', '__cudnn$convForward')
  assert conv.op_name.endswith('down_0_0/conv_0/conv_general_dilated')
  assert ops['fusion.1'].fusion_kind == 'kLoop' and ops['fusion.1'].called == ('parameter', 'multiply')
  assert ops['fusion.3'].fusion_kind == 'kInput' and 'reduce' in ops['fusion.3'].called
  assert ops['fusion.2'].operands == ('fusion.1',)
  assert ops['custom-call.8'].operands == ('Arg_0.1', 'fusion.2')
  assert 'multiply.1' in ops   # instructions inside fused computations are parsed too


def test_categories_and_parts():
  _, ops = op.parse_hlo(HLO)
  want = {'custom-call.7': 'convolution', 'custom-call.8': 'convolution', 'fusion.1': 'elementwise',
          'fusion.2': 'copy/transpose', 'fusion.3': 'reduction', 'cublas-gemm.1': 'matmul',
          'copy.4': 'copy/transpose', 'all-reduce.1': 'communication', 'fmha.1': 'attention (fused)',
          'fusion.5': 'elementwise',   # a convolution's source path on a loop fusion: still elementwise
          'fusion.6': 'elementwise'}   # a convert is no convolution
  assert {n: op.category(ops[n]) for n in want} == want
  assert op.part(ops['custom-call.7'], ops) == 'UNet forward'
  assert op.part(ops['fusion.1'], ops) == 'UNet backward'
  assert op.part(ops['fusion.3'], ops) == 'IdentityEncoder forward'
  assert op.part(ops['copy.4'], ops) == 'outside the networks'   # optimizer-level source path
  # No metadata: charged through its operands (fusion.2 -> fusion.1, a backward op).
  assert op.part(ops['custom-call.8'], ops) == 'UNet backward'


def _gpu_trace():
  """A GPU-shaped trace: kernels on a stream line, the same ops again on a derived 'XLA Ops' line,
  a host thread that must not count, and an event of another module."""
  meta = [
      {'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
      {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}},
      {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 10, 'args': {'name': 'Stream #7(Compute)'}},
      {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 11, 'args': {'name': 'XLA Ops'}},
  ]
  kernel = lambda name, hlo_op, dur, module='jit_train_step': {
      'ph': 'X', 'pid': 1, 'tid': 10, 'name': name, 'dur': dur,
      'args': {'hlo_op': hlo_op, 'hlo_module': module}}
  xla_op = lambda name, dur: {'ph': 'X', 'pid': 1, 'tid': 11, 'name': name, 'dur': dur}
  events = []
  for _ in range(2):   # two steps
    events += [kernel('sm90_xmma_fprop', 'custom-call.7', 300.0), kernel('loop_multiply_fusion', '%fusion.1', 50.0),
               kernel('reduce_fusion', 'fusion.3,fusion.2', 20.0), kernel('fusion_1', 'fusion.1', 7.0, 'jit_other')]
    events += [xla_op('custom-call.7', 300.0), xla_op('fusion.1', 50.0), xla_op('fusion.3', 20.0)]
    events += [{'ph': 'X', 'pid': 2, 'tid': 3, 'name': 'fusion.1', 'dur': 999.0}]
  return {'traceEvents': meta + events}


def test_gpu_trace_counts_each_kernel_once():
  module, ops = op.parse_hlo(HLO)
  total, count = op.op_times(_gpu_trace(), module, ops)
  assert dict(total) == {'custom-call.7': 600.0, 'fusion.1': 100.0, 'fusion.3': 40.0}
  assert dict(count) == {'custom-call.7': 2, 'fusion.1': 2, 'fusion.3': 2}
  s = op.summarize(_gpu_trace(), HLO, steps=2, wall_s=2 * 400e-6)
  assert s['op_ms_per_step'] == pytest.approx(0.37)
  assert s['by_category_ms']['convolution'] == pytest.approx(0.30)
  assert s['by_category_ms']['elementwise'] == pytest.approx(0.05)
  assert s['by_part_ms']['UNet forward'] == pytest.approx(0.30)
  assert s['uncovered_ms_per_step'] == pytest.approx(0.03)
  assert [o['name'] for o in s['top_ops']] == ['custom-call.7', 'fusion.1', 'fusion.3']
  assert 'convolution' in op.format_summary(s)


def test_stream_kernels_count_without_a_derived_line():
  trace = _gpu_trace()
  trace['traceEvents'] = [e for e in trace['traceEvents'] if e.get('tid') != 11]
  module, ops = op.parse_hlo(HLO)
  total, _ = op.op_times(trace, module, ops)
  assert dict(total) == {'custom-call.7': 600.0, 'fusion.1': 100.0, 'fusion.3': 40.0}


def test_kernels_replayed_from_a_cuda_graph_are_named_by_kernel():
  """XLA:GPU replays fusions from CUDA graphs, whose kernels' hlo_op names the command buffer: the
  join names them by kernel (fusion.3 -> fusion_3), and what matches nothing is reported, not dropped
  (an H200 trace of 2026-12-04 lost half the step's device time this way)."""
  meta = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
          {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 10, 'args': {'name': 'Stream #14(Compute)'}}]
  kernel = lambda name, hlo_op, dur: {'ph': 'X', 'pid': 1, 'tid': 10, 'name': name, 'dur': dur,
                                      'args': {'hlo_op': hlo_op, 'hlo_module': 'jit_train_step'}}
  events = [kernel('sm90_xmma_fprop', 'custom-call.7', 300.0), kernel('fusion_3', 'command_buffer_12', 20.0),
            kernel('fusion_1', 'command_buffer_12', 50.0), kernel('memcpy128', 'command_buffer_12', 5.0),
            kernel('cublas_gemm_1', 'command_buffer_12', 4.0)]
  module, ops = op.parse_hlo(HLO)
  total, count, unmatched = op.device_times({'traceEvents': meta + events}, module, ops)
  assert dict(total) == {'custom-call.7': 300.0, 'fusion.3': 20.0, 'fusion.1': 50.0, 'cublas-gemm.1': 4.0}
  assert unmatched == 5.0
  s = op.summarize({'traceEvents': meta + events}, HLO, steps=1)
  assert s['by_category_ms']['reduction'] == pytest.approx(0.02)
  assert s['by_category_ms']['matmul'] == pytest.approx(0.004)
  assert s['unmatched_device_ms_per_step'] == pytest.approx(0.005)
  assert 'matched no operation' in op.format_summary(s)


def test_empty_profile_is_an_error(tmp_path):
  with pytest.raises(ValueError, match='no operation'):
    op.summarize({'traceEvents': []}, HLO, steps=1)
  with pytest.raises(FileNotFoundError, match='trace'):
    op.read_trace(str(tmp_path))


def test_profile_of_a_real_cpu_step(tmp_path):
  """XLA:CPU end to end: one convolution and its elementwise tail, jitted, profiled for 3 calls."""
  def f(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.tanh(y) * 2.0 + jnp.exp(-y)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 32, 32, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 16, 16)), jnp.float32)
  compiled = jax.jit(f).lower(x, w).compile()
  run = lambda: jax.block_until_ready(compiled(x, w))
  run()
  s = op.profile_compiled(compiled, run, 3, str(tmp_path), 'toy')
  assert s['steps'] == 3 and s['op_ms_per_step'] > 0
  assert s['by_category_ms']['convolution'] > 0
  assert sum(s['by_category_ms'].values()) == pytest.approx(s['op_ms_per_step'])
  convs = [o for o in s['top_ops'] if o['category'] == 'convolution']
  assert convs and convs[0]['calls_per_step'] == 1   # one convolution per call
  with open(os.path.join(tmp_path, 'toy.json')) as fh:
    assert json.load(fh)['module'] == s['module']
  assert not any(name.endswith('.xplane.pb') for _, _, files in os.walk(tmp_path) for name in files)


def test_cli_profiles_train_and_sampling_steps(tmp_path, capsys, monkeypatch):
  argv = ['op_profile', '--config=configs/base.py:tiny,stage0', '--variant=gnfused', '--steps=1',
          '--sample_batch=2', f'--out={tmp_path}', '--fast_compile', '--top=5']
  monkeypatch.setattr(sys, 'argv', argv)   # where ml_collections looks for --config.* overrides
  flag_values = flags.FlagValues()
  op.define_flags(flag_values)
  flag_values(argv)
  result = op.run_from_flags(flag_values)
  out = capsys.readouterr().out
  assert 'train step: operations' in out and 'sampling step at batch 2' in out
  assert json.loads(out.strip().splitlines()[-1]).keys() == {'train', 'sample'}
  train = result['train']
  assert train['by_part_ms'].get('UNet backward', 0) > 0 and train['by_part_ms'].get('UNet forward', 0) > 0
  assert len(train['top_ops']) == 5
  assert set(result['sample']['by_part_ms']) <= {'UNet forward', 'outside the networks'}   # no backward
  assert os.path.exists(os.path.join(tmp_path, 'train_profile.json'))
  assert os.path.exists(os.path.join(tmp_path, 'sample_profile.json'))
