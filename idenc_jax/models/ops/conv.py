"""Convolutions of the models, and `model.conv_grad='matmul'` / `'matmul_wide'`: kernel gradients as one matmul
per tap (everywhere / only where that beat XLA:CPU's own)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

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


def conv3x3(features, dtype, name, zero=False, conv_grad='xla'):
  return nn.Conv(features, (3, 3), padding=1, dtype=dtype, name=name,
                 kernel_init=nn.initializers.zeros if zero else nn.initializers.lecun_normal(), **conv_impl(conv_grad))
