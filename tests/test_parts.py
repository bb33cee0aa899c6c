"""`perf.parts` times the right functions: each part (a network, one residual block) computes what the
PyTorch twin computes, on the input shape that part sees inside its network, and a misspelt part is a one-line
error."""

import json

from absl import flags
import pytest

from idenc_jax.perf import parts, torch_model
from train_testing import tiny_config

torch = pytest.importorskip('torch')


def test_block_input_shapes_follow_the_network():
  config = tiny_config()   # 16 px; generator widths 16, 32; encoder widths 16, 32, 32
  tm = torch_model.build(config)
  enc = parts.block_input_shapes(config, tm, 'encoder', 3)
  assert enc['down_0_0'] == (3, 16, 16, 16)
  assert enc['down_1_0'] == (3, 16, 8, 8)      # after one 2x2 pooling, still the first level's width
  assert enc['down_2_0'] == (3, 32, 4, 4)
  assert enc['mid_0'] == (3, 32, 4, 4)
  gen = parts.block_input_shapes(config, tm, 'generator', 3)
  assert gen['down_0_0'] == (3, 16, 16, 16)
  assert gen['mid_0'] == (3, 32, 8, 8)
  assert gen['up_1_resample'] == (3, 32, 8, 8)  # upsampled inside the block
  assert gen['up_0_0'] == (3, 32 + 16, 16, 16)  # the upsampled map and the skip, concatenated


def test_parts_match_pytorch_and_time_both_sides():
  # Blocks with and without a skip convolution (up_0_0: 48 -> 16 channels), resampling both ways, the
  # generator's with timestep and identity vectors; outputs and input gradients compared before timing.
  names = ['generator', 'encoder', 'generator.up_0_0', 'generator.up_1_resample', 'encoder.down_0_resample',
           'encoder.down_1_0']
  result = parts.bench(tiny_config(), names, rounds=1)
  assert [r['part'] for r in result['parts']] == names
  for r in result['parts']:
    assert r['max_rel_err_vs_torch'] < 1e-5, r
    assert r['jax_ms'] > 0 and r['torch_ms'] > 0
  assert '| generator.up_1_resample |' in parts.format_table(result)


def test_unknown_part_is_a_one_line_error():
  with pytest.raises(ValueError, match=r"unknown part 'encoder.down_9'; choose from generator, encoder, "):
    parts.build_parts(tiny_config(), ['encoder.down_9'])
  with pytest.raises(ValueError, match="unknown part 'unet'"):
    parts.check_part_names(['unet'], {'generator': [], 'encoder': []})


def test_a_part_that_differs_from_pytorch_is_not_timed(monkeypatch):
  monkeypatch.setattr(parts, 'MAX_REL_ERR', 0.0)   # float32 rounding alone now counts as a difference
  with pytest.raises(ValueError, match='part generator: jax and PyTorch differ by .* not the same function'):
    parts.bench(tiny_config(), ['generator'], rounds=1)


def test_cli_prints_the_table_and_the_json(capsys):
  flag_values = flags.FlagValues()
  parts.define_flags(flag_values)
  flag_values(['parts', '--config=configs/base.py:tiny', '--parts=encoder.mid_0', '--rounds=1'])
  result = parts.run_from_flags(flag_values)
  out = capsys.readouterr().out.strip().splitlines()
  assert json.loads(out[-1]) == json.loads(json.dumps(result))
  assert any(line.startswith('| encoder.mid_0 |') for line in out)
  assert result['config'].endswith('configs/base.py:tiny') and result['allocator'] in ('tcmalloc', 'default')
