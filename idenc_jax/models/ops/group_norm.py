"""Group norms of the models: nn.GroupNorm, or `model.group_norm='fused'`, GroupNorm + per-sample
modulation + SiLU as one op with its own VJP (same parameters, same function)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from idenc_jax.models.ops.channel_sums import map_sums


def group_norm(num_groups, dtype, name):
  # Stats are accumulated in float32 inside flax's GroupNorm even for bf16 inputs.
  return nn.GroupNorm(num_groups=num_groups, epsilon=1e-5, dtype=dtype, name=name)


# ---- Fused group norm: GroupNorm, per-sample channel modulation and SiLU as one op with its own VJP. ----
# silu((GN(x) * scale + bias) * mult + add) for NHWC x and [B, C] mult/add, the pattern every norm of
# the ResBlock and the networks' outputs follows. Statistics are per-channel sums over H, W (plain
# reductions over the non-minor axes of NHWC, no 5-D group reshape of x; `model.channel_sums` says how
# they are summed) folded into groups on [B, C];
# the whole affine part folds into one per-channel multiply-add. The VJP keeps only x and [B, C]
# vectors: autodiff would also store the pre-SiLU activation (a full-size write in the forward pass and
# a read in the backward), and recomputing it from x is one fused multiply-add.

def _group_sums(v, groups):
  """[B, C] -> [B, C]: each channel gets the sum over its group."""
  b, c = v.shape
  return jnp.repeat(v.reshape(b, groups, c // groups).sum(-1), c // groups, axis=1)


def _fused_norm_statistics(x, scale, bias, mult, add, groups, eps, sums):
  """Per-(sample, channel) float32 vectors: mean, variance + eps, and the modulated affine's
  gamma = scale * mult and beta = bias * mult + add."""
  h, w, c = x.shape[1:]
  n = h * w * (c // groups)
  xf = x.astype(jnp.float32)
  mean = _group_sums(map_sums(xf, sums), groups) / n
  mean_sq = _group_sums(map_sums(jnp.square(xf), sums), groups) / n
  var = jnp.maximum(mean_sq - jnp.square(mean), 0.0) + eps
  gamma = scale.astype(jnp.float32) * mult.astype(jnp.float32)           # [B, C]
  beta = bias.astype(jnp.float32) * mult.astype(jnp.float32) + add.astype(jnp.float32)
  return mean, var, gamma, beta


def _expand(v):
  return v[:, None, None, :]


def _apply(x, a, b):
  return nn.silu(x.astype(jnp.float32) * _expand(a) + _expand(b)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def fused_group_norm_silu(x, scale, bias, mult, add, groups: int, eps: float = 1e-5, sums: str = 'reduce'):
  """silu((GroupNorm(x) * scale + bias) * mult + add), in x's dtype, statistics in float32.

  x: [B, H, W, C]; scale, bias: [C]; mult, add: [B, C] (ones / zeros for a plain GroupNorm + SiLU); sums:
  'reduce' or 'matmul', how the per-channel sums are taken (`channel_sums.map_sums`).
  """
  # Where no gradient reaches the op (sampling, evaluation, and in stage-2 training the frozen stage-1 parts
  # upstream of every trainable layer): y = x * a + b with a and b ending in a division. XLA fuses cheap
  # [B, C] producers into the per-pixel loop and recomputes them at every pixel (the modulation's projections,
  # the groups' repeat: the norm took 2.20 ms at 16 x 32x32 x 32, 0.56 with a and b given); a division it
  # keeps apart, so the loop reads a and b. The sampling step ran 1.2x faster; the values differ from
  # `_fused_norm_fwd`'s (which runs wherever a gradient flows: all of stage 0/1 training) by float32 rounding.
  mean, var, gamma, beta = _fused_norm_statistics(x, scale, bias, mult, add, groups, eps, sums)
  std = jnp.sqrt(var)
  return _apply(x, gamma / std, (beta * std - mean * gamma) / std)


def _fused_norm_fwd(x, scale, bias, mult, add, groups, eps, sums):
  mean, var, gamma, beta = _fused_norm_statistics(x, scale, bias, mult, add, groups, eps, sums)
  inv = lax.rsqrt(var)
  a = inv * gamma
  b = beta - mean * a
  return _apply(x, a, b), (x, scale, bias, mult, add, mean, inv, gamma, a, b)


def _fused_norm_bwd(groups, eps, sums, res, dout):
  del eps
  x, scale, bias, mult, add, mean, inv, gamma, a, b = res
  h, w, c = x.shape[1:]
  n = h * w * (c // groups)
  xf = x.astype(jnp.float32)
  y = xf * _expand(a) + _expand(b)
  sig = jax.nn.sigmoid(y)
  dy = dout.astype(jnp.float32) * sig * (1 + y * (1 - sig))      # through SiLU
  xhat = (xf - _expand(mean)) * _expand(inv)
  d_beta = map_sums(dy, sums)                                     # [B, C]: d(per-sample bias)
  d_gamma = map_sums(dy * xhat, sums)                             # [B, C]: d(per-sample scale)
  # GroupNorm's input gradient: inv * (g - mean_group(g) - xhat * mean_group(g * xhat)), g = dy * gamma.
  k1 = _group_sums(gamma * d_beta, groups) / n
  k2 = _group_sums(gamma * d_gamma, groups) / n
  dx = _expand(inv) * (dy * _expand(gamma) - _expand(k1) - xhat * _expand(k2))
  mf = mult.astype(jnp.float32)
  d_scale = jnp.sum(d_gamma * mf, axis=0)
  d_bias = jnp.sum(d_beta * mf, axis=0)
  d_mult = d_gamma * scale.astype(jnp.float32) + d_beta * bias.astype(jnp.float32)
  return (dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype),
          d_mult.astype(mult.dtype), d_beta.astype(add.dtype))


fused_group_norm_silu.defvjp(_fused_norm_fwd, _fused_norm_bwd)


class FusedGroupNormSiLU(nn.Module):
  """`fused_group_norm_silu` as a module with nn.GroupNorm's parameters ('scale', 'bias' of [C]), so
  the `model.group_norm` lever leaves parameter trees and checkpoints interchangeable."""
  num_groups: int
  epsilon: float = 1e-5
  channel_sums: str = 'reduce'

  @nn.compact
  def __call__(self, x, mult=None, add=None):
    b, c = x.shape[0], x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'{c} channels do not split into {self.num_groups} groups')
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    mult = jnp.ones((b, c), x.dtype) if mult is None else mult
    add = jnp.zeros((b, c), x.dtype) if add is None else add
    return fused_group_norm_silu(x, scale, bias, mult, add, self.num_groups, self.epsilon, self.channel_sums)


def norm_silu(impl: str, num_groups: int, dtype, name: str, channel_sums: str = 'reduce'):
  """x -> silu(GroupNorm(x)) by `model.group_norm` ('flax' or 'fused'); same parameters either way."""
  if impl == 'fused':
    return FusedGroupNormSiLU(num_groups, channel_sums=channel_sums, name=name)
  if impl != 'flax':
    raise ValueError(f"model.group_norm must be 'flax' or 'fused' (or 'auto' in a config), got {impl!r}")
  norm = group_norm(num_groups, dtype, name)
  return lambda x: nn.silu(norm(x))
