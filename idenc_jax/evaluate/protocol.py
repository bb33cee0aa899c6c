"""The evaluation protocol: which images are references, which are held out, and how samples are drawn.

The held-out ('test') identities of `config.data.identity_sources` are evaluated; an identity needs R + 1
images, where R = config.eval.num_references (identities with fewer are skipped and counted). For each
identity the first R images are the references: the model embeds them, E(Y) = mean_j Enc(y_j), and
generates G = config.eval.num_generated images (EMA parameters; identity i uses seed config.seed + i). Its
remaining images are the held-out real images: every metric compares against them, never against the
references.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from idenc_jax.data import pipeline
from idenc_jax.diffusion import samplers
from idenc_jax.personalize.personalizer import map_in_chunks


@dataclasses.dataclass
class EvalSet:
  """Test identities: references [I, R, res, res, 3] uint8 and held-out real images (list of [n_i, ...])."""
  labels: np.ndarray
  references: np.ndarray
  held_out: list[np.ndarray]
  synthetic: bool
  num_skipped: int = 0      # identities with too few images

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, indices) -> 'EvalSet':
    idx = list(indices)
    return EvalSet(self.labels[idx], self.references[idx], [self.held_out[i] for i in idx], self.synthetic)


def is_synthetic(config) -> bool:
  return [s.strip() for s in config.data.identity_sources.split(',') if s.strip()] == ['synthetic']


def load_eval_set(config, *, num_references: int | None = None, max_identities: int | None = None,
                  split: str = 'test') -> EvalSet:
  """The first R images of each test identity are references, the rest held out (needs >= R + 1 images)."""
  r = config.eval.num_references if num_references is None else num_references
  if r < 1:
    raise ValueError(f'config.eval.num_references must be >= 1, got {r}.')
  max_identities = max_identities if max_identities is not None else (config.eval.num_identities or None)
  labels, refs, held, skipped = [], [], [], 0
  for label, images in pipeline.make_eval_identities(config, split).items():
    if len(images) < r + 1:
      skipped += 1
      continue
    if max_identities is not None and len(labels) >= max_identities:
      break
    labels.append(label)
    refs.append(images[:r])
    held.append(images[r:])
  if len(labels) < 2:
    raise ValueError(f'Evaluation needs >= 2 {split} identities with more than {r} images '
                     f'(config.eval.num_references); found {len(labels)} ({skipped} too small) in '
                     f'{config.data.identity_sources}.')
  return EvalSet(np.asarray(labels), np.stack(refs), held, is_synthetic(config), skipped)


def embed_eval_set(personalizer, eval_set: EvalSet) -> np.ndarray:
  """Identity embeddings [I, D]: mean encoder output over each identity's R references."""
  return np.stack([personalizer.embed(refs, align=False) for refs in eval_set.references])


def generate_for_eval(personalizer, zs: np.ndarray, num: int, *, sampler: str, steps: int | None, seed: int,
                      max_images_per_call: int = 64, context: np.ndarray | None = None,
                      generator_params: Any = None, eta: float = 0.0, guidance: float = 1.0,
                      desc: str = 'sampling') -> np.ndarray:
  """`num` images per embedding zs [I, D] -> uint8 [I, num, res, res, 3]; identity i uses seed `seed + i`.

  Identities go through in chunks of equal size (the last padded), so one compiled sampler serves all.
  guidance: identity guidance weight (1: none; `diffusion.guidance`). desc: the progress bar's label.
  """
  n_ids = len(zs)
  chunk = max(1, min(n_ids, max_images_per_call // max(num, 1)))
  label = f'{desc}: {n_ids * num} images, {sampler} {steps or "all"} steps, w={guidance:g}'
  with personalizer.sampling_bar(label, -(-n_ids // chunk), sampler, steps):
    return map_in_chunks(
        lambda idx: personalizer.generate_batch(zs[idx], num, sampler=sampler, steps=steps, eta=eta,
                                                seeds=seed + idx, context=None if context is None else context[idx],
                                                generator_params=generator_params, guidance=guidance), n_ids, chunk)


def parse_sweep(spec: str, timesteps: int, start_t: int | None = None) -> list[tuple[str, int | None]]:
  """'ddim:10,dpmpp:25,ddpm:1000' -> [(sampler, steps)]; ddpm with at least start_t + 1 steps (T when
  start_t is None or -1) becomes (ddpm, None): every timestep from start_t."""
  out = []
  for item in [s.strip() for s in (spec or '').split(',') if s.strip()]:
    name, _, steps = item.partition(':')
    if name not in samplers.SAMPLERS or not steps.isdigit() or not 1 <= int(steps) <= timesteps:
      raise ValueError(f'config.eval.sweep entry {item!r} is not sampler:steps with sampler in '
                       f'{list(samplers.SAMPLERS)} and 1 <= steps <= {timesteps}.')
    out.append((name, samplers.num_steps_from_config(name, int(steps), timesteps, start_t)))
  return out


def parse_reference_sweep(spec: str) -> list[int]:
  """'1,2,4,8' -> [1, 2, 4, 8] (config.eval.reference_sweep: reference counts R, paper Fig. 7)."""
  out = []
  for item in [s.strip() for s in (spec or '').split(',') if s.strip()]:
    if not item.isdigit() or int(item) < 1:
      raise ValueError(f'config.eval.reference_sweep entry {item!r} is not a reference count >= 1; '
                       "write e.g. '1,2,4,8'.")
    out.append(int(item))
  return out
