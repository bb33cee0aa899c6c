"""`--mode=sample`: reference photos (or a saved embedding) -> image files, for stage 1 (`sample_from_config`)
and stage 2 (`restore_from_config`). `idenc_jax.main` picks one by config.stage.

Stage 0/1:

  python -m idenc_jax.main --config=configs/base.py:cpu --workdir=TRAINED --mode=sample \
      --config.sample.refs=PHOTOS_DIR --config.sample.num=8 --config.sample.out=OUT

writes OUT/sample_000.png ..., OUT/grid.png (references on the left, samples on the right) and
OUT/embedding.npy. `config.sample.refs` may instead name a saved `.npy` embedding, which skips the photos
(the grid then holds only the samples). OUT defaults to WORKDIR/personalized.

Stage 2 (restoration, `restorer.Restorer`):


  python -m idenc_jax.main --config=configs/base.py:sr_cpu --workdir=STAGE2 --mode=sample \
      --config.sample.refs=PHOTOS_DIR --config.sample.condition=low_res.png [--config.sample.num=4]

`sample.condition` is the degraded input: for 'sr' a (R/sr_factor)x(R/sr_factor) image; for 'inpaint' an RxR
image whose hole is its alpha channel (alpha < 128 = missing) or the white pixels of `sample.mask`. With
`sample.condition_is_clean` it is a clean photo (largest centred square, resized to R) that is degraded here
(the inpainting hole placed by `sample.seed`). Writes OUT/restored_NNN.png, OUT/input.png (the degraded input
at full size, hole grey), OUT/grid.png (references | input | restored, then the clean image when given) and
OUT/embedding.npy; OUT defaults to WORKDIR/restored. `sample.consistent` (True in the stage-2 configs, with
`sample.eta` = 1) samples with data consistency.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile

import numpy as np
from PIL import Image

from idenc_jax.data import images as images_lib
from idenc_jax.diffusion import samplers
from idenc_jax.personalize.personalizer import Personalizer, check_seeds
from idenc_jax.personalize.references import check_embedding_model, load_embedding, load_references, save_embedding
from idenc_jax.personalize.restorer import Restorer


def read_identity(config) -> tuple[np.ndarray | None, np.ndarray | None]:
  """config.sample.refs -> (saved embedding or None, uint8 references or None), read before any checkpoint
  so that a bad photo fails fast."""
  s = config.sample
  if not s.refs:
    raise ValueError('config.sample.refs is not set: give a folder of reference photos or a saved .npy '
                     'embedding (--config.sample.refs=PATH).')
  if str(s.refs).lower().endswith('.npy'):
    return load_embedding(s.refs, config.model.embed_dim), None
  if not os.path.exists(s.refs):
    raise FileNotFoundError(f'config.sample.refs not found: {s.refs}')
  return None, load_references(s.refs, config.model.resolution, align=s.align,
                               max_pixels=config.data.max_image_pixels)


# What one run writes into its output folder; an earlier run's are replaced only with sample.overwrite.
OUTPUT_PATTERNS = ('sample_*.png', 'restored_*.png', 'input.png', 'grid.png', 'embedding.npy', 'embedding.npy.json')


def prepare_output_dir(out_dir: str, overwrite: bool) -> None:
  """Before any work: `out_dir` (or the folder it will be made in) is writable and holds no earlier run's
  outputs (removed first with `overwrite`; other files are never touched)."""
  existing = os.path.abspath(out_dir)
  while not os.path.exists(existing):   # created only when the outputs are written
    existing = os.path.dirname(existing)
  try:
    if not os.path.isdir(existing):
      raise NotADirectoryError(20, f'{existing} is a file')
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise PermissionError(f'Cannot write to the output folder {out_dir} ({e.strerror}); choose another with '
                          '--config.sample.out.') from None
  earlier = sorted(p for pattern in OUTPUT_PATTERNS for p in glob.glob(os.path.join(glob.escape(out_dir), pattern)))
  if earlier and not overwrite:
    raise FileExistsError(f'{out_dir} already holds {len(earlier)} outputs of an earlier run (e.g. '
                          f'{os.path.basename(earlier[0])}); pass --config.sample.overwrite=True to replace them, '
                          'or choose another --config.sample.out.')
  for p in earlier:
    os.remove(p)


def sampler_steps(config) -> int | None:
  s = config.sample
  return samplers.num_steps_from_config(s.sampler, s.steps, config.diffusion.timesteps,
                                        config.diffusion.sample_start_t)


def references_and_samples_grid(references: np.ndarray | None, samples: np.ndarray, gap: int = 8) -> np.ndarray:
  """uint8 grid: the references tiled on the left, a white gap, the samples tiled on the right."""
  cols = max(1, int(np.ceil(np.sqrt(len(samples)))))
  right = images_lib.tile(samples, cols)
  if references is None or len(references) == 0:
    return right
  rows = -(-len(samples) // cols)
  left = images_lib.tile(references, max(1, -(-len(references) // rows)))
  h = max(left.shape[0], right.shape[0])
  pad = lambda g: np.pad(g, ((0, h - g.shape[0]), (0, 0), (0, 0)), constant_values=255)
  return np.concatenate([pad(left), np.full((h, gap, 3), 255, np.uint8), pad(right)], axis=1)


def write_outputs(out_dir: str, samples: np.ndarray, z: np.ndarray, references: np.ndarray | None,
                  model: str | None = None) -> dict:
  """Writes sample_NNN.png, grid.png and embedding.npy (with its model record) into out_dir; returns their
  paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i, img in enumerate(samples):
    paths.append(os.path.join(out_dir, f'sample_{i:03d}.png'))
    Image.fromarray(img).save(paths[-1])
  grid = os.path.join(out_dir, 'grid.png')
  Image.fromarray(references_and_samples_grid(references, samples)).save(grid)
  emb = os.path.join(out_dir, 'embedding.npy')
  save_embedding(emb, z, model=model)
  return {'samples': paths, 'grid': grid, 'embedding': emb}


def sample_from_config(config, workdir: str) -> dict:
  """`--mode=sample` for stage 0/1: config.sample.refs (a folder/file of photos, or a .npy embedding) -> files
  in config.sample.out (default WORKDIR/personalized). Returns the written paths."""
  s = config.sample
  z, refs = read_identity(config)
  check_seeds([s.seed])
  out_dir = s.out or os.path.join(workdir, 'personalized')
  prepare_output_dir(out_dir, s.overwrite)
  p = Personalizer.from_workdir(config, workdir)
  if refs is not None:
    z = p.embed(refs, align=False)   # already aligned and resized
  else:
    check_embedding_model(s.refs, p.fingerprint)
  with p.sampling_bar(f'sampling {s.num} images', 1, s.sampler, sampler_steps(config)):
    samples = p.generate(z, s.num, sampler=s.sampler, steps=sampler_steps(config), eta=s.eta, seed=s.seed)
  paths = write_outputs(out_dir, samples, z, refs, model=p.fingerprint)
  logging.info('Wrote %d samples (%s, %s steps, seed %d) from %s to %s.', s.num, s.sampler, s.steps, s.seed,
               s.refs, out_dir)
  return paths


def restore_from_config(config, workdir: str) -> dict:
  """`--mode=sample` for stage 2: config.sample.{refs, condition, mask, condition_is_clean} -> files in
  config.sample.out (default WORKDIR/restored). Returns the written paths."""
  s = config.sample
  if not s.condition:
    raise ValueError('config.sample.condition is not set: give the degraded input image (or a clean one with '
                     '--config.sample.condition_is_clean=True).')
  z, refs = read_identity(config)   # references first: a bad photo fails before the checkpoint is read
  check_seeds([s.seed])
  out_dir = s.out or os.path.join(workdir, 'restored')
  r = config.model.resolution
  image = images_lib.open_image(s.condition, 'config.sample.condition', config.data.max_image_pixels)
  prepare_output_dir(out_dir, s.overwrite)
  restorer = Restorer.from_workdir(config, workdir)
  clean = None
  if s.condition_is_clean:
    rgb = Image.fromarray(images_lib.rgb_array(image, f'config.sample.condition {s.condition}'))
    clean = np.asarray(images_lib.center_crop_resize(rgb, r))[None]
    cond = restorer.degrade(clean, seed=s.seed)
  else:
    cond = restorer.condition_from_input(image, s.mask)[None]
  if refs is not None:
    z = restorer.personalizer.embed(refs, align=False)
  else:
    check_embedding_model(s.refs, restorer.personalizer.fingerprint)
  steps = sampler_steps(config)
  restored = restorer.restore(z, cond, s.num, sampler=s.sampler, steps=steps, eta=s.eta, seed=s.seed,
                              consistent=s.consistent)[0]

  os.makedirs(out_dir, exist_ok=True)
  paths = {'restored': []}
  for i, img in enumerate(restored):
    paths['restored'].append(os.path.join(out_dir, f'restored_{i:03d}.png'))
    Image.fromarray(img).save(paths['restored'][-1])
  shown = restorer.show(cond)
  paths['input'] = os.path.join(out_dir, 'input.png')
  Image.fromarray(shown[0]).save(paths['input'])
  right = np.concatenate([shown, restored] + ([clean] if clean is not None else []))
  grid = references_and_samples_grid(refs, right) if refs is not None else images_lib.image_grid([right])
  paths['grid'] = os.path.join(out_dir, 'grid.png')
  Image.fromarray(grid).save(paths['grid'])
  paths['embedding'] = os.path.join(out_dir, 'embedding.npy')
  save_embedding(paths['embedding'], z, model=restorer.personalizer.fingerprint)
  logging.info('Restored %s (%s) %d times with %s into %s.', s.condition, config.stage2.task, s.num, s.refs,
               out_dir)
  return paths
