"""Building blocks shared by the generator U-Net and the encoders (NHWC, flax linen).

Parameters are always float32; `dtype` is the compute dtype (bfloat16 for mixed precision). Norm
statistics are computed in float32 whatever the compute dtype.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
zeros_init = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of integer timesteps t [B] -> [B, dim] (cos half first, then sin)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimeEmbedding(nn.Module):
  """Timestep -> sinusoid(base) -> Dense(emb) -> SiLU -> Dense(emb)."""
  base_dim: int
  emb_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    h = timestep_embedding(t, self.base_dim).astype(self.dtype)
    h = nn.Dense(self.emb_dim, dtype=self.dtype, name='dense_0')(h)
    return nn.Dense(self.emb_dim, dtype=self.dtype, name='dense_1')(nn.silu(h))


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


def _conv_with_matmul_grad(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                           dimension_numbers=None, feature_group_count=1, **kwargs):
  """A drop-in `lax.conv_general_dilated` for nn.Conv: the matmul-gradient path where it applies
  (stride 1, no dilation, one group, NHWC/HWIO, odd kernel, 'same' padding), lax otherwise."""
  kh, kw = rhs.shape[:2]
  same = [(kh // 2, kh // 2), (kw // 2, kw // 2)]
  pads = padding if isinstance(padding, str) else [tuple(p) for p in padding]
  applies = (
      tuple(window_strides) == (1, 1) and all(d in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))
      and feature_group_count == 1 and kh % 2 == 1 and kw % 2 == 1 and pads in ('SAME', same)
      and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
      and kwargs.get('precision') is None and kwargs.get('preferred_element_type') is None)
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
  raise ValueError(f"model.conv_grad must be 'xla' or 'matmul', got {conv_grad!r}")


def conv3x3(features, dtype, name, zero=False, conv_grad='xla'):
  return nn.Conv(features, (3, 3), padding=1, dtype=dtype, name=name,
                 kernel_init=zeros_init if zero else nn.initializers.lecun_normal(), **conv_impl(conv_grad))


def group_norm(num_groups, dtype, name):
  # Stats are accumulated in float32 inside flax's GroupNorm even for bf16 inputs.
  return nn.GroupNorm(num_groups=num_groups, epsilon=1e-5, dtype=dtype, name=name)


# ---- Fused group norm: GroupNorm, per-sample channel modulation and SiLU as one op with its own VJP. ----
# silu((GN(x) * scale + bias) * mult + add) for NHWC x and [B, C] mult/add, the pattern every norm of
# the ResBlock and the networks' outputs follows. Statistics are per-channel sums over H, W (plain
# reductions over the non-minor axes of NHWC, no 5-D group reshape of x) folded into groups on [B, C];
# the whole affine part folds into one per-channel multiply-add. The VJP keeps only x and [B, C]
# vectors: autodiff would also store the pre-SiLU activation (a full-size write in the forward pass and
# a read in the backward), and recomputing it from x is one fused multiply-add.

def _group_sums(v, groups):
  """[B, C] -> [B, C]: each channel gets the sum over its group."""
  b, c = v.shape
  return jnp.repeat(v.reshape(b, groups, c // groups).sum(-1), c // groups, axis=1)


def _fused_norm_coefficients(x, scale, bias, mult, add, groups, eps):
  """Per-(sample, channel) float32 vectors: mean, 1/std, and y = x * a + b's a and b."""
  h, w, c = x.shape[1:]
  n = h * w * (c // groups)
  xf = x.astype(jnp.float32)
  mean = _group_sums(jnp.sum(xf, axis=(1, 2)), groups) / n
  mean_sq = _group_sums(jnp.sum(jnp.square(xf), axis=(1, 2)), groups) / n
  inv = lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + eps)
  gamma = scale.astype(jnp.float32) * mult.astype(jnp.float32)           # [B, C]
  beta = bias.astype(jnp.float32) * mult.astype(jnp.float32) + add.astype(jnp.float32)
  a = inv * gamma
  return mean, inv, gamma, a, beta - mean * a


def _expand(v):
  return v[:, None, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def fused_group_norm_silu(x, scale, bias, mult, add, groups: int, eps: float = 1e-5):
  """silu((GroupNorm(x) * scale + bias) * mult + add), in x's dtype, statistics in float32.

  x: [B, H, W, C]; scale, bias: [C]; mult, add: [B, C] (ones / zeros for a plain GroupNorm + SiLU).
  """
  return _fused_norm_fwd(x, scale, bias, mult, add, groups, eps)[0]


def _fused_norm_fwd(x, scale, bias, mult, add, groups, eps):
  mean, inv, gamma, a, b = _fused_norm_coefficients(x, scale, bias, mult, add, groups, eps)
  out = nn.silu(x.astype(jnp.float32) * _expand(a) + _expand(b)).astype(x.dtype)
  return out, (x, scale, bias, mult, add, mean, inv, gamma, a, b)


def _fused_norm_bwd(groups, eps, res, dout):
  del eps
  x, scale, bias, mult, add, mean, inv, gamma, a, b = res
  h, w, c = x.shape[1:]
  n = h * w * (c // groups)
  xf = x.astype(jnp.float32)
  y = xf * _expand(a) + _expand(b)
  sig = jax.nn.sigmoid(y)
  dy = dout.astype(jnp.float32) * sig * (1 + y * (1 - sig))      # through SiLU
  xhat = (xf - _expand(mean)) * _expand(inv)
  d_beta = jnp.sum(dy, axis=(1, 2))                               # [B, C]: d(per-sample bias)
  d_gamma = jnp.sum(dy * xhat, axis=(1, 2))                       # [B, C]: d(per-sample scale)
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

  @nn.compact
  def __call__(self, x, mult=None, add=None):
    b, c = x.shape[0], x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'{c} channels do not split into {self.num_groups} groups')
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    mult = jnp.ones((b, c), x.dtype) if mult is None else mult
    add = jnp.zeros((b, c), x.dtype) if add is None else add
    return fused_group_norm_silu(x, scale, bias, mult, add, self.num_groups, self.epsilon)


def norm_silu(impl: str, num_groups: int, dtype, name: str):
  """x -> silu(GroupNorm(x)) by `model.group_norm` ('flax' or 'fused'); same parameters either way."""
  if impl == 'fused':
    return FusedGroupNormSiLU(num_groups, name=name)
  if impl != 'flax':
    raise ValueError(f"model.group_norm must be 'flax' or 'fused', got {impl!r}")
  norm = group_norm(num_groups, dtype, name)
  return lambda x: nn.silu(norm(x))


def _resample(h, mode):
  if mode == 'down':
    b, hh, ww, c = h.shape
    return h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
  if mode == 'up':
    return jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
  return h


class ResBlock(nn.Module):
  """Timestep- and condition-dependent residual block (adaptive group norm).

  out = skip(x) + conv(drop(silu(AdaGN(conv(silu(norm(x)))))))
  with AdaGN(h) = (norm(h) * (1 + s_t) + b_t) * (1 + s_z): scale/shift from the timestep embedding,
  then a multiplicative scale from the identity embedding z. `emb=None` (the encoders) drops the
  timestep terms, `cond=None` (unconditional generator) drops the z term. `resample` in
  {'none', 'down', 'up'} makes this the resampling block of a level (average pool / nearest up).
  The last conv starts at zero, so a fresh block is the identity on its skip path.
  """
  out_channels: int
  num_groups: int = 32
  dropout: float = 0.0
  resample: str = 'none'
  dtype: Dtype = jnp.float32
  deterministic: bool = True   # False enables dropout (training)
  conv_grad: str = 'xla'       # see `conv_impl`
  group_norm: str = 'flax'     # see `norm_silu`

  @nn.compact
  def __call__(self, x, emb=None, cond=None):
    c_out = self.out_channels
    h = norm_silu(self.group_norm, self.num_groups, self.dtype, 'norm_0')(x)
    h = _resample(h, self.resample)
    x = _resample(x, self.resample)
    h = conv3x3(c_out, self.dtype, 'conv_0', conv_grad=self.conv_grad)(h)

    scale = shift = cond_scale = None
    if emb is not None:
      scale_shift = nn.Dense(2 * c_out, dtype=self.dtype, name='emb_proj')(nn.silu(emb))
      scale, shift = jnp.split(scale_shift, 2, axis=-1)
    if cond is not None:
      cond_scale = nn.Dense(c_out, dtype=self.dtype, name='cond_proj')(nn.silu(cond))
    if self.group_norm == 'fused':
      # The same modulation folded into one per-sample channel multiply-add: h * mult + add.
      mult = add = None
      if emb is not None:
        mult, add = 1 + scale, shift
      if cond is not None:
        mult = 1 + cond_scale if mult is None else mult * (1 + cond_scale)
        add = None if add is None else add * (1 + cond_scale)
      h = FusedGroupNormSiLU(self.num_groups, name='norm_1')(h, mult, add)
    else:
      h = group_norm(self.num_groups, self.dtype, 'norm_1')(h)
      if emb is not None:
        h = h * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
      if cond is not None:
        h = h * (1 + cond_scale[:, None, None, :])
      h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    h = conv3x3(c_out, self.dtype, 'conv_1', zero=True, conv_grad=self.conv_grad)(h)

    if x.shape[-1] != c_out:
      x = nn.Conv(c_out, (1, 1), dtype=self.dtype, name='skip', **conv_impl(self.conv_grad))(x)
    return x + h


def fused_attention_backend(dtype, head_dim: int) -> str | None:
  """The implementation `jax.nn.dot_product_attention` gets for model.attention='fused'.

  cuDNN's fused (flash) attention on GPUs for 16-bit inputs with head_dim <= 128, a multiple of 8;
  elsewhere None, the library's own XLA composition (no fused kernel exists there).
  """
  on_gpu = jax.default_backend() in ('gpu', 'cuda')
  if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0:
    return 'cudnn'
  return None


def dot_product_attention(q, k, v, impl: str):
  """Multi-head attention on [B, L, H, D] tensors; softmax in float32."""
  if impl == 'fused':
    return jax.nn.dot_product_attention(q, k, v, implementation=fused_attention_backend(q.dtype, q.shape[-1]))
  if impl != 'xla':
    raise ValueError(f"model.attention must be 'xla' or 'fused', got {impl!r}")
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def position_codes_2d(height: int, width: int, dim: int, max_frequency: float) -> jax.Array:
  """Fixed 2D position codes [height*width, dim] of normalised pixel centres (u, v) in (0, 1).

  Channels 4j..4j+3 hold sin(w_j u), cos(w_j u), sin(w_j v), cos(w_j v), with w_j = pi * f_j and f_j
  geometric from 1 to max_frequency (cycles per image side); channels beyond 4 * (dim // 4) are zero. Grids
  of different sizes share the frame, so a position gets the same code in a 16x16 and an 8x8 map.
  """
  n = dim // 4
  if n == 0:
    return jnp.zeros((height * width, dim), jnp.float32)
  f = jnp.pi * jnp.geomspace(1.0, max(max_frequency, 1.0), n)
  u = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
  v = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
  uu, vv = jnp.meshgrid(u, v, indexing='ij')
  au, av = uu.reshape(-1, 1) * f, vv.reshape(-1, 1) * f
  codes = jnp.stack([jnp.sin(au), jnp.cos(au), jnp.sin(av), jnp.cos(av)], axis=-1).reshape(height * width, 4 * n)
  return jnp.pad(codes, ((0, 0), (0, dim - 4 * n)))


class AttentionBlock(nn.Module):
  """Self-attention over spatial positions, written as a pre-norm Vision Transformer block.

  x + Attn(LN(x)), then + MLP(LN(.)). Output projections start at zero (identity at init).
  With `context` given it is a cross-attention block: queries from x, keys/values from context tokens,
  which form a square map (the condition encoder's final feature map). Queries and keys then get
  `position_codes_2d` of their places in the image (frequencies up to half the smaller map's side), so a
  generator position can attend to the same place of the condition; values carry no codes.
  """
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0
  attention: str = 'xla'
  dtype: Dtype = jnp.float32
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, context=None):
    b, hh, ww, c = x.shape
    if c % self.num_heads:
      raise ValueError(f'{c} channels do not split into {self.num_heads} attention heads')
    head_dim = c // self.num_heads
    tokens = x.reshape(b, hh * ww, c)

    h = nn.LayerNorm(dtype=self.dtype, name='ln_attn')(tokens)
    dense = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=name)
    if context is None:
      q, k, v = dense('query')(h), dense('key')(h), dense('value')(h)
    else:
      side = math.isqrt(context.shape[1])
      if side * side != context.shape[1]:
        raise ValueError(f'cross-attention context must be a square token map, got {context.shape[1]} tokens')
      max_freq = min(hh, ww, side) / 2
      ctx = context.astype(self.dtype)
      q = dense('query')(h + position_codes_2d(hh, ww, c, max_freq).astype(self.dtype))
      k = dense('key')(ctx + position_codes_2d(side, side, ctx.shape[-1], max_freq).astype(self.dtype))
      v = dense('value')(ctx)
    a = dot_product_attention(q, k, v, self.attention)
    a = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, kernel_init=zeros_init, name='out')(a)
    tokens = tokens + nn.Dropout(self.dropout, deterministic=self.deterministic)(a)

    if not self.mlp_ratio:  # attention only (DiffAE-style block without the MLP)
      return tokens.reshape(b, hh, ww, c)
    h = nn.LayerNorm(dtype=self.dtype, name='ln_mlp')(tokens)
    h = nn.gelu(nn.Dense(self.mlp_ratio * c, dtype=self.dtype, name='mlp_in')(h))
    h = nn.Dense(c, dtype=self.dtype, kernel_init=zeros_init, name='mlp_out')(h)
    tokens = tokens + nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    return tokens.reshape(b, hh, ww, c)
