"""Models: the generator U-Net, the identity encoder and the condition encoder, built from config."""

import jax
import jax.numpy as jnp

from idenc_jax.models.encoder import ConditionEncoder, IdentityEncoder
from idenc_jax.models.unet import UNet

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(config):
  name = config.model.dtype
  if name not in _DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
  return _DTYPES[name]


def cpu_choice(value: str, on_cpu: str, elsewhere: str) -> str:
  """A model field's 'auto' resolved: `on_cpu` where jax's default backend is the CPU, else `elsewhere`."""
  if value != 'auto':
    return value
  return on_cpu if jax.default_backend() == 'cpu' else elsewhere


def op_choices(m) -> dict:
  """The norm, convolution and sum levers of `config.model` as the networks take them, each 'auto' resolved for
  this process's backend (the CPU's fast forms on a CPU, XLA's own elsewhere)."""
  return dict(conv_grad=m.conv_grad, group_norm=cpu_choice(m.group_norm, 'fused', 'flax'),
              small_conv=cpu_choice(m.small_conv, 'matmul', 'xla'),
              channel_sums=cpu_choice(m.channel_sums, 'matmul', 'reduce'))


def build_generator(config) -> UNet:
  m = config.model
  return UNet(
      resolution=m.resolution, base_channels=m.base_channels, channel_mult=tuple(m.channel_mult),
      num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions),
      num_heads=m.num_heads, embed_dim=m.embed_dim, num_groups=m.num_groups, mlp_ratio=m.mlp_ratio,
      dropout=m.dropout, attention=m.attention, remat=m.remat, **op_choices(m),
      dtype=compute_dtype(config),
      cross_attn_resolutions=tuple(config.stage2.cross_attn_resolutions) if config.stage == 2 else ())


def _trunk_fields(config, channel_mult) -> dict:
  """The conv-trunk fields both encoders take from `config.encoder` and `config.model`."""
  e, m = config.encoder, config.model
  return dict(base_channels=e.base_channels, channel_mult=tuple(channel_mult), num_res_blocks=e.num_res_blocks,
              attn_resolutions=tuple(e.attn_resolutions), num_heads=e.num_heads, num_groups=m.num_groups,
              mlp_ratio=m.mlp_ratio, attention=m.attention, remat=m.remat, **op_choices(m),
              dtype=compute_dtype(config))


def build_encoder(config) -> IdentityEncoder:
  return IdentityEncoder(**_trunk_fields(config, config.encoder.channel_mult), embed_dim=config.model.embed_dim)


def condition_encoder_levels(config) -> int:
  """Levels of the encoder family the condition encoder keeps: down to stage2.token_resolution."""
  n = len(config.encoder.channel_mult)
  target = config.stage2.token_resolution
  if not target:
    return n
  r = config.model.resolution
  for level in range(n):
    if r // 2 ** level == target:
      return level + 1
  raise ValueError(f'config.stage2.token_resolution={target} is not one of the encoder levels '
                   f'{[r // 2 ** i for i in range(n)]} (or 0 for all of them).')


def build_condition_encoder(config) -> ConditionEncoder:
  channel_mult = tuple(config.encoder.channel_mult)[:condition_encoder_levels(config)]
  return ConditionEncoder(**_trunk_fields(config, channel_mult), token_dim=config.stage2.token_dim)


__all__ = ['UNet', 'IdentityEncoder', 'ConditionEncoder', 'build_generator', 'build_encoder',
           'build_condition_encoder', 'compute_dtype', 'cpu_choice', 'op_choices']
