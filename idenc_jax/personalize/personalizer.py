"""Personalization: reference photos -> identity embedding -> new images of that person.

Python API:

  p = Personalizer.from_workdir(config, workdir)        # EMA parameters of the latest checkpoint
  z = p.embed(['a.jpg', 'b.png'])                       # or uint8 arrays / PIL images / a folder path
  images = p.generate(z, 8, sampler='dpmpp', steps=25, seed=0)   # uint8 [8, R, R, 3]
  images = p.generate(z, 8, guidance=3.0)               # identity guidance (`diffusion.guidance`)
  references.save_embedding('me.npy', z); z = references.load_embedding('me.npy', config.model.embed_dim)

`embed` takes any number >= 1 of references of any size, colour or grey (`references.load_references`, aligned
when `config.sample.align`). The embedding is E(Y) = mean_j Enc(y_j), so it does not depend on the order of
the references.

The command line (`--mode=sample`) is `sample_mode.sample_from_config`.

Conditional tasks (stage 2, `restorer.Restorer`) pass condition tokens to `generate_batch(..., context=...)`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from idenc_jax import models, progress, xla_options
from idenc_jax.data import align as align_lib
from idenc_jax.data import images as images_lib
from idenc_jax.diffusion import consistency, guidance as guidance_lib, samplers, schedules
from idenc_jax.diffusion import generate as generate_lib
from idenc_jax.personalize import pretrained as pretrained_lib
from idenc_jax.personalize.references import ImageLike, load_embedding, load_references, save_embedding
from idenc_jax.train import checkpoint as ckpt_lib
from idenc_jax.train import state as state_lib


def load_workdir_params(workdir: str, hint: str) -> dict:
  """EMA parameters of the latest checkpoint in `workdir`; a FileNotFoundError naming it and `hint` (how to
  make one) when there is none."""
  try:
    return ckpt_lib.load_params(workdir, ema=True)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'Workdir {workdir} has no checkpoint; {hint}. ({e})') from e


def check_seeds(seeds) -> None:
  """Seeds are integers in [0, 2**32): jax keys take 32 bits, so 2**32 would silently repeat seed 0."""
  seeds = np.asarray(seeds)
  if seeds.size and (not np.issubdtype(seeds.dtype, np.integer) or seeds.min() < 0 or seeds.max() >= 2 ** 32):
    raise ValueError(f'Seeds must be integers in [0, 2**32), got {seeds.tolist()[:10]}.')


def map_in_chunks(fn: Callable[[np.ndarray], np.ndarray], n: int, chunk: int) -> np.ndarray:
  """fn(indices) over range(n) in chunks of equal size (the last padded by repeating index n - 1, its padding
  dropped), concatenated: equal shapes let one compiled sampler serve every chunk."""
  out = []
  for start in range(0, n, chunk):
    idx = np.minimum(np.arange(start, start + chunk), n - 1)
    out.append(fn(idx)[:min(chunk, n - start)])
  return np.concatenate(out)


def check_params(config, params: dict) -> None:
  """Raises a ValueError naming the first parameter whose shape differs from the model `config` builds."""
  expected = jax.eval_shape(lambda r: state_lib.init_params(config, r), jax.random.key(0))
  for part in ('generator', 'encoder'):
    if part not in params:
      raise ValueError(f'The checkpoint has no {part!r} parameters (a stage-0 checkpoint cannot personalize).')
    want, got = ckpt_lib.shapes_by_path(expected[part]), ckpt_lib.shapes_by_path(params[part])
    k = ckpt_lib.first_shape_difference(want, got)
    if k is not None:
      raise ValueError(f'The checkpoint does not match this config: {part}{k} is {got.get(k)} in the '
                       f'checkpoint but {want.get(k)} in the model; pass the config it was trained with.')


# Every compiled sampler advances the bar a caller opened under this name (`progress.advance`), once per step.
SAMPLING_BAR = 'sampling'
_advance_sampling_bar = functools.partial(progress.advance, SAMPLING_BAR)

# Compiled model calls, shared by every Personalizer of the same architecture (e.g. the ablation variants).
_COMPILED: dict[tuple, Any] = {}


def _model_key(config) -> str:
  return (config.model.to_json() + config.encoder.to_json() + config.diffusion.to_json() + str(config.stage)
          + config.sample.compiler_options)


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
    # Every compiled call of this model takes config.sample.compiler_options (checked here, once).
    self.compiler_options = xla_options.checked(config, 'sample')
    if (self._key, 'encode') not in _COMPILED:
      encoder = self.encoder
      _COMPILED[self._key, 'encode'] = jax.jit(lambda p, x: encoder.apply({'params': p}, x),
                                               compiler_options=self.compiler_options)
    self._encode = _COMPILED[self._key, 'encode']
    self._aligner = None
    self._fingerprint = None

  @classmethod
  def from_workdir(cls, config, workdir: str | None = None) -> 'Personalizer':
    """EMA parameters of the latest checkpoint in `workdir` (FileNotFoundError naming it when none).
    `from_workdir(workdir)` reads the config the run wrote (WORKDIR/config.json), as from_pretrained does."""
    if workdir is None:
      return cls.from_pretrained(config)
    params = load_workdir_params(workdir, f'train first (python -m idenc_jax.main --mode=train --workdir={workdir})')
    return cls(config, params)

  @classmethod
  def from_pretrained(cls, path: str | None = None) -> 'Personalizer':
    """A model with the config it was trained with: the shipped weights (no argument), an exported folder
    (`pretrained.export`) or a training workdir. References are aligned when its training faces were."""
    config, params = pretrained_lib.load(path)
    return cls(config, params)

  @property
  def program_key(self) -> str:
    """What its compiled calls are cached under: Personalizers with equal keys share their executables."""
    return self._key

  @property
  def fingerprint(self) -> str:
    """A short id of this model's parameters (sha256 of the generator's and encoder's arrays), recorded beside
    saved embeddings so that another model refuses them."""
    if self._fingerprint is None:
      digest = hashlib.sha256()
      for part in ('encoder', 'generator'):
        for path, leaf in jax.tree_util.tree_leaves_with_path(self.params[part]):
          digest.update(jax.tree_util.keystr(path).encode())
          digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
      self._fingerprint = digest.hexdigest()[:16]
    return self._fingerprint

  def save_embedding(self, path: str, z: np.ndarray) -> None:
    """references.save_embedding with this model's record."""
    save_embedding(path, z, model=self.fingerprint)

  def load_embedding(self, path: str) -> np.ndarray:
    """references.load_embedding, refusing an embedding of another model."""
    return load_embedding(path, self.embed_dim, model=self.fingerprint)

  # ---- References -> embedding. ----
  def preprocess(self, images: ImageLike | Sequence[ImageLike], *, align: bool | None = None) -> np.ndarray:
    """`load_references` at the model resolution; align defaults to config.sample.align."""
    align = self.config.sample.align if align is None else align
    if align and self._aligner is None:
      self._aligner = align_lib.FaceAligner(size=self.resolution)
    return load_references(images, self.resolution, align=align, aligner=self._aligner,
                           max_pixels=self.config.data.max_image_pixels)

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
                   project: consistency.Projector | None, guidance: float):
    key = (self._key, 'generate', num, sampler, steps, float(eta), self.start_t, with_context, project, guidance)
    if key not in _COMPILED:
      generator, schedule, start_t = self.generator, self.schedule, self.start_t
      prediction = self.config.diffusion.prediction

      def one(gen_params, z, rng, context, condition):
        return generate_lib.generate(generator, gen_params, schedule, z, rng, num=num, sampler=sampler,
                                     num_steps=steps, eta=eta, start_t=start_t, context=context,
                                     condition=condition, project=project, guidance=guidance,
                                     prediction=prediction, on_step=_advance_sampling_bar)
      # vmapped over identities: one compiled call generates for a batch of embeddings.
      _COMPILED[key] = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0 if with_context else None,
                                                      0 if project is not None else None)),
                               compiler_options=self.compiler_options)
    return _COMPILED[key]

  def steps_per_call(self, sampler: str, steps: int | None) -> int:
    """Sampler steps (model calls) of one generate call: a progress bar's total."""
    return self.start_t + 1 if sampler == 'ddpm' and steps is None else int(steps)

  def sampling_bar(self, desc: str, calls: int, sampler: str, steps: int | None):
    """A progress bar over `calls` generate calls' sampler steps, advanced from inside the compiled sampler."""
    return progress.bar(desc=desc, unit='step', total=calls * self.steps_per_call(sampler, steps),
                        name=SAMPLING_BAR)

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
                     conditions: np.ndarray | None = None, guidance: float | None = None) -> np.ndarray:
    """`num` images for each of I embeddings zs [I, D] -> uint8 [I, num, res, res, 3].

    Identity i uses rng key(seeds[i]) (default seeds 0..I-1), so row i equals `generate(zs[i], seed=seeds[i])`.
    steps=None with 'ddpm' visits every timestep from `start_t` down. context: stage-2 condition tokens
    [I, L, C], or None.
    generator_params: other generator parameters (e.g. fine-tuned ones) in place of the checkpoint's.
    project, conditions: data consistency for restoration (`diffusion.consistency`; one projector object per
    compiled sampler, so keep it), with the degraded inputs [I, res, res, C].
    guidance: identity guidance weight w (`diffusion.guidance`; 1: none; None: config.sample.guidance). It
    needs a model trained with config.loss.null_identity_prob > 0: without that the unconditional branch is
    untrained and any w != 1 gives poor images.
    """
    self._check_sampler(sampler, steps, eta)
    guidance = guidance_lib.check_guidance(self.config.sample.guidance if guidance is None else guidance)
    if (project is None) != (conditions is None):
      raise ValueError('Data consistency needs both a projector and the degraded inputs (conditions).')
    zs = np.asarray(zs, np.float32)
    if zs.ndim != 2 or zs.shape[1] != self.embed_dim:
      raise ValueError(f'Embeddings must have shape [I, {self.embed_dim}], got {zs.shape}.')
    if not np.isfinite(zs).all():
      bad = sorted(set(np.nonzero(~np.isfinite(zs))[0].tolist()))
      raise ValueError(f'Embedding(s) {bad[:10]} contain NaN or inf (in float32): nothing to generate from; '
                       're-embed the references (a damaged checkpoint gives non-finite embeddings).')
    r = self.resolution
    if conditions is not None and (np.ndim(conditions) != 4 or np.shape(conditions)[:3] != (len(zs), r, r)):
      raise ValueError(f'conditions must have shape [{len(zs)}, {r}, {r}, C], got {np.shape(conditions)}.')
    if num < 1:
      raise ValueError(f'num must be >= 1, got {num}.')
    seeds = np.arange(len(zs)) if seeds is None else np.asarray(seeds)
    if seeds.shape != (len(zs),):
      raise ValueError(f'seeds must have one entry per embedding ({len(zs)}), got shape {seeds.shape}.')
    check_seeds(seeds)
    rngs = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    fn = self._generate_fn(num, sampler, steps, eta, context is not None, project, guidance)
    gen = self.params['generator'] if generator_params is None else generator_params
    out = np.asarray(fn(gen, jnp.asarray(zs), rngs, None if context is None else jnp.asarray(context),
                        None if conditions is None else jnp.asarray(conditions, jnp.float32)))
    if not np.isfinite(out).all():
      raise FloatingPointError(f'The sampler produced NaN or inf for embedding(s) '
                               f'{sorted(set(np.nonzero(~np.isfinite(out))[0].tolist()))[:10]}: the embedding is '
                               'far outside what the encoder gives, or the parameters are damaged.')
    return images_lib.to_uint8(out)

  def generate(self, z: np.ndarray, num: int, *, sampler: str = 'ddim', steps: int | None = 50, eta: float = 0.0,
               seed: int = 0, context: np.ndarray | None = None, generator_params: Any = None,
               guidance: float | None = None) -> np.ndarray:
    """`num` images of the identity with embedding z [D] -> uint8 [num, res, res, 3]; same seed, same images.
    guidance: as in `generate_batch`."""
    z = np.asarray(z, np.float32)
    if z.shape != (self.embed_dim,):
      raise ValueError(f'Embedding must have shape [{self.embed_dim}], got {z.shape}.')
    ctx = None if context is None else np.asarray(context)[None]
    return self.generate_batch(z[None], num, sampler=sampler, steps=steps, eta=eta, seeds=[seed], context=ctx,
                               generator_params=generator_params, guidance=guidance)[0]
