"""Building blocks shared by the generator U-Net and the encoders (NHWC, flax linen).

Parameters are always float32; `dtype` is the compute dtype (bfloat16 for mixed precision). Norm
statistics are computed in float32 whatever the compute dtype.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def conv3x3(features, dtype, name, zero=False):
  return nn.Conv(features, (3, 3), padding=1, dtype=dtype, name=name,
                 kernel_init=zeros_init if zero else nn.initializers.lecun_normal())


def group_norm(num_groups, dtype, name):
  # Stats are accumulated in float32 inside flax's GroupNorm even for bf16 inputs.
  return nn.GroupNorm(num_groups=num_groups, epsilon=1e-5, dtype=dtype, name=name)


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

  @nn.compact
  def __call__(self, x, emb=None, cond=None):
    c_out = self.out_channels
    h = nn.silu(group_norm(self.num_groups, self.dtype, 'norm_0')(x))
    h = _resample(h, self.resample)
    x = _resample(x, self.resample)
    h = conv3x3(c_out, self.dtype, 'conv_0')(h)

    h = group_norm(self.num_groups, self.dtype, 'norm_1')(h)
    if emb is not None:
      scale_shift = nn.Dense(2 * c_out, dtype=self.dtype, name='emb_proj')(nn.silu(emb))
      scale, shift = jnp.split(scale_shift[:, None, None, :], 2, axis=-1)
      h = h * (1 + scale) + shift
    if cond is not None:
      cond_scale = nn.Dense(c_out, dtype=self.dtype, name='cond_proj')(nn.silu(cond))
      h = h * (1 + cond_scale[:, None, None, :])
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    h = conv3x3(c_out, self.dtype, 'conv_1', zero=True)(h)

    if x.shape[-1] != c_out:
      x = nn.Conv(c_out, (1, 1), dtype=self.dtype, name='skip')(x)
    return x + h


def dot_product_attention(q, k, v, impl: str):
  """Multi-head attention on [B, L, H, D] tensors; softmax in float32."""
  if impl == 'fused':
    return jax.nn.dot_product_attention(q, k, v)
  if impl != 'xla':
    raise ValueError(f"model.attention must be 'xla' or 'fused', got {impl!r}")
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


class AttentionBlock(nn.Module):
  """Self-attention over spatial positions, written as a pre-norm Vision Transformer block.

  x + Attn(LN(x)), then + MLP(LN(.)). Output projections start at zero (identity at init).
  With `context` given it is a cross-attention block: queries from x, keys/values from context tokens.
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
    q = dense('query')(h)
    kv_in = h if context is None else context.astype(self.dtype)
    k, v = dense('key')(kv_in), dense('value')(kv_in)
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
