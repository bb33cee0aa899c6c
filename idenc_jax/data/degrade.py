"""Stage-2 degradations: the condition images of super-resolution and inpainting (paper sections 3.4, 4.2).

Pure numpy, deterministic given the random positions, so the input pipeline, sampling and evaluation make
exactly the same conditions.

Super-resolution by `factor` (8 in the paper: 128 -> 16 px). The target is downsampled by area averaging
(the mean of each factor x factor block), then brought back to the target size for the condition encoder by
nearest-neighbour (default) or bicubic up-sampling (`upsample`). Nearest keeps the low-resolution pixels
exactly (each block mean is replicated over its block, so the low-resolution image is recovered by block
means) and invents nothing; bicubic is the interpolation baseline the restored images are compared with.

Inpainting with `mask_fraction` (0.6 in the paper): a square hole of side round(mask_fraction * R) pixels
whose top-left corner is uniform over all positions that keep it fully inside the image. The condition is
the masked image (hole pixels set to 0 in [-1, 1] units, i.e. mid grey) plus the mask as a 4th channel
(1 inside the hole, 0 where the pixels are known).

Images are NHWC; uint8 [0, 255] or float in [-1, 1]. Conditions are float32 in [-1, 1] (mask in {0, 1}).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from idenc_jax.data import images as images_lib

TASKS = ('sr', 'inpaint')
UPSAMPLE = ('nearest', 'bicubic')


def _check_images(images: np.ndarray, name: str = 'images') -> None:
  if images.ndim != 4:
    raise ValueError(f'{name} must be NHWC [N, H, W, C], got shape {images.shape}')


# ---------------------------------------------------------------------------------------------------------
# Super-resolution.
# ---------------------------------------------------------------------------------------------------------
def downsample_area(images: np.ndarray, factor: int) -> np.ndarray:
  """Area (box) downsampling: each output pixel is the mean of a factor x factor block. [N,H,W,C] float32."""
  x = images_lib.to_float(np.asarray(images))
  _check_images(x)
  n, h, w, c = x.shape
  if factor < 1 or h % factor or w % factor:
    raise ValueError(f'sr_factor={factor} must be >= 1 and divide the image size {h}x{w}')
  return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4), dtype=np.float64
                                                                       ).astype(np.float32)


def upsample_nearest(images: np.ndarray, factor: int) -> np.ndarray:
  """Each pixel replicated over a factor x factor block: [N,h,w,C] -> [N,h*f,w*f,C] float32."""
  x = images_lib.to_float(np.asarray(images))
  _check_images(x)
  return np.repeat(np.repeat(x, factor, axis=1), factor, axis=2)


def _cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
  """Keys' cubic convolution kernel (a = -0.5, as in PIL and OpenCV)."""
  t = np.abs(t)
  return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                  np.where(t < 2, ((t - 5) * t + 8) * t * a - 4 * a, 0.0))


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of bicubic resizing along one axis (pixel centres at i + 0.5).

  Kernel support is widened by the scale when shrinking (antialiasing); taps that fall outside the image are
  dropped and the remaining weights renormalised to sum to one (PIL's convention).
  """
  scale = n_in / n_out
  support = 2.0 * max(scale, 1.0)
  stretch = max(scale, 1.0)
  centres = (np.arange(n_out) + 0.5) * scale
  m = np.zeros((n_out, n_in), np.float64)
  for i, c in enumerate(centres):
    lo, hi = max(int(math.floor(c - support)), 0), min(int(math.ceil(c + support)), n_in)
    taps = np.arange(lo, hi)
    wts = _cubic((taps + 0.5 - c) / stretch)
    m[i, lo:hi] = wts / wts.sum()
  return m


def resize_bicubic(images: np.ndarray, size: int) -> np.ndarray:
  """Bicubic resize of square images [N,h,h,C] to [N,size,size,C] (float32, not clipped)."""
  x = images_lib.to_float(np.asarray(images))
  _check_images(x)
  my = bicubic_matrix(x.shape[1], size)
  mx = bicubic_matrix(x.shape[2], size)
  return np.einsum('yh,nhwc,xw->nyxc', my, x.astype(np.float64), mx, optimize=True).astype(np.float32)


def upsample(images: np.ndarray, factor: int, method: str = 'nearest') -> np.ndarray:
  """Low-resolution images back to full size by `method` ('nearest' or 'bicubic'), clipped to [-1, 1]."""
  if method == 'nearest':
    return upsample_nearest(images, factor)
  if method == 'bicubic':
    x = images_lib.to_float(np.asarray(images))
    return np.clip(resize_bicubic(x, x.shape[1] * factor), -1.0, 1.0)
  raise ValueError(f'config.stage2.sr_upsample must be one of {UPSAMPLE}, got {method!r}')


def sr_condition(images: np.ndarray, factor: int, method: str = 'nearest') -> np.ndarray:
  """Clean images -> super-resolution condition: area-downsampled by factor, up-sampled back. [N,R,R,3]."""
  return upsample(downsample_area(images, factor), factor, method)


# ---------------------------------------------------------------------------------------------------------
# Inpainting.
# ---------------------------------------------------------------------------------------------------------
def mask_side(resolution: int, fraction: float) -> int:
  """Side of the square hole: round(fraction * resolution), at least 1 pixel."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'config.stage2.mask_fraction={fraction} must be in (0, 1)')
  return max(int(round(fraction * resolution)), 1)


def mask_positions(rng: np.random.Generator, n: int, resolution: int, side: int) -> np.ndarray:
  """Top-left corners [n, 2] (row, col), each uniform over the resolution - side + 1 valid positions."""
  return rng.integers(0, resolution - side + 1, size=(n, 2)).astype(np.int32)


def square_masks(resolution: int, side: int, positions: np.ndarray) -> np.ndarray:
  """Boolean holes [n, R, R]: True inside the side x side square whose top-left corner is positions[i]."""
  positions = np.asarray(positions)
  if positions.ndim != 2 or positions.shape[1] != 2:
    raise ValueError(f'mask positions must have shape [n, 2], got {positions.shape}')
  if (positions < 0).any() or (positions > resolution - side).any():
    raise ValueError(f'a {side}px mask at {positions.tolist()} does not fit in {resolution}px images')
  idx = np.arange(resolution)
  rows = (idx >= positions[:, :1]) & (idx < positions[:, :1] + side)   # [n, R]
  cols = (idx >= positions[:, 1:]) & (idx < positions[:, 1:] + side)
  return rows[:, :, None] & cols[:, None, :]


def inpaint_condition(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Clean images and holes [N,R,R] -> [N,R,R,4]: the image with the hole at 0 (grey), then the mask."""
  x = images_lib.to_float(np.asarray(images))
  _check_images(x)
  masks = np.asarray(masks, bool)
  if masks.shape != x.shape[:3]:
    raise ValueError(f'masks {masks.shape} do not match images {x.shape}')
  m = masks[..., None].astype(np.float32)
  return np.concatenate([x * (1.0 - m), m], axis=-1)


# ---------------------------------------------------------------------------------------------------------
# The task, from config.
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Degradation:
  """One stage-2 task at one resolution: draws its random parameters and makes conditions."""
  task: str
  resolution: int
  sr_factor: int = 8
  mask_fraction: float = 0.6
  upsample: str = 'nearest'

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f'config.stage2.task must be one of {TASKS}, got {self.task!r}')
    if self.task == 'sr':
      if self.sr_factor < 2 or self.resolution % self.sr_factor:
        raise ValueError(f'config.stage2.sr_factor={self.sr_factor} must be >= 2 and divide the '
                         f'resolution {self.resolution}')
      if self.upsample not in UPSAMPLE:
        raise ValueError(f'config.stage2.sr_upsample must be one of {UPSAMPLE}, got {self.upsample!r}')
    else:
      mask_side(self.resolution, self.mask_fraction)

  @classmethod
  def from_config(cls, config) -> 'Degradation':
    s2 = config.stage2
    return cls(s2.task, config.model.resolution, s2.sr_factor, s2.mask_fraction, s2.sr_upsample)

  @property
  def channels(self) -> int:
    return 4 if self.task == 'inpaint' else 3

  @property
  def side(self) -> int:
    return mask_side(self.resolution, self.mask_fraction)

  def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """Random parameters of n conditions: mask corners [n, 2] (inpainting) or an empty [n, 0] (SR)."""
    if self.task == 'inpaint':
      return mask_positions(rng, n, self.resolution, self.side)
    return np.zeros((n, 0), np.int32)

  def __call__(self, images: np.ndarray, params: np.ndarray | None = None) -> np.ndarray:
    """Clean images [N,R,R,3] (+ drawn params) -> conditions [N,R,R,channels] float32."""
    x = images_lib.to_float(np.asarray(images))
    _check_images(x)
    if x.shape[1:] != (self.resolution, self.resolution, 3):
      raise ValueError(f'expected [N, {self.resolution}, {self.resolution}, 3] images, got {x.shape}')
    if self.task == 'sr':
      return sr_condition(x, self.sr_factor, self.upsample)
    if params is None:
      raise ValueError('inpainting needs mask positions (Degradation.draw)')
    return inpaint_condition(x, square_masks(self.resolution, self.side, params))

  def low_resolution(self, images: np.ndarray) -> np.ndarray:
    """SR only: the low-resolution input [N, R/f, R/f, 3] float32 that the condition is made from."""
    return downsample_area(images, self.sr_factor)

  def condition_from_low_resolution(self, low: np.ndarray) -> np.ndarray:
    """SR only: a given low-resolution image [N, R/f, R/f, 3] -> condition [N, R, R, 3]."""
    x = images_lib.to_float(np.asarray(low))
    _check_images(x, 'low-resolution images')
    lr = self.resolution // self.sr_factor
    if x.shape[1:3] != (lr, lr):
      raise ValueError(f'a {self.sr_factor}x super-resolution input must be {lr}x{lr} px for a '
                       f'{self.resolution}px model, got {x.shape[1]}x{x.shape[2]}')
    return upsample(x, self.sr_factor, self.upsample)

  def baseline_from_low_resolution(self, low: np.ndarray) -> np.ndarray:
    """SR only: the interpolation baseline, low-resolution images bicubic-upsampled to full size, clipped."""
    return np.clip(resize_bicubic(low, self.resolution), -1.0, 1.0)
