"""Convolutions of the models: `Conv` (nn.Conv's parameters and function) and its levers, `model.conv_grad=
'matmul'` / `'matmul_wide'` (kernel gradients as one matmul per tap, everywhere / only where that beat XLA:CPU's
own) and `model.small_conv='matmul'` (convolutions of the smallest maps as one matmul)."""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from idenc_jax.models.ops.channel_sums import add_channel_bias

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _same_conv(x, w):
  """Stride-1 convolution of NHWC x with an odd HWIO kernel, zero 'same' padding."""
  return lax.conv_general_dilated(x, w, (1, 1), [(w.shape[0] // 2,) * 2, (w.shape[1] // 2,) * 2],
                                  dimension_numbers=_NHWC)


@jax.custom_vjp
def same_conv_matmul_grad(x: jax.Array, w: jax.Array) -> jax.Array:
  """`_same_conv` whose kernel gradient is one plain matmul per kernel tap.

  XLA:CPU runs the kernel-gradient convolution XLA derives (batch as the feature dimension, the
  image as the window) at a quarter of its forward-convolution speed; the same sum written as
  kh*kw matmuls [C_in, B*H*W] @ [B*H*W, C_out] over shifted views of the padded input runs near
  matmul speed. The input gradient stays a forward convolution with the flipped kernel.
  """
  return _same_conv(x, w)


def _matmul_grad_fwd(x, w):
  return _same_conv(x, w), (x, w)


def _matmul_grad_bwd(res, dy):
  x, w = res
  kh, kw, c_in, c_out = w.shape
  b, h, wd, _ = x.shape
  dx = _same_conv(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3))
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  dy2 = dy.reshape(b * h * wd, c_out)
  taps = [lax.dot_general(xp[:, i:i + h, j:j + wd].reshape(b * h * wd, c_in), dy2, (((0,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
          for i in range(kh) for j in range(kw)]
  dw = jnp.stack(taps).reshape(kh, kw, c_in, c_out)
  return dx.astype(x.dtype), dw.astype(w.dtype)


same_conv_matmul_grad.defvjp(_matmul_grad_fwd, _matmul_grad_bwd)


# 'matmul_wide' takes the matmul form only for convolutions this wide and this large: on XLA:CPU (2-core AMD
# EPYC, jax 0.10.2) it beat XLA's own kernel gradient there (8.8 -> 4.6 ms at 32x32, 32 -> 32 channels, batch
# 16) and lost or tied below (16 output channels, or 8x8 and smaller maps). On the whole `cpu` train step it
# measured 1.01x, inside the noise (docs/performance.md), so no config turns it on.
WIDE_MIN_OUT_CHANNELS = 32
WIDE_MIN_SIZE = 16


def _conv_with_matmul_grad(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                           dimension_numbers=None, feature_group_count=1, *, wide_only=False, **kwargs):
  """A drop-in `lax.conv_general_dilated` for nn.Conv: the matmul-gradient path where it applies
  (stride 1, no dilation, one group, NHWC/HWIO, odd kernel, 'same' padding; with wide_only, also at least
  WIDE_MIN_OUT_CHANNELS outputs on a map of at least WIDE_MIN_SIZE), lax otherwise."""
  kh, kw = rhs.shape[:2]
  same = [(kh // 2, kh // 2), (kw // 2, kw // 2)]
  pads = padding if isinstance(padding, str) else [tuple(p) for p in padding]
  applies = (
      tuple(window_strides) == (1, 1) and all(d in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))
      and feature_group_count == 1 and kh % 2 == 1 and kw % 2 == 1 and pads in ('SAME', same)
      and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
      and kwargs.get('precision') is None and kwargs.get('preferred_element_type') is None)
  if wide_only:
    applies = applies and rhs.shape[3] >= WIDE_MIN_OUT_CHANNELS and min(lhs.shape[1:3]) >= WIDE_MIN_SIZE
  if not applies:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, **kwargs)
  return same_conv_matmul_grad(lhs, rhs)


def conv_impl(conv_grad: str) -> dict:
  """nn.Conv keyword arguments for `model.conv_grad` ('xla': none, nn.Conv's own lax convolution)."""
  if conv_grad == 'xla':
    return {}
  if conv_grad == 'matmul':
    return {'conv_general_dilated': _conv_with_matmul_grad}
  if conv_grad == 'matmul_wide':
    return {'conv_general_dilated': functools.partial(_conv_with_matmul_grad, wide_only=True)}
  raise ValueError(f"model.conv_grad must be 'xla', 'matmul' or 'matmul_wide', got {conv_grad!r}")


# `model.small_conv='matmul'`: 3x3 convolutions on maps no larger than this, as one matmul over the nine
# taps. XLA:CPU's own convolution of a 2x2 map with a 3x3 kernel ran 14x slower than that matmul (the fwd, dx
# and dw of 4 x 2x2 x 512 -> 512: 39.5 against 2.8 ms; 6.2 against 4.0 ms at 4x4, and no gain at 8x8).
SMALL_MAP_MAX_SIDE = 4
SMALL_CONV_IMPLS = ('xla', 'matmul')


def im2col_conv(x, w):
  """`_same_conv` as one matmul: the kh*kw shifted copies of the padded map side by side [B*H*W, kh*kw*C_in]
  times the kernel [kh*kw*C_in, C_out]. Its gradients are matmuls, pads and slices too."""
  kh, kw, c_in, c_out = w.shape
  b, h, wd, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + h, j:j + wd] for i in range(kh) for j in range(kw)], axis=-1)
  return (cols.reshape(b * h * wd, kh * kw * c_in) @ w.reshape(kh * kw * c_in, c_out)).reshape(b, h, wd, c_out)


class Conv(nn.Module):
  """nn.Conv with stride 1, 'same' padding and an odd square kernel, with the model's convolution levers.

  Its parameters are nn.Conv's ('kernel' [k, k, C_in, C_out], 'bias' [C_out]; same initialisers, drawn in
  the same order), and with the levers at 'xla' / 'reduce' it computes exactly what nn.Conv does.
  conv_grad: the kernel gradient (`conv_impl`); small_conv: 'matmul' takes `im2col_conv` on maps of at most
  SMALL_MAP_MAX_SIDE pixels a side; channel_sums: how the bias gradient sums (`channel_sums.add_channel_bias`).
  """
  features: int
  kernel_size: int = 3
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  conv_grad: str = 'xla'
  small_conv: str = 'xla'
  channel_sums: str = 'reduce'

  @nn.compact
  def __call__(self, x):
    if self.small_conv not in SMALL_CONV_IMPLS:
      raise ValueError(f"model.small_conv must be one of {SMALL_CONV_IMPLS} (or 'auto' in a config), "
                       f'got {self.small_conv!r}')
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.small_conv == 'matmul' and k > 1 and max(x.shape[1:3]) <= SMALL_MAP_MAX_SIDE:
      y = im2col_conv(x, kernel)
    else:
      conv = conv_impl(self.conv_grad).get('conv_general_dilated', lax.conv_general_dilated)
      y = conv(x, kernel, (1, 1), [(k // 2, k // 2)] * 2, lhs_dilation=(1, 1), rhs_dilation=(1, 1),
               dimension_numbers=lax.conv_dimension_numbers(x.shape, kernel.shape, _NHWC), feature_group_count=1,
               precision=None)
    return add_channel_bias(y, bias, self.channel_sums)


def conv3x3(features, dtype, name, zero=False, conv_grad='xla', small_conv='xla', channel_sums='reduce'):
  return Conv(features, 3, dtype, nn.initializers.zeros if zero else nn.initializers.lecun_normal(),
              conv_grad, small_conv, channel_sums, name=name)
