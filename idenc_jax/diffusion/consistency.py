"""Data consistency for restoration: keep every denoised estimate x0_hat consistent with the degraded input.

The stage-2 model reads the input only through cross-attention, and the eps loss weighs an error in x0_hat
by alpha_bar / (1 - alpha_bar), about 0.004 at t = 960: the high-noise steps, which fix the image's layout
and colours, are where the input matters most and where training looks least. A sampler that trusts those
first estimates commits to their layout, and later steps keep it. Projecting each x0_hat onto the images
that agree with the input (the range-null-space idea of DDNM, Wang et al. 2022) fixes the part the input
determines at every step and leaves the rest to the model:

  sr       x0 + up(down(y) - down(x0)): each factor x factor block's mean becomes the low-res pixel
           (down = block mean, up = nearest; down(up(v)) = v, so this is the exact orthogonal projection);
  inpaint  the known pixels copied from the input, the hole kept from x0.

Conditions are those of `data.degrade` (SR: the low-res image nearest-upsampled to full size; inpainting:
the image with its hole at 0, then the mask channel, 1 = missing). Arrays are float in [-1, 1], NHWC, with
any leading axes.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from idenc_jax.diffusion.schedules import NoiseSchedule

Projector = Callable[[jax.Array, jax.Array], jax.Array]


def block_mean(x: jax.Array, factor: int) -> jax.Array:
  """[..., H, W, C] -> [..., H/f, W/f, C]: the mean of each factor x factor block."""
  *lead, h, w, c = x.shape
  return x.reshape(*lead, h // factor, factor, w // factor, factor, c).mean(axis=(-4, -2))


def upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, factor, axis=-3), factor, axis=-2)


def project_sr(x0: jax.Array, condition: jax.Array, factor: int) -> jax.Array:
  """x0 with each block mean replaced by the low-resolution pixel that the (nearest-upsampled) condition holds."""
  return x0 + upsample_nearest(block_mean(condition - x0, factor), factor)


def project_inpaint(x0: jax.Array, condition: jax.Array) -> jax.Array:
  """x0 inside the hole (mask channel > 0.5), the input's pixels outside it."""
  return jnp.where(condition[..., 3:] > 0.5, x0, condition[..., :3])


def projector(task: str, sr_factor: int = 1, sr_upsample: str = 'nearest') -> Projector:
  """The projection of `task` as fn(x0, condition) -> x0 (condition broadcast against x0)."""
  if task == 'sr':
    if sr_upsample != 'nearest':
      raise ValueError("Data consistency reads the low-res pixels from a nearest-upsampled condition; "
                       f"config.stage2.sr_upsample must be 'nearest', got {sr_upsample!r}.")
    return lambda x0, condition: project_sr(x0, condition, sr_factor)
  if task == 'inpaint':
    return project_inpaint
  raise ValueError(f"Unknown restoration task {task!r}; choose 'sr' or 'inpaint'.")


def consistent_eps_fn(eps_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: NoiseSchedule,
                      project: Callable[[jax.Array], jax.Array], clip: bool = True):
  """eps_fn whose implied x0_hat = (x - sqrt(1 - ab) eps) / sqrt(ab) is projected (after clipping to [-1, 1]
  when `clip`): returns the noise consistent with project(x0_hat), so any sampler built on eps (DDPM, DDIM,
  DPM-Solver++) runs with consistent estimates unchanged."""
  def wrapped(x, t):
    eps = eps_fn(x, t).astype(jnp.float32)
    shape = (-1,) + (1,) * (x.ndim - 1)
    r = schedule.sqrt_recip_alphas_cumprod[t].reshape(shape)
    rm1 = schedule.sqrt_recipm1_alphas_cumprod[t].reshape(shape)
    x0 = r * x - rm1 * eps
    if clip:
      x0 = jnp.clip(x0, -1.0, 1.0)
    return (r * x - project(x0)) / rm1
  return wrapped
