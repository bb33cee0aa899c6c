"""Every performance lever computes the same function as the plain float32 model.

Model-level: the loss and gradients of a fixed batch (random, non-zero parameters, so every layer
matters) under each lever against the plain float32 XLA model, within the lever's dtype tolerance.
Layer-level: the matmul-gradient convolution, the attention paths and the fused group norm against
numpy float64 formulas (the fused norm's gradient against float64 central differences).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from configs import base
from idenc_jax import cli, models, xla_options
from idenc_jax.models import layers
from idenc_jax.models.ops import attention as attention_ops
from idenc_jax.models.ops import channel_sums as channel_sum_ops
from idenc_jax.models.ops import conv as conv_ops
from idenc_jax.models.ops import group_norm as norm_ops
from idenc_jax.perf import fixtures, levers
from idenc_jax.train import state as state_lib
from idenc_jax.train import step as step_lib

# Tests compile at LLVM -O0: half the compile time; the arithmetic XLA emits is the same.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


# Every lever off: the reference each lever is compared with (the cpu configs default to the fused norm).
PLAIN = {'model.dtype': 'float32', 'model.remat': False, 'model.attention': 'xla', 'model.conv_grad': 'xla',
         'model.group_norm': 'flax', 'model.small_conv': 'xla', 'model.channel_sums': 'reduce',
         'train.compiler_options': ''}   # XLA's own defaults, against which the option levers are compared


def tiny(**overrides):
  return cli.apply_overrides(cli.load_config_file('configs/base.py:tiny'), {**PLAIN, **overrides})


def flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.fixture(scope='module')
def reference():
  loss, metrics, grads = fixtures.fixed_batch_loss_and_grads(tiny(), compiler_options=FAST_COMPILE)
  assert np.isfinite(loss) and metrics['id_kept_fraction'] > 0   # every loss term takes part
  g = flat(grads)
  assert np.linalg.norm(g) > 0
  return loss, g


def _assert_model_close(reference, overrides, tol_loss, tol_grad):
  ref_loss, ref_grads = reference
  loss, _, grads = fixtures.fixed_batch_loss_and_grads(tiny(**overrides), compiler_options=FAST_COMPILE)
  g = flat(grads)
  assert g.shape == ref_grads.shape   # the parameter tree is unchanged
  assert abs(loss - ref_loss) <= tol_loss * abs(ref_loss), (loss, ref_loss)
  assert np.linalg.norm(g - ref_grads) <= tol_grad * np.linalg.norm(ref_grads)


def test_float32_levers_keep_the_model_loss_and_gradients(reference):
  """remat + fused attention + matmul kernel gradients + fused group norm + matmul channel sums + matmul
  small-map convolutions (the tiny encoder's 4x4 level): the same float32 function, up to the order of
  summation (each lever alone is checked per block below; one compile here keeps the suite fast)."""
  _assert_model_close(reference, {'model.remat': True, 'model.attention': 'fused',
                                  'model.conv_grad': 'matmul', 'model.group_norm': 'fused',
                                  'model.channel_sums': 'matmul', 'model.small_conv': 'matmul'}, 1e-5, 1e-4)


def test_bfloat16_keeps_the_model_loss_and_gradients(reference):
  """bf16 compute with float32 parameters and norm statistics: within bf16 rounding."""
  _assert_model_close(reference, {'model.dtype': 'bfloat16'}, 2e-2, 5e-2)


def _block_output_and_grads(module, params, *inputs):
  """The block's output, and the gradients (parameters, input) of sum(sin(output)), jitted."""
  def loss(p, x):
    y = module.apply(p, x, *inputs[1:]).astype(jnp.float32)
    return jnp.sum(jnp.sin(y)), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, inputs[0])
  return np.asarray(y, np.float64), flat(grads)


def _block_inputs(kind, size=8):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, size, size, 16)), jnp.float32)
  if kind == 'res':
    return x, jnp.asarray(rng.standard_normal((2, 32)), jnp.float32), jnp.asarray(
        rng.standard_normal((2, 8)), jnp.float32)
  return (x,)


def _block(kind, **levers):
  if kind == 'res':
    cls = layers.block_cls(layers.ResBlock, levers.pop('remat', False))
    return cls(24, num_groups=4, dtype=levers.pop('dtype', jnp.float32), conv_grad=levers.pop('conv_grad', 'xla'),
               group_norm=levers.pop('group_norm', 'flax'), small_conv=levers.pop('small_conv', 'xla'),
               channel_sums=levers.pop('channel_sums', 'reduce'))
  cls = layers.block_cls(layers.AttentionBlock, levers.pop('remat', False))
  return cls(num_heads=2, attention=levers.pop('attention', 'xla'), dtype=levers.pop('dtype', jnp.float32))


@pytest.mark.parametrize('kind, levers, tol, size', [
    ('res', {'remat': True}, 1e-5, 8),
    ('attn', {'remat': True}, 1e-5, 8),
    ('attn', {'attention': 'fused'}, 1e-5, 8),
    ('res', {'conv_grad': 'matmul'}, 1e-5, 8),
    ('res', {'group_norm': 'fused'}, 1e-5, 8),
    ('res', {'channel_sums': 'matmul'}, 1e-5, 8),
    ('res', {'channel_sums': 'matmul', 'group_norm': 'fused'}, 1e-5, 8),
    ('res', {'small_conv': 'matmul'}, 1e-5, 4),
    ('res', {'dtype': jnp.bfloat16}, 3e-2, 8),
    ('res', {'dtype': jnp.bfloat16, 'group_norm': 'fused'}, 3e-2, 8),
    ('res', {'dtype': jnp.bfloat16, 'group_norm': 'fused', 'channel_sums': 'matmul', 'small_conv': 'matmul'},
     3e-2, 4),
    ('attn', {'dtype': jnp.bfloat16}, 3e-2, 8),
], ids=['remat_res', 'remat_attn', 'fused_attn', 'matmul_grad_res', 'fused_norm_res', 'matmul_sums_res',
        'matmul_sums_fused_norm_res', 'matmul_small_conv_res', 'bf16_res', 'bf16_fused_norm_res',
        'bf16_cpu_forms_res', 'bf16_attn'])
def test_each_lever_keeps_a_block(kind, levers, tol, size):
  """Per lever and block: same parameters; output and all gradients against the plain float32 block."""
  inputs = _block_inputs(kind, size)
  plain = _block(kind)
  shapes = jax.eval_shape(plain.init, jax.random.key(0), *inputs)
  # Random non-zero parameters everywhere (a fresh block's zero output layers would hide the branch).
  params = fixtures.random_params(shapes, seed=3)
  lever = _block(kind, **levers)
  assert jax.eval_shape(lever.init, jax.random.key(0), *inputs) == shapes
  y0, g0 = _block_output_and_grads(plain, params, *inputs)
  y1, g1 = _block_output_and_grads(lever, params, *inputs)
  assert np.linalg.norm(y1 - y0) <= tol * np.linalg.norm(y0)
  assert np.linalg.norm(g1 - g0) <= tol * np.linalg.norm(g0)


def test_levers_keep_the_parameter_tree():
  shapes = lambda c: jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(
      lambda k: state_lib.init_params(c, k), jax.random.key(0)))
  all_levers = tiny(**{'model.remat': True, 'model.attention': 'fused', 'model.conv_grad': 'matmul',
                       'model.group_norm': 'fused', 'model.dtype': 'bfloat16'})
  assert shapes(all_levers) == shapes(tiny())   # float32 parameters whatever the compute dtype


def _numpy_same_conv(x, w):
  """float64 'same' stride-1 convolution, NHWC x HWIO, by explicit shifted sums."""
  kh, kw = w.shape[:2]
  b, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (kh // 2,) * 2, (kw // 2,) * 2, (0, 0)))
  return sum(np.einsum('bhwi,io->bhwo', xp[:, i:i + h, j:j + wd], w[i, j]) for i in range(kh) for j in range(kw))


@pytest.mark.parametrize('kernel', [3, 1])
def test_matmul_grad_conv_matches_numpy(kernel):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 5, 4))
  w = rng.standard_normal((kernel, kernel, 4, 3))
  dy = rng.standard_normal((2, 6, 5, 3))
  y, vjp = jax.vjp(conv_ops.same_conv_matmul_grad, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  dx, dw = vjp(jnp.asarray(dy, jnp.float32))
  np.testing.assert_allclose(y, _numpy_same_conv(x, w), rtol=1e-5, atol=1e-5)
  # d<dy, conv(x, w)>/dw[i, j] = sum over pixels of shifted x times dy; d/dx by the adjoint identity.
  xp = np.pad(x, ((0, 0), (kernel // 2,) * 2, (kernel // 2,) * 2, (0, 0)))
  dw_ref = np.stack([np.stack([np.einsum('bhwi,bhwo->io', xp[:, i:i + 6, j:j + 5], dy) for j in range(kernel)])
                     for i in range(kernel)])
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
  probe = rng.standard_normal(x.shape)
  np.testing.assert_allclose(np.sum(np.asarray(dx) * probe), np.sum(_numpy_same_conv(probe, w) * dy), rtol=1e-5)


def test_matmul_grad_conv_falls_back_outside_its_case():
  x = jnp.ones((1, 6, 6, 2))
  w = jnp.ones((3, 3, 2, 2))
  impl = conv_ops.conv_impl('matmul')['conv_general_dilated']
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
  strided = impl(x, w, (2, 2), [(1, 1), (1, 1)], dimension_numbers=dn)
  np.testing.assert_allclose(strided, jax.lax.conv_general_dilated(x, w, (2, 2), [(1, 1), (1, 1)],
                                                                   dimension_numbers=dn))
  with pytest.raises(ValueError, match='conv_grad'):
    conv_ops.conv_impl('cudnn')


@pytest.mark.parametrize('size,c_out,matmul', [(16, 32, True), (8, 32, False), (16, 16, False)])
def test_matmul_wide_takes_the_matmul_form_only_for_wide_convolutions(size, c_out, matmul):
  """'matmul_wide': the custom gradient exactly where the rule says (>= 32 outputs, maps >= 16), XLA's
  elsewhere, and the kernel gradient equal to numpy's either way."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, size, size, 4)).astype(np.float32)
  w = (0.1 * rng.standard_normal((3, 3, 4, c_out))).astype(np.float32)
  dy = rng.standard_normal((2, size, size, c_out)).astype(np.float32)
  impl = conv_ops.conv_impl('matmul_wide')['conv_general_dilated']
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
  conv = lambda w_: impl(jnp.asarray(x), w_, (1, 1), [(1, 1), (1, 1)], dimension_numbers=dn)
  assert ('custom_vjp_call' in str(jax.make_jaxpr(conv)(w))) == matmul
  dw = jax.vjp(conv, jnp.asarray(w))[1](jnp.asarray(dy))[0]
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
  dw_ref = np.stack([np.stack([np.einsum('bhwi,bhwo->io', xp[:, i:i + size, j:j + size], dy) for j in range(3)])
                     for i in range(3)])
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4)


def _numpy_attention(q, k, v):
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', p, v)


@pytest.mark.parametrize('impl', ['xla', 'fused'])
def test_attention_matches_numpy(impl):
  rng = np.random.default_rng(1)
  q, k, v = (rng.standard_normal((2, 16, 2, 8)) for _ in range(3))
  out = attention_ops.dot_product_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), impl)
  np.testing.assert_allclose(out, _numpy_attention(q, k, v), rtol=1e-5, atol=1e-5)
  out16 = attention_ops.dot_product_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), impl)
  np.testing.assert_allclose(np.asarray(out16, np.float32), _numpy_attention(q, k, v), rtol=0, atol=5e-2)


def test_fused_attention_picks_cudnn_only_where_it_exists(monkeypatch):
  assert attention_ops.fused_attention_backend(jnp.bfloat16, 64) is None   # this machine is a CPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert attention_ops.fused_attention_backend(jnp.bfloat16, 64) == 'cudnn'
  assert attention_ops.fused_attention_backend(jnp.float16, 128) == 'cudnn'
  assert attention_ops.fused_attention_backend(jnp.float32, 64) is None    # cuDNN's kernel is 16-bit only
  assert attention_ops.fused_attention_backend(jnp.bfloat16, 160) is None  # head_dim over its limit
  assert attention_ops.fused_attention_backend(jnp.bfloat16, 36) is None   # not a multiple of 8


def test_prefetch_feeds_the_same_batches_in_order():
  """data.prefetch changes when batches reach the device, never which batch a step gets."""
  host = [{'a': np.full((2, 3), i, np.uint8)} for i in range(3)]
  for depth in (0, 2):
    feeder = fixtures.Feeder(host, depth)
    try:
      got = [int(np.asarray(feeder.next()['a'])[0, 0]) for _ in range(5)]
    finally:
      feeder.close()
    assert got == [0, 1, 2, 0, 1], depth
    with pytest.raises(RuntimeError, match='closed'):   # an error, not a wait that never ends
      feeder.next()


@pytest.mark.parametrize('group_norm', ['flax', 'fused'])
def test_generator_is_nhwc_throughout(group_norm):
  """NHWC end to end: XLA inserts no layout transposes around the convolutions and norms of the
  compiled forward pass; the only transposes are attention's heads-first products at low resolution."""
  config = tiny(**{'model.group_norm': group_norm})
  gen = models.build_generator(config)
  x, t, z = jnp.zeros((4, 16, 16, 3)), jnp.zeros((4,), jnp.int32), jnp.zeros((4, config.model.embed_dim))
  params = jax.eval_shape(gen.init, jax.random.key(0), x, t, z)
  hlo = jax.jit(lambda p, x, t, z: gen.apply(p, x, t, z)).lower(params, x, t, z).compile(FAST_COMPILE).as_text()
  transposes = [line for line in hlo.splitlines() if re.search(r'= \S+ transpose\(', line)]
  assert transposes   # the scan below sees the attention ones
  outside_attention = [line for line in transposes if not re.search(r'op_name="[^"]*_attn/', line)]
  assert not outside_attention, outside_attention[:3]


def test_matmul_grad_lever_reaches_every_convolution():
  """model.conv_grad='matmul' routes the 3x3 and 1x1 convolutions of a block through the custom
  gradient (3 here: conv_0, conv_1 and the 1x1 skip), not silently back to lax."""
  inputs = _block_inputs('res')
  block = _block('res', conv_grad='matmul')
  params = fixtures.random_params(jax.eval_shape(block.init, jax.random.key(0), *inputs))
  jaxpr = str(jax.make_jaxpr(lambda p: block.apply(p, *inputs))(params))
  assert jaxpr.count('custom_vjp_call') == 3, jaxpr.count('custom_vjp_call')
  assert 'custom_vjp_call' not in str(jax.make_jaxpr(lambda p: _block('res').apply(p, *inputs))(params))


def test_matmul_sums_reach_every_convolution_bias():
  """model.channel_sums='matmul' routes the bias gradient of conv_0, conv_1 and the 1x1 skip through the
  matmul sum (3 custom gradients with the plain norm), and the default adds biases as nn.Conv does."""
  inputs = _block_inputs('res')
  block = _block('res', channel_sums='matmul')
  params = fixtures.random_params(jax.eval_shape(block.init, jax.random.key(0), *inputs))
  assert str(jax.make_jaxpr(lambda p: block.apply(p, *inputs))(params)).count('custom_vjp_call') == 3


# ---- Per-channel sums, the Conv module and small-map convolutions against numpy. ---------------------
@pytest.mark.parametrize('impl', channel_sum_ops.IMPLS)
def test_channel_sums_match_numpy(impl):
  rng = np.random.default_rng(5)
  v = rng.standard_normal((3, 5, 4, 7))
  got = channel_sum_ops.map_sums(jnp.asarray(v, jnp.float32), impl)
  np.testing.assert_allclose(np.asarray(got, np.float64), v.sum(axis=(1, 2)), rtol=1e-5, atol=1e-5)
  got = channel_sum_ops.all_sums(jnp.asarray(v, jnp.float32), impl)
  np.testing.assert_allclose(np.asarray(got, np.float64), v.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
  got16 = channel_sum_ops.map_sums(jnp.asarray(v, jnp.bfloat16), impl)
  assert got16.dtype == jnp.bfloat16   # summed in float32, returned in the input's dtype
  np.testing.assert_allclose(np.asarray(got16, np.float64), v.sum(axis=(1, 2)), rtol=2e-2, atol=5e-2)
  # The bias add: y + b, its gradients the cotangent (y) and the cotangent's per-channel sums (b).
  y, b, cot = v, rng.standard_normal(7), rng.standard_normal(v.shape)
  out, vjp = jax.vjp(lambda y, b: channel_sum_ops.add_channel_bias(y, b, impl),
                     jnp.asarray(y, jnp.float32), jnp.asarray(b, jnp.float32))
  np.testing.assert_allclose(np.asarray(out, np.float64), y + b, rtol=1e-6, atol=1e-6)
  dy, db = vjp(jnp.asarray(cot, jnp.float32))
  np.testing.assert_allclose(np.asarray(dy, np.float64), cot, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(db, np.float64), cot.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)


def test_matmul_sums_are_matmuls_and_unknown_forms_are_refused():
  v = jnp.ones((2, 3, 3, 4))
  jaxpr = str(jax.make_jaxpr(lambda v: channel_sum_ops.map_sums(v, 'matmul'))(v))
  assert 'dot_general' in jaxpr and 'reduce_sum' not in jaxpr
  assert 'reduce_sum' in str(jax.make_jaxpr(lambda v: channel_sum_ops.map_sums(v, 'reduce'))(v))
  with pytest.raises(ValueError, match='model.channel_sums'):
    channel_sum_ops.map_sums(v, 'einsum')
  with pytest.raises(ValueError, match='model.small_conv'):
    conv_ops.Conv(4, small_conv='im2col').init(jax.random.key(0), v)


@pytest.mark.parametrize('kernel', [3, 1])
def test_conv_module_is_nn_conv_by_default(kernel):
  """With its levers at XLA's forms the Conv module is nn.Conv: the same parameters from the same key, and
  bit-identical outputs and gradients (so configs that keep the defaults keep their trajectories)."""
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 6, 6, 5)), jnp.float32)
  ours = conv_ops.Conv(8, kernel)
  theirs = nn.Conv(8, (kernel, kernel), padding=1 if kernel == 3 else 'SAME')
  params = ours.init(jax.random.key(3), x)
  assert jax.tree.all(jax.tree.map(np.array_equal, params, theirs.init(jax.random.key(3), x)))
  params = fixtures.random_params(jax.eval_shape(ours.init, jax.random.key(0), x), seed=4)
  value_and_grads = lambda m: jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))),
                                                           argnums=(0, 1)))(params, x)
  (ours_value, ours_grads), (nn_value, nn_grads) = value_and_grads(ours), value_and_grads(theirs)
  assert np.array_equal(ours_value, nn_value)
  assert jax.tree.all(jax.tree.map(np.array_equal, ours_grads, nn_grads))


def test_im2col_conv_matches_numpy():
  """The small-map convolution and its two gradients against the shifted sums written out in numpy."""
  rng = np.random.default_rng(7)
  x, w = rng.standard_normal((2, 3, 3, 5)), rng.standard_normal((3, 3, 5, 4))
  cot = rng.standard_normal((2, 3, 3, 4))
  out, vjp = jax.vjp(conv_ops.im2col_conv, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(np.asarray(out, np.float64), _numpy_same_conv(x, w), rtol=1e-5, atol=1e-5)
  dx, dw = vjp(jnp.asarray(cot, jnp.float32))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  want_dw = np.stack([np.einsum('bhwi,bhwo->io', xp[:, i:i + 3, j:j + 3], cot) for i in range(3) for j in range(3)])
  dxp = np.zeros_like(xp)
  for i in range(3):
    for j in range(3):
      dxp[:, i:i + 3, j:j + 3] += np.einsum('bhwo,io->bhwi', cot, w[i, j])
  np.testing.assert_allclose(np.asarray(dw, np.float64), want_dw.reshape(w.shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx, np.float64), dxp[:, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size, small_conv, im2col', [(4, 'matmul', True), (8, 'matmul', False), (4, 'xla', False)])
def test_small_conv_takes_the_matmul_form_only_on_small_maps(size, small_conv, im2col):
  x = jnp.zeros((1, size, size, 3))
  conv = conv_ops.Conv(4, small_conv=small_conv)
  params = conv.init(jax.random.key(0), x)
  assert ('conv_general_dilated' not in str(jax.make_jaxpr(conv.apply)(params, x))) == im2col


def test_auto_takes_the_cpu_forms_on_a_cpu_only(monkeypatch):
  """The paper configs' 'auto' norm and small convolutions: the fast forms on a CPU, XLA's own on an
  accelerator; their sums are XLA's reductions everywhere (YNNPACK takes them on a CPU), and 'auto' sums are
  the matmul form on a CPU only. The cpu configs name XLA's own convolutions (their figures were measured so)."""
  paper = cli.load_config_file('configs/base.py').model
  cpu = cli.load_config_file('configs/base.py:cpu').model
  cpu_forms = {'conv_grad': 'xla', 'group_norm': 'fused', 'small_conv': 'matmul', 'channel_sums': 'reduce'}
  xla_forms = {'conv_grad': 'xla', 'group_norm': 'flax', 'small_conv': 'xla', 'channel_sums': 'reduce'}
  assert jax.default_backend() == 'cpu'
  assert models.op_choices(paper) == cpu_forms
  assert models.op_choices(cpu) == {**xla_forms, 'group_norm': 'fused'}
  paper.channel_sums = 'auto'
  assert models.op_choices(paper)['channel_sums'] == 'matmul'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert models.op_choices(paper) == xla_forms
  assert models.build_generator(cli.load_config_file('configs/base.py')).channel_sums == 'reduce'


# ---- The fused group norm against float64 numpy. ----------------------------------------------------
def _numpy_norm_silu(x, scale, bias, mult, add, groups, eps=1e-5):
  """float64 silu((GroupNorm(x) * scale + bias) * mult + add), the two-pass variance."""
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  y = ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias
  y = y * mult[:, None, None, :] + add[:, None, None, :]
  return y / (1 + np.exp(-y))


def _norm_inputs(seed=0, shape=(2, 3, 2, 6), groups=3):
  rng = np.random.default_rng(seed)
  b, c = shape[0], shape[-1]
  return (rng.standard_normal(shape) * 1.5 + 0.7, 1 + 0.3 * rng.standard_normal(c),
          0.3 * rng.standard_normal(c), 1 + 0.3 * rng.standard_normal((b, c)),
          0.3 * rng.standard_normal((b, c))), groups


def test_fused_group_norm_matches_numpy():
  args, groups = _norm_inputs(shape=(3, 5, 4, 12), groups=4)
  want = _numpy_norm_silu(*args, groups)
  got = norm_ops.fused_group_norm_silu(*[jnp.asarray(a, jnp.float32) for a in args], groups)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-6, rtol=1e-5)
  got16 = norm_ops.fused_group_norm_silu(jnp.asarray(args[0], jnp.bfloat16),
                                       *[jnp.asarray(a, jnp.float32) for a in args[1:]], groups)
  assert got16.dtype == jnp.bfloat16   # the compute dtype in, the compute dtype out
  np.testing.assert_allclose(np.asarray(got16, np.float64), want, atol=5e-2, rtol=2e-2)
  # Differentiated (training) it computes its coefficients another way (for its VJP's residuals): the same
  # values to float32 rounding.
  trained, _ = jax.vjp(lambda x: norm_ops.fused_group_norm_silu(x, *[jnp.asarray(a, jnp.float32) for a in args[1:]],
                                                                groups), jnp.asarray(args[0], jnp.float32))
  np.testing.assert_allclose(np.asarray(trained, np.float64), want, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(trained, got, atol=1e-6, rtol=1e-6)


def test_fused_group_norm_gradient_matches_finite_differences():
  """Its own VJP (input, scale, bias, mult, add) against float64 central differences of the numpy form."""
  args, groups = _norm_inputs(seed=1)
  cotangent = np.random.default_rng(2).standard_normal(args[0].shape)
  objective = lambda *a: float(np.sum(_numpy_norm_silu(*a, groups) * cotangent))
  grads = jax.grad(lambda *a: jnp.sum(norm_ops.fused_group_norm_silu(*a, groups) * cotangent),
                   argnums=(0, 1, 2, 3, 4))(*[jnp.asarray(a, jnp.float32) for a in args])
  eps = 1e-6
  for index, (arg, grad) in enumerate(zip(args, grads)):
    numeric = np.zeros_like(arg)
    for i in np.ndindex(arg.shape):
      up, down = [list(args) for _ in range(2)]
      up[index], down[index] = arg.copy(), arg.copy()
      up[index][i] += eps
      down[index][i] -= eps
      numeric[i] = (objective(*up) - objective(*down)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad, np.float64), numeric, atol=2e-4, rtol=1e-3,
                               err_msg=f'argument {index}')


def test_fused_group_norm_rejects_bad_groups_and_names():
  with pytest.raises(ValueError, match='groups'):
    norm_ops.FusedGroupNormSiLU(5).init(jax.random.key(0), jnp.zeros((1, 2, 2, 12)))
  with pytest.raises(ValueError, match='group_norm'):
    norm_ops.norm_silu('apex', 4, jnp.float32, 'norm')


# XLA:CPU's library fusions (train.compiler_options): convolutions through YNNPACK, XNNPACK or oneDNN, or no
# YNNPACK at all (ynnoff).
LIBRARY_CONVOLUTIONS = {lib: levers.LEVERS[f'{lib}conv']['train.compiler_options'] for lib in ('ynn', 'xnn', 'onednn')}
LIBRARY_CONVOLUTIONS['off'] = levers.LEVERS['ynnoff']['train.compiler_options']


@pytest.mark.parametrize('library', sorted(LIBRARY_CONVOLUTIONS))
def test_library_convolutions_keep_the_model_loss_and_gradients(reference, library):
  """The same float32 function: loss within 1e-4, gradients within 1e-3 of the plain model's (relative)."""
  _assert_model_close(reference, {'train.compiler_options': LIBRARY_CONVOLUTIONS[library]}, 1e-4, 1e-3)


def _same_conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _kernel_grad(x, w, dy):
  return jax.vjp(lambda w: _same_conv(x, w), w)[1](dy)[0]


def _conv_operands(rng):
  """x, w, dy of a 3x3 convolution at 32 channels, the width from which jax 0.10's XLA:CPU hands
  convolutions to YNNPACK by default."""
  return (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 8, 8, 32), (3, 3, 32, 32), (2, 8, 8, 32)))


def test_ynnoff_compiles_every_convolution_without_ynnpack():
  # The kernel gradient is the convolution XLA:CPU's default hands to YNNPACK (docs/performance.md); with
  # jax 0.10 it does so from 32 channels up, so the default's HLO shows the fusion this option removes.
  x, w, dy = _conv_operands(np.random.default_rng(0))
  kernel_grad = jax.jit(_kernel_grad)
  config = tiny(**{'train.compiler_options': LIBRARY_CONVOLUTIONS['off']})
  assert step_lib.compiler_options(config) == {'xla_cpu_experimental_ynn_fusion_type': ''}
  compiled = step_lib.compile_with_options(kernel_grad.lower(x, w, dy), config)
  assert 'ynn_fusion' not in compiled.as_text()
  default_uses_ynnpack = 'ynn_fusion' in kernel_grad.lower(x, w, dy).compile().as_text()
  assert default_uses_ynnpack or jax.__version_info__ >= (0, 11), 'the default no longer uses YNNPACK here'
  # Against the sum it computes, in numpy: dw[i, j, c, o] = sum over b, y, x of xpad[b, y+i, x+j, c] dy[b, y, x, o].
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  expected = np.stack([np.stack([np.einsum('byxc,byxo->co', xp[:, i:i + 8, j:j + 8], np.asarray(dy, np.float64))
                                 for j in range(3)]) for i in range(3)])
  np.testing.assert_allclose(compiled(x, w, dy), expected, rtol=1e-5, atol=1e-5)


def test_ynnnoconv_keeps_ynnpack_for_dots_and_reductions_and_leaves_convolutions_to_xla():
  rng = np.random.default_rng(0)
  x, w, dy = _conv_operands(rng)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((64, 32), (32, 32)))
  programs = {'kernel gradient': (_kernel_grad, (x, w, dy)), 'forward convolution': (_same_conv, (x, w)),
              'column sum': (lambda x: jnp.sum(x * x, axis=(0, 1, 2)), (x,)), 'matmul': (lambda a, b: a @ b, (a, b))}
  compiled = {}
  for lever, ynn_takes in (('ynnnoconv', {'column sum', 'matmul'}), ('ynnreduce', {'column sum'}),
                           ('ynnon', set(programs))):
    config = tiny(**levers.LEVERS[lever])
    for name, (fn, args) in programs.items():
      compiled[lever, name] = step_lib.compile_with_options(jax.jit(fn).lower(*args), config)
      text = compiled[lever, name].as_text()
      if lever == 'ynnon' and 'ynn_fusion' not in text:
        assert jax.__version_info__ >= (0, 11), f'the default no longer hands the {name} to YNNPACK'
        continue
      assert ('ynn_fusion' in text) == (name in ynn_takes), (lever, name)
  # What YNNPACK computes there, against numpy.
  x64, a64, b64 = (np.asarray(v, np.float64) for v in (x, a, b))
  np.testing.assert_allclose(compiled['ynnnoconv', 'column sum'](x), (x64 ** 2).sum(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(compiled['ynnnoconv', 'matmul'](a, b), a64 @ b64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('lever', ['ynnnoconv', 'ynnreduce'])
def test_ynnpack_subsets_keep_the_model_loss_and_gradients(reference, lever):
  _assert_model_close(reference, levers.LEVERS[lever], 1e-4, 1e-3)


def test_paper_and_cpu_configs_keep_ynnpack_for_reductions_only():
  paper, cpu = (cli.load_config_file(f'configs/base.py:{v}') for v in ('paper', 'cpu'))
  want = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE',
          'xla_cpu_copy_insertion_use_region_analysis': True}
  assert step_lib.compiler_options(paper) == want
  assert step_lib.compiler_options(cpu) == want
  # The levers set the whole option text: YNNPACK's settings alone, as they were measured.
  assert step_lib.compiler_options(levers.variant_config(paper, 'ynnreduce')) == {
      'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}
  off = {'xla_cpu_experimental_ynn_fusion_type': ''}
  assert step_lib.compiler_options(levers.variant_config(paper, 'ynnoff')) == off
  assert step_lib.compiler_options(levers.variant_config(cpu, 'ynnon')) is None
  assert step_lib.compiler_options(levers.variant_config(paper, 'ynnon')) is None
  assert step_lib.compiler_options(levers.variant_config(cpu, 'ynnoff')) == off
  # An XLA:CPU option is left out where the step compiles for a GPU or TPU (and a GPU option on a CPU).
  assert step_lib.compiler_options(paper, platform='gpu') is None
  assert step_lib.compiler_options(paper, platform='tpu') is None
  both = tiny(**{'train.compiler_options':
                     'xla_cpu_enable_fast_math=false;xla_gpu_enable_latency_hiding_scheduler=true'})
  assert step_lib.compiler_options(both, platform='gpu') == {'xla_gpu_enable_latency_hiding_scheduler': True}
  assert step_lib.compiler_options(both) == {'xla_cpu_enable_fast_math': False}     # here: the CPU


def test_copy_insertion_region_analysis_drops_the_state_copies_and_changes_no_value():
  """The configs' xla_cpu_copy_insertion_use_region_analysis: without it XLA:CPU copies each donated
  parameter and Adam moment before the in-place update; with it, none, and three train steps from the same
  state end in the same state, bit for bit."""
  config = cli.load_config_file('configs/base.py:tiny')
  assert base.NO_STATE_COPIES in config.train.compiler_options
  without = cli.apply_overrides(config, {
      'train.compiler_options': config.train.compiler_options.replace(base.NO_STATE_COPIES, '')})
  states = {}
  for name, c in (('with', config), ('without', without)):
    state, optimizer = fixtures.build_state(c)
    batches = [fixtures.synthetic_batch(c, seed) for seed in range(3)]
    lowered = jax.jit(step_lib.make_train_step(c, optimizer), donate_argnums=(0,)).lower(state, batches[0])
    compiled = step_lib.compile_with_options(lowered, c, FAST_COMPILE)
    copies = compiled.as_text().count(' copy(%state_params')
    assert (copies == 0) if name == 'with' else (copies > 0 or jax.__version_info__ >= (0, 11)), (name, copies)
    for batch in batches:
      state, metrics = compiled(state, batch)
    assert float(metrics['finite']) == 1.0
    states[name] = jax.device_get(state)
  for a, b in zip(jax.tree.leaves(states['with']), jax.tree.leaves(states['without'])):
    np.testing.assert_array_equal(a, b)
  assert xla_options.same_values(config.train.compiler_options, without.train.compiler_options, 'f')
  assert not xla_options.same_values(config.train.compiler_options, 'xla_cpu_experimental_ynn_fusion_type=', 'f')


def test_compiler_options_parse_and_reject_malformed_entries():
  c = tiny(**{'train.compiler_options': 'a=true; b=3;c=LIBRARY_X ;d=0.5'})
  assert step_lib.compiler_options(c) == {'a': True, 'b': 3, 'c': 'LIBRARY_X', 'd': 0.5}
  assert step_lib.compiler_options(c, {'a': False, 'e': 1}) == {'a': False, 'b': 3, 'c': 'LIBRARY_X', 'd': 0.5, 'e': 1}
  none = tiny(**{'train.compiler_options': ''})
  assert step_lib.compiler_options(none) is None and step_lib.compiler_options(none, {}) is None
  with pytest.raises(ValueError, match='is not name=value'):
    step_lib.compiler_options(tiny(**{'train.compiler_options': 'xla_cpu_use_onednn'}))


def test_an_option_xla_rejects_is_one_clear_error():
  lowered = jax.jit(lambda x: x + 1).lower(jnp.ones(3))
  for options, said in (('xla_cpu_no_such_option=true', 'No such compile option'),
                        ('xla_cpu_enable_fast_math=maybe', 'not a valid bool')):
    with pytest.raises(ValueError, match=f'config.train.compiler_options.*XLA says.*{said}'):
      step_lib.compile_with_options(lowered, tiny(**{'train.compiler_options': options}))
  assert step_lib.compile_with_options(lowered, tiny())(jnp.ones(3)).tolist() == [2.0, 2.0, 2.0]
