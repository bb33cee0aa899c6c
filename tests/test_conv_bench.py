"""The convolution micro-benchmark times the right functions: its jax and PyTorch pieces (forward, input
gradient, kernel gradient) against the convolution and its gradients written out in numpy (float64)."""

import json

from absl import flags
import jax.numpy as jnp
import numpy as np
import pytest

from idenc_jax.perf import conv_bench


def numpy_pieces(x, w, dy):
  """3x3, stride 1, zero padding 1: y[b,i,j,o] = sum_{u,v,c} xp[b,i+u,j+v,c] w[u,v,c,o]; dx and dw of
  <y, dy> from the same sum."""
  b, h, _, cin = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = sum(np.einsum('bijc,co->bijo', xp[:, u:u + h, v:v + h], w[u, v]) for u in range(3) for v in range(3))
  dxp = np.zeros_like(xp)
  dw = np.zeros_like(w)
  for u in range(3):
    for v in range(3):
      dxp[:, u:u + h, v:v + h] += np.einsum('bijo,co->bijc', dy, w[u, v])
      dw[u, v] = np.einsum('bijc,bijo->co', xp[:, u:u + h, v:v + h], dy)
  return {'fwd': y, 'dx': dxp[:, 1:-1, 1:-1], 'dw': dw}


def arrays(shape=(2, 5, 3, 4), seed=0):
  b, h, cin, cout = shape
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((b, h, h, cin)), rng.standard_normal((3, 3, cin, cout)),
          rng.standard_normal((b, h, h, cout)))


@pytest.mark.parametrize('options', ['default', 'ynnoff'])
def test_jax_pieces_equal_numpy(options):
  x, w, dy = arrays()
  expected = numpy_pieces(x, w, dy)
  pieces = conv_bench.jax_pieces(*(jnp.asarray(a, jnp.float32) for a in (x, w, dy)),
                                 conv_bench.option_config(options))
  assert sorted(pieces) == sorted(conv_bench.PIECES)
  for name, fn in pieces.items():
    np.testing.assert_allclose(np.asarray(fn()), expected[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_torch_pieces_equal_numpy():
  pytest.importorskip('torch')
  x, w, dy = arrays(seed=1)
  expected = numpy_pieces(x, w, dy)
  for name, fn in conv_bench.torch_pieces(*(a.astype(np.float32) for a in (x, w, dy))).items():
    np.testing.assert_allclose(conv_bench.torch_to_nhwc(name, fn()), expected[name], rtol=1e-4, atol=1e-4,
                               err_msg=name)


def test_bad_shapes_and_option_sets_are_one_line_errors():
  assert conv_bench.parse_shape('4x128x64x32') == (4, 128, 64, 32)
  for bad in ('4x128x64', '4x0x1x1', '4x128xax1'):
    with pytest.raises(ValueError, match='BxHxCinxCout'):
      conv_bench.parse_shape(bad)
  with pytest.raises(ValueError, match="unknown option set 'ynnof'.*ynnoff"):
    conv_bench.option_config('ynnof')
  assert conv_bench.option_config('ynnoff').train.compiler_options == 'xla_cpu_experimental_ynn_fusion_type='


def test_cli_times_every_piece_of_every_side(capsys):
  torch_side = 'torch' if _has_torch() else ''
  flag_values = flags.FlagValues()
  conv_bench.define_flags(flag_values)
  flag_values(['conv_bench', '--shapes=2x4x2x3', '--options=default,ynnoff', '--rounds=2',
               f'--reference={torch_side}'])
  result = conv_bench.run_from_flags(flag_values)
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
  (record,) = result['records']
  sides = ['default', 'ynnoff'] + ([torch_side] if torch_side else [])
  assert sorted(record['ms']) == sorted(f'{s}_{p}' for s in sides for p in conv_bench.PIECES)
  assert all(t > 0 for t in record['ms'].values())
  if torch_side:
    assert record['max_rel_err_vs_torch'] < 1e-4


def _has_torch():
  try:
    import torch  # noqa: F401
    return True
  except ImportError:
    return False
