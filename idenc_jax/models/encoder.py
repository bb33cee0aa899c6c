"""Image encoders of the U-Net's conv family: the identity encoder Enc and the stage-2 condition encoder.

The layout mirrors the generator's down path without timestep conditioning: a conv stem,
`num_res_blocks` residual blocks per level (with ViT-style self-attention at `attn_resolutions`),
a down-sampling residual block between levels, and a middle of residual, attention, residual.
`IdentityEncoder` then normalises, average-pools and projects to the embedding (512-d in the paper);
`ConditionEncoder` keeps the final feature map and returns it as tokens [B, H*W, C].
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from idenc_jax.models import layers
from idenc_jax.models.unet import block_cls


class ConvTrunk(nn.Module):
  """The shared encoder body: image [B,R,R,C] -> final feature map [B, R/2^(L-1), ..., C_last]."""
  base_channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  num_heads: int
  num_groups: int = 32
  mlp_ratio: int = 4
  attention: str = 'xla'
  remat: bool = False
  dtype: Any = jnp.float32
  conv_grad: str = 'xla'
  group_norm: str = 'flax'

  @nn.compact
  def __call__(self, x):
    dt = self.dtype
    Res = block_cls(layers.ResBlock, self.remat)
    Attn = block_cls(layers.AttentionBlock, self.remat)
    attn = lambda h, name: Attn(self.num_heads, self.mlp_ratio, 0.0, self.attention, dt, name=name)(h)
    cg, gn = self.conv_grad, self.group_norm
    h = layers.conv3x3(self.base_channels, dt, 'conv_in', conv_grad=cg)(x.astype(dt))
    cur = x.shape[1]
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = Res(mult * self.base_channels, self.num_groups, 0.0, 'none', dt, conv_grad=cg, group_norm=gn,
                name=f'down_{level}_{i}')(h)
        if cur in self.attn_resolutions:
          h = attn(h, f'down_{level}_{i}_attn')
      if level != len(self.channel_mult) - 1:
        h = Res(h.shape[-1], self.num_groups, 0.0, 'down', dt, conv_grad=cg, group_norm=gn,
                name=f'down_{level}_resample')(h)
        cur //= 2
    h = Res(h.shape[-1], self.num_groups, 0.0, 'none', dt, conv_grad=cg, group_norm=gn, name='mid_0')(h)
    h = attn(h, 'mid_attn')
    return Res(h.shape[-1], self.num_groups, 0.0, 'none', dt, conv_grad=cg, group_norm=gn, name='mid_1')(h)


class IdentityEncoder(nn.Module):
  """Enc: images [B,R,R,3] in [-1,1] -> identity embeddings [B, embed_dim] (float32)."""
  base_channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  num_heads: int
  embed_dim: int
  num_groups: int = 32
  mlp_ratio: int = 4
  attention: str = 'xla'
  remat: bool = False
  dtype: Any = jnp.float32
  conv_grad: str = 'xla'
  group_norm: str = 'flax'

  @nn.compact
  def __call__(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'encoder expects NHWC RGB images, got shape {images.shape}')
    h = ConvTrunk(self.base_channels, self.channel_mult, self.num_res_blocks, self.attn_resolutions,
                  self.num_heads, self.num_groups, self.mlp_ratio, self.attention, self.remat,
                  self.dtype, self.conv_grad, self.group_norm, name='trunk')(images)
    h = layers.norm_silu(self.group_norm, self.num_groups, self.dtype, 'norm_out')(h)
    h = h.mean(axis=(1, 2))
    return nn.Dense(self.embed_dim, dtype=self.dtype, name='proj')(h).astype(jnp.float32)


class ConditionEncoder(nn.Module):
  """Stage 2: a degraded image (plus mask channels) -> condition tokens [B, L, C] from the final map."""
  base_channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  num_heads: int
  token_dim: int
  num_groups: int = 32
  mlp_ratio: int = 4
  attention: str = 'xla'
  remat: bool = False
  dtype: Any = jnp.float32
  conv_grad: str = 'xla'
  group_norm: str = 'flax'

  @nn.compact
  def __call__(self, cond_image):
    h = ConvTrunk(self.base_channels, self.channel_mult, self.num_res_blocks, self.attn_resolutions,
                  self.num_heads, self.num_groups, self.mlp_ratio, self.attention, self.remat,
                  self.dtype, self.conv_grad, self.group_norm, name='trunk')(cond_image)
    h = layers.norm_silu(self.group_norm, self.num_groups, self.dtype, 'norm_out')(h)
    b, hh, ww, c = h.shape
    tokens = nn.Dense(self.token_dim, dtype=self.dtype, name='proj')(h.reshape(b, hh * ww, c))
    return tokens


def aggregate_embeddings(z_refs: jax.Array) -> jax.Array:
  """Inference aggregate E(Y) = mean_j Enc(y_j) over references [R, D] -> [D]; order-invariant."""
  return jnp.mean(z_refs, axis=0)
