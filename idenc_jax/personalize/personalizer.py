"""Personalization: reference photos -> identity embedding -> new images of that person.

Python API:

  p = Personalizer.from_workdir(config, workdir)        # EMA parameters of the latest checkpoint
  z = p.embed(['a.jpg', 'b.png'])                       # or uint8 arrays / PIL images / a folder path
  images = p.generate(z, 8, sampler='dpmpp', steps=25, seed=0)   # uint8 [8, R, R, 3]
  save_embedding('me.npy', z); z = load_embedding('me.npy', config.model.embed_dim)

`embed` takes any number >= 1 of references of any size, colour or grey. Each is aligned with dlib when
`config.sample.align` (as `python -m idenc_jax.prepare --align` does), else its largest centred square is
taken; then it is resized to the model resolution with Lanczos. The embedding is E(Y) = mean_j Enc(y_j), so
it does not depend on the order of the references.

Command line (`--mode=sample`):

  python -m idenc_jax.main --config=configs/base.py:cpu --workdir=TRAINED --mode=sample \
      --config.sample.refs=PHOTOS_DIR --config.sample.num=8 --config.sample.out=OUT

writes OUT/sample_000.png ..., OUT/grid.png (references on the left, samples on the right) and
OUT/embedding.npy. `config.sample.refs` may instead name a saved `.npy` embedding, which skips the photos
(the grid then holds only the samples). OUT defaults to WORKDIR/personalized.

Conditional tasks (stage 2) pass condition tokens to `generate(..., context=...)`; on a stage-2 config
`--mode=sample` hands over to `restore.restore_from_config`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from idenc_jax import models
from idenc_jax.data import images as images_lib
from idenc_jax.data import align as align_lib
from idenc_jax.diffusion import consistency, samplers, schedules
from idenc_jax.diffusion import generate as generate_lib
from idenc_jax.train import checkpoint as ckpt_lib

ImageLike = Any   # str | os.PathLike | PIL.Image.Image | np.ndarray (uint8 [H, W], [H, W, 1|3|4])


# ---------------------------------------------------------------------------------------------------------
# Reading references.
# ---------------------------------------------------------------------------------------------------------
def list_reference_files(folder: str | os.PathLike) -> list[str]:
  """Image files directly in `folder` (by extension, hidden files skipped), sorted by name."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'Reference folder not found: {folder}')
  files = sorted(f for f in os.listdir(folder)
                 if not f.startswith('.') and os.path.splitext(f)[1].lower() in images_lib.IMAGE_EXTENSIONS
                 and os.path.isfile(os.path.join(folder, f)))
  if not files:
    raise FileNotFoundError(f'Reference folder {folder} holds no images (looked for '
                            f'{", ".join(sorted(images_lib.IMAGE_EXTENSIONS))}).')
  return [os.path.join(folder, f) for f in files]


def _expand(images: ImageLike | Sequence[ImageLike]) -> tuple[list[Any], list[str]]:
  """A folder path, one image, a list of images or a uint8 batch [N, H, W, C] -> (items, names)."""
  if isinstance(images, (str, os.PathLike)):
    if os.path.isdir(images):
      files = list_reference_files(images)
      return files, files
    return [images], [os.fspath(images)]
  if isinstance(images, Image.Image):
    return [images], ['reference #0']
  if isinstance(images, np.ndarray) and images.ndim in (2, 3) and not (images.ndim == 3 and images.shape[-1] > 4):
    return [images], ['reference #0']
  items = list(images)
  if not items:
    raise ValueError('No reference images given: embed() needs at least one.')
  names = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f'reference #{i}' for i, x in enumerate(items)]
  return items, names


def _to_rgb(item: Any, name: str) -> np.ndarray:
  if isinstance(item, (str, os.PathLike)):
    return images_lib.read_rgb(item, 'reference image')
  if isinstance(item, Image.Image):
    return np.asarray(item.convert('RGB'))
  try:
    return align_lib.as_rgb_uint8(np.asarray(item))
  except ValueError as e:
    raise ValueError(f'{name}: {e}') from e


# ---------------------------------------------------------------------------------------------------------
# Embeddings on disk.
# ---------------------------------------------------------------------------------------------------------
def save_embedding(path: str | os.PathLike, z: np.ndarray) -> None:
  """Saves an identity embedding [D] as float32 .npy (reusable without the photos)."""
  z = np.asarray(z, np.float32)
  if z.ndim != 1:
    raise ValueError(f'An identity embedding is a vector [D], got shape {z.shape}.')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.save(path, z)


def load_embedding(path: str | os.PathLike, embed_dim: int | None = None) -> np.ndarray:
  """Loads an embedding saved by `save_embedding`; checks it is a finite vector of `embed_dim` entries."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Embedding file not found: {path}')
  try:
    z = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ValueError(f'Cannot read embedding {path} as a .npy array: {e}') from e
  if z.ndim != 1 or (embed_dim is not None and z.shape[0] != embed_dim):
    want = f'[{embed_dim}]' if embed_dim is not None else '[D]'
    raise ValueError(f'Embedding {path} has shape {z.shape}; this model takes {want} (config.model.embed_dim).')
  if not np.all(np.isfinite(z)):
    raise ValueError(f'Embedding {path} contains NaN or inf.')
  return z.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# The API.
# ---------------------------------------------------------------------------------------------------------
def check_params(config, params: dict) -> None:
  """Raises a ValueError naming the first parameter whose shape differs from the model `config` builds."""
  from idenc_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  expected = jax.eval_shape(lambda r: state_lib.init_params(config, r), jax.random.key(0))
  for part in ('generator', 'encoder'):
    if part not in params:
      raise ValueError(f'The checkpoint has no {part!r} parameters (a stage-0 checkpoint cannot personalize).')
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected[part])}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params[part])}
    for k in sorted(set(want) | set(got)):
      if want.get(k) != got.get(k):
        raise ValueError(f'The checkpoint does not match this config: {part}{k} is {got.get(k)} in the '
                         f'checkpoint but {want.get(k)} in the model; pass the config it was trained with.')


def load_references(images: ImageLike | Sequence[ImageLike], resolution: int, *, align: bool = False,
                    aligner: Any = None) -> np.ndarray:
  """References (a folder, paths, PIL images or uint8 arrays of any size, colour or grey) ->
  uint8 [R, resolution, resolution, 3].

  align: cut the largest face out with dlib as the training data was prepared (FaceAligner; `aligner` reuses
  one); a reference without a detectable face is a ValueError naming it. Otherwise the largest centred
  square is taken. Either way the result is resized to `resolution` with Lanczos.
  """
  items, names = _expand(images)
  if align and aligner is None:
    aligner = align_lib.FaceAligner(size=resolution)
  out = []
  for item, name in zip(items, names):
    rgb = _to_rgb(item, name)
    if align:
      aligned = aligner.align(rgb)
      if aligned is None:
        raise ValueError(f'No face found in reference {name} (config.sample.align=True); use a photo '
                         'where the face is clearly visible, or turn alignment off.')
      rgb = aligned
    out.append(np.asarray(images_lib.center_crop_resize(Image.fromarray(rgb), resolution)))
  return np.stack(out)


# Compiled model calls, shared by every Personalizer of the same architecture (e.g. the ablation variants).
_COMPILED: dict[tuple, Any] = {}


def _model_key(config) -> str:
  return config.model.to_json() + config.encoder.to_json() + config.diffusion.to_json() + str(config.stage)


class Personalizer:
  """Identity embeddings from reference images, and personalized generation, with jitted model calls."""

  def __init__(self, config, params: dict, *, check: bool = True):
    """`params`: {'generator', 'encoder', ...} (EMA parameters of a stage >= 1 checkpoint)."""
    if check:
      check_params(config, params)
    self.config = config
    self.params = jax.tree.map(jnp.asarray, params)
    self.resolution = config.model.resolution
    self.embed_dim = config.model.embed_dim
    self.generator = models.build_generator(config)
    self.encoder = models.build_encoder(config)
    self.schedule = schedules.from_config(config)
    # Every generation starts at this timestep (config.diffusion.sample_start_t; -1 = T - 1).
    self.start_t = samplers.check_start_t(config.diffusion.sample_start_t, self.schedule.timesteps)
    self._key = _model_key(config)
    if (self._key, 'encode') not in _COMPILED:
      encoder = self.encoder
      _COMPILED[self._key, 'encode'] = jax.jit(lambda p, x: encoder.apply({'params': p}, x))
    self._encode = _COMPILED[self._key, 'encode']
    self._aligner = None

  @classmethod
  def from_workdir(cls, config, workdir: str) -> 'Personalizer':
    """EMA parameters of the latest checkpoint in `workdir` (FileNotFoundError naming it when none)."""
    try:
      params = ckpt_lib.load_params(workdir, ema=True)
    except FileNotFoundError as e:
      raise FileNotFoundError(f'Workdir {workdir} has no checkpoint to personalize with; train first '
                              f'(python -m idenc_jax.main --mode=train --workdir={workdir}). ({e})') from e
    return cls(config, params)

  # ---- References -> embedding. ----
  def preprocess(self, images: ImageLike | Sequence[ImageLike], *, align: bool | None = None) -> np.ndarray:
    """`load_references` at the model resolution; align defaults to config.sample.align."""
    align = self.config.sample.align if align is None else align
    if align and self._aligner is None:
      self._aligner = align_lib.FaceAligner(size=self.resolution)
    return load_references(images, self.resolution, align=align, aligner=self._aligner)

  def encode(self, images: ImageLike | Sequence[ImageLike], *, align: bool | None = None) -> np.ndarray:
    """Per-reference encoder outputs Enc(y_j): [R, D] float32."""
    refs = self.preprocess(images, align=align)
    x = images_lib.to_float(jnp.asarray(refs))
    return np.asarray(self._encode(self.params['encoder'], x), np.float32)

  def embed(self, images: ImageLike | Sequence[ImageLike], *, align: bool | None = None) -> np.ndarray:
    """The identity embedding E(Y) = mean_j Enc(y_j) of R >= 1 references: [D] float32."""
    return self.encode(images, align=align).mean(axis=0)

  # ---- Embedding -> images. ----
  def _generate_fn(self, num: int, sampler: str, steps: int | None, eta: float, with_context: bool,
                   project: consistency.Projector | None = None):
    key = (self._key, 'generate', num, sampler, steps, float(eta), self.start_t, with_context, project)
    if key not in _COMPILED:
      generator, schedule, start_t = self.generator, self.schedule, self.start_t

      def one(gen_params, z, rng, context, condition):
        return generate_lib.generate(generator, gen_params, schedule, z, rng, num=num, sampler=sampler,
                                 num_steps=steps, eta=eta, start_t=start_t, context=context,
                                 condition=condition, project=project)
      # vmapped over identities: one compiled call generates for a batch of embeddings.
      _COMPILED[key] = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0 if with_context else None,
                                                      0 if project is not None else None)))
    return _COMPILED[key]

  @staticmethod
  def _check_sampler(sampler: str, steps: int | None, eta: float):
    if sampler not in samplers.SAMPLERS:
      raise ValueError(f'Unknown sampler {sampler!r}; choose from {list(samplers.SAMPLERS)}.')
    if sampler != 'ddim' and eta:
      raise ValueError(f'eta applies to the ddim sampler only; got eta={eta} with {sampler!r}.')
    if sampler != 'ddpm' and steps is None:
      raise ValueError(f'Sampler {sampler!r} needs a number of steps.')

  def generate_batch(self, zs: np.ndarray, num: int, *, sampler: str = 'ddim', steps: int | None = 50,
                     eta: float = 0.0, seeds: Sequence[int] | np.ndarray = None, context: np.ndarray | None = None,
                     generator_params: Any = None, project: consistency.Projector | None = None,
                     conditions: np.ndarray | None = None) -> np.ndarray:
    """`num` images for each of I embeddings zs [I, D] -> uint8 [I, num, res, res, 3].

    Identity i uses rng key(seeds[i]) (default seeds 0..I-1), so row i equals `generate(zs[i], seed=seeds[i])`.
    steps=None with 'ddpm' visits every timestep from `start_t` down. context: stage-2 condition tokens
    [I, L, C], or None.
    generator_params: other generator parameters (e.g. fine-tuned ones) in place of the checkpoint's.
    project, conditions: data consistency for restoration (`diffusion.consistency`; one projector object per
    compiled sampler, so keep it), with the degraded inputs [I, res, res, C].
    """
    self._check_sampler(sampler, steps, eta)
    if (project is None) != (conditions is None):
      raise ValueError('Data consistency needs both a projector and the degraded inputs (conditions).')
    zs = np.asarray(zs, np.float32)
    if zs.ndim != 2 or zs.shape[1] != self.embed_dim:
      raise ValueError(f'Embeddings must have shape [I, {self.embed_dim}], got {zs.shape}.')
    r = self.resolution
    if conditions is not None and (np.ndim(conditions) != 4 or np.shape(conditions)[:3] != (len(zs), r, r)):
      raise ValueError(f'conditions must have shape [{len(zs)}, {r}, {r}, C], got {np.shape(conditions)}.')
    if num < 1:
      raise ValueError(f'num must be >= 1, got {num}.')
    seeds = np.arange(len(zs)) if seeds is None else np.asarray(seeds)
    if seeds.shape != (len(zs),):
      raise ValueError(f'seeds must have one entry per embedding ({len(zs)}), got shape {seeds.shape}.')
    rngs = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    fn = self._generate_fn(num, sampler, steps, eta, context is not None, project)
    gen = self.params['generator'] if generator_params is None else generator_params
    out = fn(gen, jnp.asarray(zs), rngs, None if context is None else jnp.asarray(context),
             None if conditions is None else jnp.asarray(conditions, jnp.float32))
    return images_lib.to_uint8(out)

  def generate(self, z: np.ndarray, num: int, *, sampler: str = 'ddim', steps: int | None = 50, eta: float = 0.0,
               seed: int = 0, context: np.ndarray | None = None, generator_params: Any = None) -> np.ndarray:
    """`num` images of the identity with embedding z [D] -> uint8 [num, res, res, 3]; same seed, same images."""
    z = np.asarray(z, np.float32)
    if z.shape != (self.embed_dim,):
      raise ValueError(f'Embedding must have shape [{self.embed_dim}], got {z.shape}.')
    ctx = None if context is None else np.asarray(context)[None]
    return self.generate_batch(z[None], num, sampler=sampler, steps=steps, eta=eta, seeds=[seed], context=ctx,
                               generator_params=generator_params)[0]


# ---------------------------------------------------------------------------------------------------------
# Output files.
# ---------------------------------------------------------------------------------------------------------
def _tile(images: np.ndarray, cols: int) -> np.ndarray:
  return images_lib.image_grid([images[i:i + cols] for i in range(0, len(images), cols)])


def references_and_samples_grid(references: np.ndarray | None, samples: np.ndarray, gap: int = 8) -> np.ndarray:
  """uint8 grid: the references tiled on the left, a white gap, the samples tiled on the right."""
  cols = max(1, int(np.ceil(np.sqrt(len(samples)))))
  right = _tile(samples, cols)
  if references is None or len(references) == 0:
    return right
  rows = -(-len(samples) // cols)
  left = _tile(references, max(1, -(-len(references) // rows)))
  h = max(left.shape[0], right.shape[0])
  pad = lambda g: np.pad(g, ((0, h - g.shape[0]), (0, 0), (0, 0)), constant_values=255)
  return np.concatenate([pad(left), np.full((h, gap, 3), 255, np.uint8), pad(right)], axis=1)


def write_outputs(out_dir: str, samples: np.ndarray, z: np.ndarray, references: np.ndarray | None) -> dict:
  """Writes sample_NNN.png, grid.png and embedding.npy into out_dir; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i, img in enumerate(samples):
    paths.append(os.path.join(out_dir, f'sample_{i:03d}.png'))
    Image.fromarray(img).save(paths[-1])
  grid = os.path.join(out_dir, 'grid.png')
  Image.fromarray(references_and_samples_grid(references, samples)).save(grid)
  emb = os.path.join(out_dir, 'embedding.npy')
  save_embedding(emb, z)
  return {'samples': paths, 'grid': grid, 'embedding': emb}


def sample_from_config(config, workdir: str) -> dict:
  """`--mode=sample`: config.sample.refs (a folder/file of photos, or a .npy embedding) -> files in
  config.sample.out (default WORKDIR/personalized). Returns the written paths."""
  if config.stage == 2:   # restoration: a degraded input plus references (idenc_jax/restore.py)
    from idenc_jax.personalize import restorer as restore  # pylint: disable=import-outside-toplevel
    return restore.restore_from_config(config, workdir)
  if config.stage == 2:   # restoration from a degraded input: the stage-2 module owns that CLI
    from idenc_jax.personalize import restorer as restore  # pylint: disable=import-outside-toplevel
    return restore.restore_from_config(config, workdir)
  s = config.sample
  if not s.refs:
    raise ValueError('config.sample.refs is not set: give a folder of reference photos or a saved .npy '
                     'embedding (--config.sample.refs=PATH).')
  out_dir = s.out or os.path.join(workdir, 'personalized')
  # References first: a bad photo fails fast, before the checkpoint is read.
  if str(s.refs).endswith('.npy'):
    z, refs = load_embedding(s.refs, config.model.embed_dim), None
  else:
    if not os.path.exists(s.refs):
      raise FileNotFoundError(f'config.sample.refs not found: {s.refs}')
    refs = load_references(s.refs, config.model.resolution, align=s.align)
  p = Personalizer.from_workdir(config, workdir)
  if refs is not None:
    z = p.embed(refs, align=False)   # already aligned and resized
  steps = samplers.num_steps_from_config(s.sampler, s.steps, config.diffusion.timesteps,
                                         config.diffusion.sample_start_t)
  samples = p.generate(z, s.num, sampler=s.sampler, steps=steps, eta=s.eta, seed=s.seed)
  paths = write_outputs(out_dir, samples, z, refs)
  logging.info('Wrote %d samples (%s, %s steps, seed %d) from %s to %s.', s.num, s.sampler, s.steps, s.seed,
               s.refs, out_dir)
  return paths
