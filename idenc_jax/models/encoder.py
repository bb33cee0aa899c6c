"""Image encoders of the U-Net's conv family: the identity encoder Enc and the stage-2 condition encoder.

The layout mirrors the generator's down path without timestep conditioning: a conv stem,
`num_res_blocks` residual blocks per level (with ViT-style self-attention at `attn_resolutions`),
a down-sampling residual block between levels, and a middle of residual, attention, residual.
`IdentityEncoder` then normalises, average-pools and projects to the embedding (512-d in the paper);
`ConditionEncoder` keeps the final feature map and returns it as tokens [B, H*W, C].
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from idenc_jax.models import layers


class ConvTrunk(nn.Module):
  """The shared encoder body: image [B,R,R,C] -> final feature map [B, R/2^(L-1), ..., C_last]."""
  base_channels: int = 128
  channel_mult: Sequence[int] = (1,)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  num_heads: int = 8
  num_groups: int = 32
  mlp_ratio: int = 4
  attention: str = 'xla'
  remat: bool = False
  dtype: Any = jnp.float32
  conv_grad: str = 'xla'
  group_norm: str = 'flax'
  small_conv: str = 'xla'
  channel_sums: str = 'reduce'

  @nn.compact
  def __call__(self, x):
    dt = self.dtype
    Res = layers.block_cls(layers.ResBlock, self.remat)
    Attn = layers.block_cls(layers.AttentionBlock, self.remat)
    attn = lambda h, name: Attn(self.num_heads, self.mlp_ratio, 0.0, self.attention, dt, name=name)(h)
    res = lambda h, ch, name, resample='none': Res(
        ch, self.num_groups, 0.0, resample, dt, conv_grad=self.conv_grad, group_norm=self.group_norm,
        small_conv=self.small_conv, channel_sums=self.channel_sums, name=name)(h)
    h = layers.conv3x3(self.base_channels, dt, 'conv_in', conv_grad=self.conv_grad, small_conv=self.small_conv,
                       channel_sums=self.channel_sums)(x.astype(dt))
    cur = x.shape[1]
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = res(h, mult * self.base_channels, f'down_{level}_{i}')
        if cur in self.attn_resolutions:
          h = attn(h, f'down_{level}_{i}_attn')
      if level != len(self.channel_mult) - 1:
        h = res(h, h.shape[-1], f'down_{level}_resample', 'down')
        cur //= 2
    h = res(h, h.shape[-1], 'mid_0')
    h = attn(h, 'mid_attn')
    return res(h, h.shape[-1], 'mid_1')


_TRUNK_FIELDS = tuple(f.name for f in dataclasses.fields(ConvTrunk) if f.name not in ('parent', 'name'))


class _TrunkEncoder(ConvTrunk):
  """Both encoders: the trunk's fields, and the trunk followed by a norm + SiLU (`_features`)."""

  def _features(self, x):
    h = ConvTrunk(**{f: getattr(self, f) for f in _TRUNK_FIELDS}, name='trunk')(x)
    return layers.norm_silu(self.group_norm, self.num_groups, self.dtype, 'norm_out', self.channel_sums)(h)


class IdentityEncoder(_TrunkEncoder):
  """Enc: images [B,R,R,3] in [-1,1] -> identity embeddings [B, embed_dim] (float32)."""
  embed_dim: int = 512

  @nn.compact
  def __call__(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'encoder expects NHWC RGB images, got shape {images.shape}')
    h = self._features(images).mean(axis=(1, 2))
    return nn.Dense(self.embed_dim, dtype=self.dtype, name='proj')(h).astype(jnp.float32)


class ConditionEncoder(_TrunkEncoder):
  """Stage 2: a degraded image (plus mask channels) -> condition tokens [B, L, C] from the final map."""
  token_dim: int = 512

  @nn.compact
  def __call__(self, cond_image):
    h = self._features(cond_image)
    b, hh, ww, c = h.shape
    return nn.Dense(self.token_dim, dtype=self.dtype, name='proj')(h.reshape(b, hh * ww, c))


def aggregate_embeddings(z_refs: jax.Array) -> jax.Array:
  """Inference aggregate E(Y) = mean_j Enc(y_j) over references [R, D] -> [D]; order-invariant."""
  return jnp.mean(z_refs, axis=0)
