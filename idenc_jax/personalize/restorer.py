"""Personalized restoration (stage 2): a degraded photo + reference photos of the person -> restored photos.

Python API (the style of `personalize.Personalizer`, which it wraps):

  r = Restorer.from_workdir(config, workdir)          # a stage-2 checkpoint (config.stage == 2)
  z = r.personalizer.embed(['a.jpg', 'b.png'])        # identity from references: E(Y) = mean_j Enc(y_j)
  cond = r.degrade(clean_uint8_images, seed=0)        # clean [N, R, R, 3] -> conditions [N, R, R, C]
  cond = r.condition_from_input(low_res_or_masked, mask=None)[None]   # or a degraded input as given
  out = r.restore(z, cond, num=4, sampler='ddim', steps=50, seed=0)   # uint8 [N, 4, R, R, 3]
  out = r.restore(z, cond, num=4, consistent=True)   # data consistency inside the sampler (see below)

Conditions are those of `data.degrade` (the training pipeline's): for 'sr' the low-resolution image
((R/sr_factor)^2 px) brought back to R px by config.stage2.sr_upsample, for 'inpaint' the masked image
(hole at 0 = grey in [-1, 1]) plus the mask channel (1 = missing).

Data consistency (`diffusion.consistency`, not the paper's method, an option): with `consistent=True` every
denoised estimate inside the sampler keeps what the input fixes (the low-res block means, the known pixels);
`project` applies the same projection once, after sampling. Both need sr_upsample='nearest' for SR.

The command line (`--mode=sample` on a stage-2 config) is `sample_mode.restore_from_config`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from idenc_jax import models
from idenc_jax.data import degrade as degrade_lib
from idenc_jax.data import images as images_lib
from idenc_jax.diffusion import consistency
from idenc_jax.personalize.personalizer import Personalizer, load_workdir_params, map_in_chunks


class Restorer:
  """Stage-2 restoration: condition tokens from a degraded image, identity from references."""

  def __init__(self, config, params: dict, *, check: bool = True):
    if config.stage != 2:
      raise ValueError(f'Restoration needs a stage-2 config (configs/base.py:sr or :inpaint); got stage '
                       f'{config.stage}.')
    if 'cond_encoder' not in params:
      raise ValueError("The checkpoint has no 'cond_encoder' parameters: it is not a stage-2 checkpoint.")
    self.personalizer = Personalizer(config, params, check=check)
    self.config = config
    self.resolution = config.model.resolution
    self.degradation = degrade_lib.Degradation.from_config(config)
    cond_encoder = models.build_condition_encoder(config)
    if check:
      expected = jax.eval_shape(
          lambda: cond_encoder.init(jax.random.key(0), jnp.zeros((1, self.resolution, self.resolution,
                                                                  self.degradation.channels))))['params']
      want = jax.tree.map(lambda a: a.shape, expected)
      got = jax.tree.map(np.shape, params['cond_encoder'])
      if want != got:
        raise ValueError('The checkpoint\'s cond_encoder does not match this config (task '
                         f'{config.stage2.task!r}, token_resolution {config.stage2.token_resolution}); pass '
                         'the config it was trained with.')
    self._tokens = jax.jit(lambda p, c: cond_encoder.apply({'params': p}, c),
                           compiler_options=self.personalizer.compiler_options)

  @functools.cached_property
  def projector(self) -> consistency.Projector:
    """This task's data-consistency projection fn(x0, condition): built on first use (SR with bicubic
    conditions has none), then one object, so the compiled samplers keyed on it are reused."""
    deg = self.degradation
    return consistency.projector(deg.task, deg.sr_factor, deg.upsample)

  @classmethod
  def from_workdir(cls, config, workdir: str) -> 'Restorer':
    params = load_workdir_params(workdir, 'train stage 2 first (--config.init_from=STAGE1_WORKDIR)')
    return cls(config, params)

  # ---- Conditions. ----
  def degrade(self, clean: np.ndarray, seed: int = 0) -> np.ndarray:
    """Clean uint8 images [N, R, R, 3] -> conditions [N, R, R, C]; inpainting holes drawn from `seed`."""
    params = self.degradation.draw(np.random.default_rng(seed), len(clean))
    return self.degradation(clean, params)

  def condition_from_input(self, image: Any, mask: Any = None) -> np.ndarray:
    """A degraded input as given -> one condition [R, R, C].

    sr: uint8 RGB (or PIL image / path) of (R/f)x(R/f) px. inpaint: uint8 RGBA of RxR (alpha < 128 =
    missing), or RGB plus `mask` (RxR; nonzero/white = missing).
    """
    deg, r = self.degradation, self.resolution
    im = images_lib.open_image(image, 'Degraded input image') if isinstance(image, (str, os.PathLike)) else image
    arr = np.asarray(im)
    if deg.task == 'sr':
      rgb = images_lib.rgb_array(im if isinstance(im, Image.Image) else Image.fromarray(arr), 'Degraded input image')
      return deg.condition_from_low_resolution(rgb[None])[0]
    if arr.shape[:2] != (r, r):
      raise ValueError(f'An inpainting input must be {r}x{r} px (the model resolution), got '
                       f'{arr.shape[1]}x{arr.shape[0]}; or pass a clean photo with condition_is_clean.')
    if mask is None:
      if arr.ndim != 3 or arr.shape[-1] != 4:
        raise ValueError('An inpainting input needs its hole: an RGBA image (alpha < 128 = missing) or a '
                         'mask image (config.sample.mask, white = missing).')
      hole = arr[..., 3] < 128
    else:
      if isinstance(mask, (str, os.PathLike)):
        mask = images_lib.open_image(mask, 'Mask image').convert('L')
      m = np.asarray(mask)
      if m.ndim == 3:
        m = m[..., 0]
      if m.shape != (r, r):
        raise ValueError(f'The mask must be {r}x{r} px, got {m.shape[1]}x{m.shape[0]}.')
      hole = m > (127 if m.dtype == np.uint8 else 0.5)
    rgb = images_lib.rgb_array(Image.fromarray(arr), 'Degraded input image')
    return degrade_lib.inpaint_condition(rgb[None], hole[None])[0]

  def show(self, conditions: np.ndarray) -> np.ndarray:
    """What the model sees, as uint8 RGB [N, R, R, 3]: the up-sampled low-res image or the grey-hole image."""
    return images_lib.to_uint8(np.asarray(conditions)[..., :3])

  def project(self, images: np.ndarray, conditions: np.ndarray) -> np.ndarray:
    """Data consistency after sampling: the restored images with what the input fixes put back (sr: each
    factor x factor block's mean replaced by the low-res pixel; inpaint: the known pixels copied from the
    input). uint8 images [N, ..., R, R, 3] (conditions [N, R, R, C], broadcast over the middle axes) -> uint8."""
    x = images_lib.to_float(images)
    c = np.asarray(conditions, np.float32).reshape((len(conditions),) + (1,) * (x.ndim - 4) + conditions.shape[1:])
    out = self.projector(jnp.asarray(x), jnp.asarray(c))
    return images_lib.to_uint8(np.clip(np.asarray(out), -1.0, 1.0))

  def tokens(self, conditions: np.ndarray) -> np.ndarray:
    c = np.asarray(conditions, np.float32)
    want = (self.resolution, self.resolution, self.degradation.channels)
    if c.ndim != 4 or c.shape[1:] != want:
      raise ValueError(f'conditions must have shape [N, {", ".join(map(str, want))}], got {c.shape}.')
    return np.asarray(self._tokens(self.personalizer.params['cond_encoder'], jnp.asarray(c)))

  # ---- Restoration. ----
  def restore_batch(self, zs: np.ndarray, conditions: np.ndarray, num: int = 1, *, sampler: str = 'ddim',
                    steps: int | None = 50, eta: float = 0.0, seed: int = 0, consistent: bool = False,
                    max_images_per_call: int = 64, guidance: float | None = None) -> np.ndarray:
    """Condition i restored with identity zs[i]: zs [N, D], conditions [N, R, R, C] -> uint8
    [N, num, R, R, 3]. Row i uses seed `seed + i`, whatever the chunking. consistent: data consistency
    inside the sampler (module docstring). guidance: identity guidance weight (None: config.sample.guidance)."""
    zs = np.asarray(zs, np.float32)
    conditions = np.asarray(conditions, np.float32)
    n = len(zs)
    if n != len(conditions) or n == 0:
      raise ValueError(f'{n} embeddings for {len(conditions)} conditions (need the same number, >= 1).')
    chunk = max(1, min(n, max_images_per_call // max(num, 1)))

    def restore_chunk(idx):
      dc = dict(project=self.projector, conditions=conditions[idx]) if consistent else {}
      return self.personalizer.generate_batch(zs[idx], num, sampler=sampler, steps=steps, eta=eta,
                                              seeds=seed + idx, context=self.tokens(conditions[idx]),
                                              guidance=guidance, **dc)
    label = f'restoring: {n * num} images, {sampler} {steps or "all"} steps'
    with self.personalizer.sampling_bar(label, -(-n // chunk), sampler, steps):
      return map_in_chunks(restore_chunk, n, chunk)

  def restore(self, z: np.ndarray, conditions: np.ndarray, num: int = 1, **kw) -> np.ndarray:
    """Every condition [N, R, R, C] restored as the identity with embedding z [D]: uint8 [N, num, R, R, 3]."""
    z = np.asarray(z, np.float32)
    if z.shape != (self.personalizer.embed_dim,):
      raise ValueError(f'Embedding must have shape [{self.personalizer.embed_dim}], got {z.shape}.')
    return self.restore_batch(np.broadcast_to(z, (len(conditions),) + z.shape), conditions, num, **kw)
