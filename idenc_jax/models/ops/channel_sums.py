"""Per-channel sums over a feature map (`model.channel_sums`): XLA reductions, or matrix-vector products.

The norms' statistics and gradients and every convolution's bias gradient are sums of an NHWC map over
its pixels (and batch), keeping the minor channel axis. XLA:CPU compiles such a column reduction into a
loop that, at 32 channels and more, runs 2-12x slower than the same sum written as `ones @ rows` (a
matrix-vector product, which it hands to its vectorised matmul kernels; docs/performance.md). 'reduce'
keeps jnp.sum (XLA's reduction, every accelerator's fast path); 'matmul' takes the product form. Same
sums, summed in another order: equal to float32 rounding.
"""

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ('reduce', 'matmul')


def check_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"model.channel_sums must be one of {IMPLS} (or 'auto' in a config), got {impl!r}")
  return impl


def _ones_dot(ones, rows, dims, dtype):
  # HIGHEST: a float32 product must not drop to reduced-precision passes where a backend has them.
  out = lax.dot_general(ones, rows, dims, precision=lax.Precision.HIGHEST,
                        preferred_element_type=jnp.promote_types(dtype, jnp.float32))
  return out.astype(dtype)


def map_sums(v: jax.Array, impl: str) -> jax.Array:
  """[B, H, W, C] -> [B, C]: each sample's sum over its pixels."""
  if check_impl(impl) == 'reduce':
    return jnp.sum(v, axis=(1, 2))
  b, c = v.shape[0], v.shape[-1]
  rows = v.reshape(b, -1, c)
  return _ones_dot(jnp.ones(rows.shape[:2], v.dtype), rows, (((1,), (1,)), ((0,), (0,))), v.dtype)


def all_sums(v: jax.Array, impl: str) -> jax.Array:
  """[..., C] -> [C]: the sum over every axis but the last."""
  if check_impl(impl) == 'reduce':
    return jnp.sum(v, axis=tuple(range(v.ndim - 1)))
  rows = v.reshape(-1, v.shape[-1])
  return _ones_dot(jnp.ones(rows.shape[:1], v.dtype), rows, (((0,), (0,)), ((), ())), v.dtype)


def add_channel_bias(y: jax.Array, bias: jax.Array, impl: str) -> jax.Array:
  """y + bias over the last axis, whose bias gradient is `all_sums(dy, impl)`.

  With 'reduce' this is the plain broadcast add (autodiff's own reduction), exactly as nn.Conv adds it.
  """
  if check_impl(impl) == 'reduce':
    return _broadcast_add(y, bias)
  return _add_bias_matmul_grad(y, bias)


def _broadcast_add(y, bias):
  return y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)


@jax.custom_vjp
def _add_bias_matmul_grad(y, bias):
  return _broadcast_add(y, bias)


def _add_bias_fwd(y, bias):
  return _broadcast_add(y, bias), bias   # bias (a parameter, alive anyway) gives the gradient's dtype


def _add_bias_bwd(bias, dy):
  return dy, all_sums(dy, 'matmul').astype(bias.dtype)


_add_bias_matmul_grad.defvjp(_add_bias_fwd, _add_bias_bwd)
