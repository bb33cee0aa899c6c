"""Forward FLOPs per image of the generator and the identity encoder: analytic, and from XLA.

Convention: 2 FLOPs per multiply-accumulate, as XLA's cost analysis counts convolutions and dots.
The analytic count walks the structure of `models/unet.py` and `models/encoder.py` from the config
fields. Its matrix part ("matmul") covers 3x3 and 1x1 convolutions, dense layers (timestep
embedding MLP, each residual block's timestep and identity projections, the encoder's output
projection), the attention projections, the QK^T and AV products and the attention blocks' MLPs.
Like XLA, a padded convolution counts only the kernel taps that land inside the image: a 3x3 conv
on an n x n map does (3n-2)^2 taps per channel pair, not 9n^2 (at 4x4 that is 100 against 144).
`count_padding=True` counts all 9n^2 instead, the convention of per-layer counters that multiply
output size by kernel size: with it and without the attention MLPs (DiffAE's block structure), the
paper generator comes to 138.68 GFLOP, the published 138.7.

The elementwise part (on by default, `elementwise=False` drops it) counts one FLOP per arithmetic
op per element, as XLA does, and nothing for transcendentals (XLA reports those separately):
  bias or residual add 1; mean pooling 1 per input element; nearest upsampling 0;
  GroupNorm 6 (x^2, two sums for the statistics; subtract, scale, shift);
  LayerNorm 7 (the same, plus one more multiply: its rsqrt(var) x scale is per token and channel);
  SiLU 4 (negate, add, divide for the sigmoid; multiply); tanh-GELU 8; softmax 4 (max, subtract,
  sum, divide); the AdaGN scale-shift 2 and the identity scale 1.
It is 0.5% of the paper generator but 5% of the tiny test model.

Training FLOPs per image take forward + backward as 3x forward: the backward pass of every dot and
convolution is two products of the forward's size (input gradient and weight gradient).
"""

from typing import Any, Callable

import jax

_GROUP_NORM, _LAYER_NORM, _SILU, _GELU, _SOFTMAX = 6, 7, 4, 8, 4
_FAST_CPU_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


class _Tally:
  """Accumulates matrix FLOPs and elementwise FLOPs separately."""

  def __init__(self, count_padding: bool = False):
    self.matmul = 0
    self.elementwise = 0
    self.count_padding = count_padding

  def dense(self, tokens: int, d_in: int, d_out: int):
    """A dense layer with bias on `tokens` rows."""
    self.matmul += 2 * tokens * d_in * d_out
    self.elementwise += tokens * d_out

  def conv(self, size: int, c_in: int, c_out: int, kernel: int):
    """A stride-1 'same' conv with bias on a size x size map."""
    taps = size * kernel if self.count_padding else _valid_taps(size, kernel)
    self.matmul += 2 * c_in * c_out * taps ** 2
    self.elementwise += size * size * c_out

  def ew(self, elements: int, per_element: int = 1):
    self.elementwise += per_element * elements


def _valid_taps(n: int, k: int) -> int:
  """Kernel taps of a stride-1, 'same'-padded size-k window that fall inside a length-n axis."""
  p = (k - 1) // 2
  return sum(1 for i in range(n) for j in range(-p, k - p) if 0 <= i + j < n)


def _res_block(t: _Tally, size_in: int, c_in: int, c_out: int, resample: str = 'none',
               emb_dim: int = 0, cond_dim: int = 0) -> None:
  """One `layers.ResBlock`; emb_dim/cond_dim 0 when the block gets no timestep/identity embedding."""
  size = {'none': size_in, 'down': size_in // 2, 'up': size_in * 2}[resample]
  n_in, n_out = size_in * size_in * c_in, size * size * c_out
  t.ew(n_in, _GROUP_NORM + _SILU)
  if resample == 'down':   # mean pooling of both the branch and the skip path
    t.ew(2 * n_in)
  t.conv(size, c_in, c_out, 3)
  t.ew(n_out, _GROUP_NORM)
  if emb_dim:
    t.ew(emb_dim, _SILU)
    t.dense(1, emb_dim, 2 * c_out)
    t.ew(c_out + 2 * n_out)       # 1 + scale, then h * (1 + scale) + shift
  if cond_dim:
    t.ew(cond_dim, _SILU)
    t.dense(1, cond_dim, c_out)
    t.ew(c_out + n_out)           # h * (1 + cond_scale)
  t.ew(n_out, _SILU)
  t.conv(size, c_out, c_out, 3)
  if c_in != c_out:
    t.conv(size, c_in, c_out, 1)
  t.ew(n_out)                     # residual add


def _attention_block(t: _Tally, size: int, c: int, num_heads: int, mlp_ratio: int) -> None:
  """One `layers.AttentionBlock` (self-attention) on a size x size map."""
  tokens = size * size
  n = tokens * c
  t.ew(n, _LAYER_NORM)
  for _ in range(3):              # query, key, value
    t.dense(tokens, c, c)
  t.matmul += 2 * 2 * tokens * tokens * c      # QK^T and AV, summed over heads (heads x head_dim = c)
  t.ew(num_heads * tokens * tokens, 1 + _SOFTMAX)   # logit scaling, softmax
  t.dense(tokens, c, c)           # output projection
  t.ew(n)                         # residual add
  if mlp_ratio:
    t.ew(n, _LAYER_NORM)
    t.dense(tokens, c, mlp_ratio * c)
    t.ew(mlp_ratio * n, _GELU)
    t.dense(tokens, mlp_ratio * c, c)
    t.ew(n)


def _check_levels(name: str, resolution: int, channel_mult) -> None:
  if resolution % 2 ** (len(channel_mult) - 1):
    raise ValueError(f'{name}.channel_mult has {len(channel_mult)} levels, too many to halve '
                     f'model.resolution={resolution} at each')


def _total(t: _Tally, elementwise: bool) -> int:
  return t.matmul + (t.elementwise if elementwise else 0)


def generator_flops(config, *, conditional: bool | None = None, elementwise: bool = True,
                    count_padding: bool = False) -> int:
  """Forward FLOPs per image of the stage-0/1 generator (`models.build_generator`).

  conditional: whether the generator gets an identity embedding z (adds each block's identity
  projection); defaults to `config.stage != 0`. Stage-2 cross-attention is not counted.
  elementwise: add the elementwise ops (see the module docstring) to the matrix FLOPs.
  count_padding: count every tap of a padded convolution (output size x kernel size), as per-layer
  counters that ignore padding do; the published reference sizes follow this convention.
  """
  m = config.model
  if conditional is None:
    conditional = config.stage != 0
  b, mults, nres = m.base_channels, tuple(m.channel_mult), m.num_res_blocks
  _check_levels('model', m.resolution, mults)
  t = _Tally(count_padding)
  emb, cond = 4 * b, (m.embed_dim if conditional else 0)
  res = lambda size, ci, co, rs='none': _res_block(t, size, ci, co, rs, emb, cond)
  attn = lambda size, c: _attention_block(t, size, c, m.num_heads, m.mlp_ratio)

  t.dense(1, b, emb)              # timestep embedding MLP (the sinusoid itself is negligible)
  t.ew(emb, _SILU)
  t.dense(1, emb, emb)
  size = m.resolution
  t.conv(size, 3, b, 3)
  ch, skips = b, [b]
  for level, mult in enumerate(mults):
    for _ in range(nres):
      res(size, ch, mult * b)
      ch = mult * b
      if size in m.attn_resolutions:
        attn(size, ch)
      skips.append(ch)
    if level != len(mults) - 1:
      res(size, ch, ch, 'down')
      size //= 2
      skips.append(ch)
  res(size, ch, ch)
  attn(size, ch)
  res(size, ch, ch)
  for level in reversed(range(len(mults))):
    for _ in range(nres + 1):
      c_in = ch + skips.pop()     # concatenated skip connection
      ch = mults[level] * b
      res(size, c_in, ch)
      if size in m.attn_resolutions:
        attn(size, ch)
    if level != 0:
      res(size, ch, ch, 'up')
      size *= 2
  t.ew(size * size * ch, _GROUP_NORM + _SILU)
  t.conv(size, ch, 3, 3)
  return _total(t, elementwise)


def encoder_flops(config, *, elementwise: bool = True, count_padding: bool = False) -> int:
  """Forward FLOPs per image of the identity encoder (`models.build_encoder`) at model.resolution.

  elementwise, count_padding: as for `generator_flops`.
  """
  e, m = config.encoder, config.model
  b, mults = e.base_channels, tuple(e.channel_mult)
  _check_levels('encoder', m.resolution, mults)
  t = _Tally(count_padding)
  attn = lambda size, c: _attention_block(t, size, c, e.num_heads, m.mlp_ratio)
  size = m.resolution
  t.conv(size, 3, b, 3)
  ch = b
  for level, mult in enumerate(mults):
    for _ in range(e.num_res_blocks):
      _res_block(t, size, ch, mult * b)
      ch = mult * b
      if size in e.attn_resolutions:
        attn(size, ch)
    if level != len(mults) - 1:
      _res_block(t, size, ch, ch, 'down')
      size //= 2
  _res_block(t, size, ch, ch)
  attn(size, ch)
  _res_block(t, size, ch, ch)
  t.ew(size * size * ch, _GROUP_NORM + _SILU + 1)   # norm, SiLU, global average pool
  t.dense(1, ch, m.embed_dim)
  return _total(t, elementwise)


def training_flops_per_image(config, *, elementwise: bool = True, count_padding: bool = False) -> int:
  """Forward + backward per training image as 3 x forward, of generator and encoder.

  Stage 0 trains the unconditional generator alone, so the encoder is left out there. elementwise,
  count_padding: as for `generator_flops` (both False: the convention of PyTorch's flop counter).
  """
  gen = generator_flops(config, elementwise=elementwise, count_padding=count_padding)
  enc = 0 if config.stage == 0 else encoder_flops(config, elementwise=elementwise, count_padding=count_padding)
  return 3 * (gen + enc)


def xla_forward_flops(fn: Callable[..., Any], *abstract_args, compile: bool = True) -> float:
  """FLOPs XLA's cost analysis assigns to `fn` (arguments may be ShapeDtypeStructs).

  compile=True analyses the optimised, compiled executable; False analyses the lowered module
  before optimisation, with the same counting rules and no backend compile (seconds faster at 128px).
  """
  lowered = jax.jit(fn).lower(*abstract_args)
  if compile:
    # The executable never runs: on CPU, skip LLVM's optimisation (30% of compile time at 128px);
    # it does not touch the optimised HLO that the cost analysis reads.
    options = _FAST_CPU_COMPILE if jax.default_backend() == 'cpu' else None
    cost = lowered.compile(options).cost_analysis()
  else:
    cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older jax: one dict per computation
    cost = cost[0] if cost else None
  if not cost:
    raise RuntimeError(f'XLA gave no cost analysis for {getattr(fn, "__name__", fn)!r}')
  return float(cost.get('flops', 0.0))   # the key is absent when nothing was counted
