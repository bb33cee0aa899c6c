"""A PyTorch twin of the stage-1 models (generator U-Net and identity encoder), built from the same config,
for the benchmark's `--reference=torch`: the speed of this architecture in PyTorch on the same machine.

Same structure and parameters as `idenc_jax.models` with `group_norm='flax'` semantics (the fused norm is the
same function): every module carries the flax module's name, so `load_flax_params` copies a flax parameter
tree in by name (conv kernels HWIO -> OIHW, dense kernels transposed, attention heads flattened) and the
count of parameters is equal by construction and checked by the tests. NCHW, float32, PyTorch's own
kernels (oneDNN on x86 CPUs). Stage 2 (cross-attention, the condition encoder) is not mirrored.

torch is imported lazily (the `[eval]`/test dependency); nothing here is imported by the library.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _torch():
  import torch   # lazy: an optional dependency, for the reference only
  return torch


def _modules():
  torch = _torch()
  nn, F = torch.nn, torch.nn.functional

  class GroupNorm(nn.GroupNorm):
    """flax nn.GroupNorm: eps 1e-5, parameters 'scale' / 'bias'."""

    def __init__(self, groups: int, channels: int):
      super().__init__(groups, channels, eps=1e-5)

  class Dense(nn.Linear):
    pass

  class Conv(nn.Conv2d):
    def __init__(self, c_in: int, c_out: int, k: int = 3):
      super().__init__(c_in, c_out, k, padding=k // 2)

  def resample(h, mode: str):
    if mode == 'down':
      return F.avg_pool2d(h, 2)
    if mode == 'up':
      return F.interpolate(h, scale_factor=2, mode='nearest')
    return h

  class ResBlock(nn.Module):
    """`layers.ResBlock`: skip(x) + conv(silu(AdaGN(conv(silu(norm(x)))))), AdaGN from t and z."""

    def __init__(self, c_in: int, c_out: int, groups: int, emb_dim: int | None, cond_dim: int | None,
                 resample_mode: str = 'none'):
      super().__init__()
      self.resample = resample_mode
      self.norm_0 = GroupNorm(groups, c_in)
      self.conv_0 = Conv(c_in, c_out)
      self.emb_proj = Dense(emb_dim, 2 * c_out) if emb_dim else None
      self.cond_proj = Dense(cond_dim, c_out) if cond_dim else None
      self.norm_1 = GroupNorm(groups, c_out)
      self.conv_1 = Conv(c_out, c_out)
      self.skip = Conv(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, emb=None, cond=None, cond_keep=None):
      h = resample(F.silu(self.norm_0(x)), self.resample)
      x = resample(x, self.resample)
      h = self.norm_1(self.conv_0(h))
      if emb is not None:
        scale, shift = self.emb_proj(F.silu(emb)).chunk(2, dim=1)
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
      if cond is not None:
        s = self.cond_proj(F.silu(cond))
        if cond_keep is not None:
          s = s * cond_keep[:, None]
        h = h * (1 + s[:, :, None, None])
      h = self.conv_1(F.silu(h))
      return (x if self.skip is None else self.skip(x)) + h

  class AttentionBlock(nn.Module):
    """`layers.AttentionBlock` (self-attention): x + Attn(LN(x)), then + MLP(LN(.)) unless mlp_ratio is 0."""

    def __init__(self, c: int, heads: int, mlp_ratio: int):
      super().__init__()
      self.heads = heads
      self.ln_attn = nn.LayerNorm(c, eps=1e-6)
      self.query, self.key, self.value, self.out = Dense(c, c), Dense(c, c), Dense(c, c), Dense(c, c)
      self.mlp_ratio = mlp_ratio
      if mlp_ratio:
        self.ln_mlp = nn.LayerNorm(c, eps=1e-6)
        self.mlp_in, self.mlp_out = Dense(c, mlp_ratio * c), Dense(mlp_ratio * c, c)

    def forward(self, x):
      b, c, hh, ww = x.shape
      tokens = x.flatten(2).transpose(1, 2)                          # [B, L, C]
      h = self.ln_attn(tokens)
      split = lambda y: y.view(b, hh * ww, self.heads, c // self.heads).transpose(1, 2)
      q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
      # Written out, as `ops.attention` (xla) does, so PyTorch's flop counter sees both products.
      a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
      tokens = tokens + self.out(a.transpose(1, 2).reshape(b, hh * ww, c))
      if self.mlp_ratio:
        tokens = tokens + self.mlp_out(F.gelu(self.mlp_in(self.ln_mlp(tokens)), approximate='tanh'))
      return tokens.transpose(1, 2).reshape(b, c, hh, ww)

  class TimeEmbedding(nn.Module):
    def __init__(self, base: int, dim: int):
      super().__init__()
      self.base = base
      self.dense_0, self.dense_1 = Dense(base, dim), Dense(dim, dim)

    def forward(self, t):
      half = self.base // 2
      freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
      args = t.float()[:, None] * freqs[None]
      emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
      if self.base % 2:
        emb = F.pad(emb, (0, 1))
      return self.dense_1(F.silu(self.dense_0(emb)))

  class UNet(nn.Module):
    """`unet.UNet` for stage 1: x [B,3,R,R], t [B], z [B,D], null [B] bool or None -> eps [B,3,R,R]."""

    def __init__(self, m: Any):
      super().__init__()
      base, groups, emb = m.base_channels, m.num_groups, 4 * m.base_channels
      self.blocks = nn.ModuleDict()
      self.time_embed = TimeEmbedding(base, emb)
      self.conv_in = Conv(3, base)
      res = lambda name, ci, co, mode='none': self.blocks.add_module(
          name, ResBlock(ci, co, groups, emb, m.embed_dim, mode))
      attn = lambda name, c: self.blocks.add_module(name, AttentionBlock(c, m.num_heads, m.mlp_ratio))
      self.plan: list[tuple[str, str]] = []   # (kind, name) in forward order
      ch, cur, skips = base, m.resolution, [base]
      for level, mult in enumerate(m.channel_mult):
        for i in range(m.num_res_blocks):
          res(f'down_{level}_{i}', ch, mult * base)
          ch = mult * base
          self.plan.append(('res', f'down_{level}_{i}'))
          if cur in m.attn_resolutions:
            attn(f'down_{level}_{i}_attn', ch)
            self.plan.append(('attn', f'down_{level}_{i}_attn'))
          self.plan.append(('push', ''))
          skips.append(ch)
        if level != len(m.channel_mult) - 1:
          res(f'down_{level}_resample', ch, ch, 'down')
          self.plan += [('res', f'down_{level}_resample'), ('push', '')]
          skips.append(ch)
          cur //= 2
      res('mid_0', ch, ch)
      attn('mid_attn', ch)
      res('mid_1', ch, ch)
      self.plan += [('res', 'mid_0'), ('attn', 'mid_attn'), ('res', 'mid_1')]
      for level in reversed(range(len(m.channel_mult))):
        mult = m.channel_mult[level]
        for i in range(m.num_res_blocks + 1):
          res(f'up_{level}_{i}', ch + skips.pop(), mult * base)
          ch = mult * base
          self.plan += [('pop', ''), ('res', f'up_{level}_{i}')]
          if cur in m.attn_resolutions:
            attn(f'up_{level}_{i}_attn', ch)
            self.plan.append(('attn', f'up_{level}_{i}_attn'))
        if level != 0:
          res(f'up_{level}_resample', ch, ch, 'up')
          self.plan.append(('res', f'up_{level}_resample'))
          cur *= 2
      self.norm_out = GroupNorm(groups, ch)
      self.conv_out = Conv(ch, 3)

    def forward(self, x, t, z=None, null=None):
      emb = self.time_embed(t)
      keep = None if null is None else 1.0 - null.float()
      h = self.conv_in(x)
      stack = [h]
      for kind, name in self.plan:
        if kind == 'res':
          h = self.blocks[name](h, emb, z, keep)
        elif kind == 'attn':
          h = self.blocks[name](h)
        elif kind == 'push':
          stack.append(h)
        else:
          h = torch.cat([h, stack.pop()], dim=1)
      return self.conv_out(F.silu(self.norm_out(h)))

  class IdentityEncoder(nn.Module):
    """`encoder.IdentityEncoder`: images [B,3,R,R] -> embeddings [B, embed_dim]."""

    def __init__(self, config: Any):
      super().__init__()
      e, m = config.encoder, config.model   # the trunk takes groups and the MLP width from config.model
      base, groups, resolution, embed_dim = e.base_channels, m.num_groups, m.resolution, m.embed_dim
      self.trunk = nn.ModuleDict({'conv_in': Conv(3, base)})
      self.plan: list[tuple[str, str]] = []
      ch, cur = base, resolution
      for level, mult in enumerate(e.channel_mult):
        for i in range(e.num_res_blocks):
          self.trunk[f'down_{level}_{i}'] = ResBlock(ch, mult * base, groups, None, None)
          ch = mult * base
          self.plan.append(('res', f'down_{level}_{i}'))
          if cur in e.attn_resolutions:
            self.trunk[f'down_{level}_{i}_attn'] = AttentionBlock(ch, e.num_heads, m.mlp_ratio)
            self.plan.append(('attn', f'down_{level}_{i}_attn'))
        if level != len(e.channel_mult) - 1:
          self.trunk[f'down_{level}_resample'] = ResBlock(ch, ch, groups, None, None, 'down')
          self.plan.append(('res', f'down_{level}_resample'))
          cur //= 2
      self.trunk['mid_0'] = ResBlock(ch, ch, groups, None, None)
      self.trunk['mid_attn'] = AttentionBlock(ch, e.num_heads, m.mlp_ratio)
      self.trunk['mid_1'] = ResBlock(ch, ch, groups, None, None)
      self.plan += [('res', 'mid_0'), ('attn', 'mid_attn'), ('res', 'mid_1')]
      self.norm_out = GroupNorm(groups, ch)
      self.proj = Dense(ch, embed_dim)

    def forward(self, x):
      h = self.trunk['conv_in'](x)
      for _, name in self.plan:
        h = self.trunk[name](h)
      return self.proj(F.silu(self.norm_out(h)).mean(dim=(2, 3)))

  class Models(nn.Module):
    def __init__(self, config):
      super().__init__()
      if config.stage != 1:
        raise ValueError(f'The PyTorch reference mirrors stage 1 only, got stage {config.stage}.')
      m = config.model
      self.generator = UNet(m)
      self.encoder = IdentityEncoder(config)

  return Models


def build(config):
  """The PyTorch generator + identity encoder of a stage-1 config (`.generator`, `.encoder`), float32."""
  return _modules()(config)


def _flax_name(torch_name: str) -> tuple[str, ...]:
  """'generator.blocks.down_0_0.conv_0.weight' -> ('generator', 'down_0_0', 'conv_0', 'weight')."""
  parts = [p for p in torch_name.split('.') if p != 'blocks']
  return tuple(parts)


def load_flax_params(model, params: dict) -> None:
  """Copies flax parameters {'generator': ..., 'encoder': ...} into the PyTorch twin, by name. Every
  parameter on both sides must be used exactly once (a KeyError or ValueError names the first that is not)."""
  torch = _torch()
  flat = {}
  for part in ('generator', 'encoder'):
    def walk(node, path):
      if isinstance(node, dict):
        for k, v in node.items():
          walk(v, path + (k,))
      else:
        flat[path] = np.asarray(node, np.float32)
    walk(params[part], (part,))
  used = set()
  with torch.no_grad():
    for name, p in model.named_parameters():
      *prefix, leaf = _flax_name(name)
      module = model.get_submodule(name.rsplit('.', 1)[0])
      key = tuple(prefix) + (('scale' if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) else 'kernel')
                             if leaf == 'weight' else 'bias',)
      if key not in flat:
        raise KeyError(f'No flax parameter {"/".join(key)} for torch parameter {name}.')
      value = flat[key]
      if isinstance(module, torch.nn.Conv2d) and leaf == 'weight':
        value = value.transpose(3, 2, 0, 1)                      # HWIO -> OIHW
      elif isinstance(module, torch.nn.Linear) and leaf == 'weight':
        value = value.reshape(-1, value.shape[-1]) if prefix[-1] == 'out' else value.reshape(value.shape[0], -1)
        value = value.T                                          # [in, out] -> [out, in]
      elif isinstance(module, torch.nn.Linear) and leaf == 'bias':
        value = value.reshape(-1)                                # DenseGeneral biases [H, D] -> [H*D]
      if tuple(value.shape) != tuple(p.shape):
        raise ValueError(f'{name}: torch {tuple(p.shape)} vs flax {"/".join(key)} {value.shape}.')
      p.copy_(torch.from_numpy(np.ascontiguousarray(value)))
      used.add(key)
  unused = sorted('/'.join(k) for k in set(flat) - used)
  if unused:
    raise ValueError(f'flax parameters without a torch twin: {unused[:5]}')


def num_params(model) -> dict[str, int]:
  return {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in ('generator', 'encoder')}
