"""The generator: an ADM/DiffAE-style U-Net predicting noise, conditioned on an identity embedding z.

Structure (paper appendix A): a conv stem; per resolution level `num_res_blocks` residual blocks
(each followed by a ViT-style self-attention block at `attn_resolutions`) and a down-sampling
residual block; a middle of residual, attention, residual; a mirrored decoder whose levels have
`num_res_blocks + 1` blocks, each taking one skip connection; a norm, SiLU and zero-initialised conv
to the noise prediction. Every residual block sees the timestep embedding (scale/shift) and, unless
z is None (stage-0 unconditional pre-training), a multiplicative scale from z. `null_identity` [B] (bool)
drops z per sample, the same function as z=None for those samples: the unconditional branch that identity
guidance (`diffusion.guidance`) contrasts with the conditional one in a single batched call.

Stage 2 adds cross-attention blocks at `cross_attn_resolutions` (after each block of those levels)
through which the features attend to condition tokens; their outputs start at zero.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from idenc_jax.models import layers


class UNet(nn.Module):
  resolution: int
  base_channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  num_heads: int
  embed_dim: int
  num_groups: int = 32
  mlp_ratio: int = 4
  dropout: float = 0.0
  out_channels: int = 3
  cross_attn_resolutions: Sequence[int] = ()
  attention: str = 'xla'
  remat: bool = False
  conv_grad: str = 'xla'
  group_norm: str = 'flax'
  small_conv: str = 'xla'
  channel_sums: str = 'reduce'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t, z=None, context=None, *, train: bool = False, null_identity=None):
    """x: [B,R,R,C] noisy images, t: int [B] timesteps, z: [B, embed_dim] or None, context: [B,L,D],
    null_identity: [B] bool (True: that sample unconditional) or None."""
    b, r, _, _ = x.shape
    if r != self.resolution or x.shape[2] != self.resolution:
      raise ValueError(f'UNet expects {self.resolution}x{self.resolution} inputs, got {x.shape}')
    if t.shape != (b,):
      raise ValueError(f'timesteps must have shape ({b},), got {t.shape}')
    if z is not None and z.shape != (b, self.embed_dim):
      raise ValueError(f'identity embedding must have shape ({b}, {self.embed_dim}), got {z.shape}')
    if null_identity is not None and (z is None or null_identity.shape != (b,)):
      raise ValueError(f'null_identity must have shape ({b},) and go with an embedding z, '
                       f'got {getattr(null_identity, "shape", None)} with z {"None" if z is None else "given"}')
    if self.cross_attn_resolutions and context is None:
      raise ValueError('this generator has cross-attention layers and needs condition tokens')

    dt = self.dtype
    Res = layers.block_cls(layers.ResBlock, self.remat)
    Attn = layers.block_cls(layers.AttentionBlock, self.remat)
    emb = layers.TimeEmbedding(self.base_channels, 4 * self.base_channels, dt, name='time_embed')(t)
    cond = None if z is None else z.astype(dt)
    cond_keep = None if null_identity is None else 1.0 - null_identity.astype(dt)

    det = not train

    def res(h, ch, name, resample='none'):
      return Res(ch, self.num_groups, self.dropout, resample, dt, det, conv_grad=self.conv_grad,
                 group_norm=self.group_norm, small_conv=self.small_conv, channel_sums=self.channel_sums,
                 name=name)(h, emb, cond, cond_keep)

    def attn(h, name, ctx=None):
      return Attn(self.num_heads, self.mlp_ratio, self.dropout, self.attention, dt, det, name=name)(h, ctx)

    def attend(h, res_now, name):
      if res_now in self.attn_resolutions:
        h = attn(h, f'{name}_attn')
      if res_now in self.cross_attn_resolutions:
        h = attn(h, f'{name}_xattn', context)
      return h

    conv = functools.partial(layers.conv3x3, dtype=dt, conv_grad=self.conv_grad, small_conv=self.small_conv,
                             channel_sums=self.channel_sums)
    h = conv(self.base_channels, name='conv_in')(x.astype(dt))
    skips = [h]
    cur = self.resolution
    levels = len(self.channel_mult)
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = res(h, mult * self.base_channels, f'down_{level}_{i}')
        h = attend(h, cur, f'down_{level}_{i}')
        skips.append(h)
      if level != levels - 1:
        h = res(h, h.shape[-1], f'down_{level}_resample', 'down')
        cur //= 2
        skips.append(h)

    h = res(h, h.shape[-1], 'mid_0')
    h = attn(h, 'mid_attn')
    if cur in self.cross_attn_resolutions:
      h = attn(h, 'mid_xattn', context)
    h = res(h, h.shape[-1], 'mid_1')

    for level in reversed(range(levels)):
      mult = self.channel_mult[level]
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(h, mult * self.base_channels, f'up_{level}_{i}')
        h = attend(h, cur, f'up_{level}_{i}')
      if level != 0:
        h = res(h, h.shape[-1], f'up_{level}_resample', 'up')
        cur *= 2
    assert not skips and cur == self.resolution

    h = layers.norm_silu(self.group_norm, self.num_groups, dt, 'norm_out', self.channel_sums)(h)
    out = conv(self.out_channels, name='conv_out', zero=True)(h)
    return out.astype(jnp.float32)
