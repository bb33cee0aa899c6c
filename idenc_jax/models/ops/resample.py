"""2x resampling of NHWC maps for the ResBlocks: 2x2 mean pooling, and nearest-neighbour upsampling whose
gradient is one elementwise pass over the four strided quarters of the larger map.

`jnp.repeat`'s own gradient is a reduction over two non-adjacent axes of 2. XLA:CPU fuses it with its producers
into a library reduction that, in the 128 px model's train step, took 135 ms for one 64 -> 128 px upsampling
whose four-quarter sum takes under 1 ms alone (docs/performance.md). The same sums, added in one fixed order:
equal to XLA's to float32 rounding (tests/test_resample.py checks both directions against numpy). The pooling
stays a reduction: as a four-quarter sum XLA fused it into the transposed copy that the next convolution's
kernel gradient reads, which then took 59 ms instead of 4.
"""

import jax
import jax.numpy as jnp


def downsample2x(x: jax.Array) -> jax.Array:
  """[B, 2H, 2W, C] -> [B, H, W, C]: the mean of each 2x2 block."""
  b, hh, ww, c = x.shape
  if hh % 2 or ww % 2:
    raise ValueError(f'2x2 mean pooling needs an even map, got {hh}x{ww}')
  return x.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))


def _repeat2x(h: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], each pixel copied into its 2x2 block."""
  b, hh, ww, c = h.shape
  return jnp.broadcast_to(h[:, :, None, :, None, :], (b, hh, 2, ww, 2, c)).reshape(b, 2 * hh, 2 * ww, c)


def _sum2x2(g: jax.Array) -> jax.Array:
  """[B, 2H, 2W, C] -> [B, H, W, C], the sum of each 2x2 block, as three adds of strided quarters."""
  return ((g[:, 0::2, 0::2] + g[:, 0::2, 1::2]) + g[:, 1::2, 0::2]) + g[:, 1::2, 1::2]


@jax.custom_vjp
def upsample2x(h: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling; its gradient sums each 2x2 block."""
  return _repeat2x(h)


upsample2x.defvjp(lambda h: (_repeat2x(h), None), lambda _, g: (_sum2x2(g),))
