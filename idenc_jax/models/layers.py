"""Building blocks shared by the generator U-Net and the encoders (NHWC, flax linen).

Parameters are always float32; `dtype` is the compute dtype (bfloat16 for mixed precision). Norm
statistics are computed in float32 whatever the compute dtype.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from idenc_jax.models.ops.attention import dot_product_attention
from idenc_jax.models.ops.conv import Conv, conv3x3  # noqa: F401 (conv3x3: the networks take it from here)
from idenc_jax.models.ops.group_norm import FusedGroupNormSiLU, group_norm, norm_silu

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


def block_cls(cls, remat: bool):
  """`cls`, rematerialised per block under `model.remat` (activations recomputed in the backward pass)."""
  return nn.remat(cls) if remat else cls


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
  timestep terms, `cond=None` (unconditional generator) drops the z term, and `cond_keep` [B] (1 keep, 0
  drop) drops it per sample: a dropped sample computes exactly what `cond=None` would. `resample` in
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
  small_conv: str = 'xla'      # see `Conv`
  channel_sums: str = 'reduce' # see `channel_sums`

  @nn.compact
  def __call__(self, x, emb=None, cond=None, cond_keep=None):
    c_out = self.out_channels
    conv = lambda features, name, k=3, zero=False: Conv(
        features, k, self.dtype, zeros_init if zero else nn.initializers.lecun_normal(), self.conv_grad,
        self.small_conv, self.channel_sums, name=name)
    h = norm_silu(self.group_norm, self.num_groups, self.dtype, 'norm_0', self.channel_sums)(x)
    h = _resample(h, self.resample)
    x = _resample(x, self.resample)
    h = conv(c_out, 'conv_0')(h)

    scale = shift = cond_scale = None
    if emb is not None:
      scale_shift = nn.Dense(2 * c_out, dtype=self.dtype, name='emb_proj')(nn.silu(emb))
      scale, shift = jnp.split(scale_shift, 2, axis=-1)
    if cond is not None:
      cond_scale = nn.Dense(c_out, dtype=self.dtype, name='cond_proj')(nn.silu(cond))
      if cond_keep is not None:
        # x * 1 and x * 0 are exact, so kept samples are unchanged and dropped ones get 1 + 0 = 1.
        cond_scale = cond_scale * cond_keep.astype(cond_scale.dtype)[:, None]
    if self.group_norm == 'fused':
      # The same modulation folded into one per-sample channel multiply-add: h * mult + add.
      mult = add = None
      if emb is not None:
        mult, add = 1 + scale, shift
      if cond is not None:
        mult = 1 + cond_scale if mult is None else mult * (1 + cond_scale)
        add = None if add is None else add * (1 + cond_scale)
      h = FusedGroupNormSiLU(self.num_groups, channel_sums=self.channel_sums, name='norm_1')(h, mult, add)
    else:
      h = group_norm(self.num_groups, self.dtype, 'norm_1')(h)
      if emb is not None:
        h = h * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
      if cond is not None:
        h = h * (1 + cond_scale[:, None, None, :])
      h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    h = conv(c_out, 'conv_1', zero=True)(h)

    if x.shape[-1] != c_out:
      x = conv(c_out, 'skip', k=1)(x)
    return x + h


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
