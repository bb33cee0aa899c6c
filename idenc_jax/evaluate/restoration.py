"""Evaluation of the conditional tasks (stage 2: super-resolution, inpainting), `--mode=eval` on a stage-2 config.

Protocol (that of `protocol`, with ground truth). For each test identity the first R = config.eval.num_references
images are the references (E(Y) = mean_j Enc(y_j)); its first G held-out images are the ground truths, where
G = min(config.eval.num_generated, the fewest held-out images of any evaluated identity). Each ground truth is
degraded as in training (`data.degrade`; inpainting holes drawn from config.seed) and restored once
(config.eval.sampler / steps; ground truth k of identity i uses seed config.seed + i * G + k).

Rows (all compared with the same ground truths and held-out real images):
  restored        the model with the person's references;
  restored_projected  the same images after `Restorer.project` (data consistency: the low-res block means or
                  the known pixels of the input put back), a post-processing option, not the paper's method;
  wrong_identity  the same model and conditions with the references of another identity (identity i gets
                  identity (i + 1) mod I's embedding): how much of the result comes from the references;
  consistent, consistent_wrong_identity  the two rows above sampled with data consistency inside the
                  sampler (`diffusion.consistency`: every denoised estimate keeps the input's block means or
                  known pixels), an option, not the paper's method;
  baseline        no model: the low-resolution input bicubic-upsampled (sr) or the masked input with a grey
                  hole (inpaint).
Metrics per row: every `evaluator.Evaluator` metric (LPIPS-Alex against the ground truth, ID score, Frechet
distances / FID against the held-out real images, the synthetic oracle's identity accuracy against the true
identity), plus pixel errors against the ground truth in [-1, 1] units: `pixel_mse`, `psnr` (peak-to-peak 2),
and for inpainting `hole_mse` (inside the hole only).
Writes WORKDIR/eval/step_N/metrics.json (the restored row's metrics at top level, as `generation` does, and
`rows` with every row), metrics.md and samples.png (references | truth | input | restored | wrong
[| consistent]), copied to eval/ as the latest evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
from PIL import Image

from idenc_jax.data import degrade
from idenc_jax.data import images as images_lib
from idenc_jax.diffusion import samplers
from idenc_jax.evaluate import report
from idenc_jax.evaluate.evaluator import Evaluator
from idenc_jax.evaluate.protocol import EvalSet, embed_eval_set, load_eval_set
from idenc_jax.personalize.restorer import Restorer
from idenc_jax.train import checkpoint as ckpt_lib

ROWS = ('restored', 'restored_projected', 'wrong_identity', 'consistent', 'consistent_wrong_identity', 'baseline')
TABLE = ('lpips', 'pixel_mse', 'psnr', 'hole_mse', 'oracle_id_accuracy', 'oracle_distance', 'oracle_fd',
         'id_score', 'fd_face', 'fid')


def pixel_metrics(images: np.ndarray, truth: np.ndarray, holes: np.ndarray | None = None) -> dict[str, float]:
  """MSE and PSNR in [-1, 1] units (peak-to-peak 2) of uint8 images against uint8 ground truth, pooled over
  all pixels; with holes [..., H, W] (bool), also the MSE inside the holes."""
  a = images_lib.to_float(images, np.float64)
  b = images_lib.to_float(truth, np.float64)
  sq = np.square(a - b)
  mse = float(sq.mean())
  out = {'pixel_mse': mse, 'psnr': float(10 * np.log10(4.0 / max(mse, 1e-12)))}
  if holes is not None:
    h = np.broadcast_to(np.asarray(holes, bool)[..., None], sq.shape)
    out['hole_mse'] = float(sq[h].mean())
  return out


def baseline_images(degradation, conditions: np.ndarray) -> np.ndarray:
  """The non-learned restoration, uint8 [N, R, R, 3]: bicubic up-sampling of the low-res input (sr; the low-res
  image is recovered from the condition's nearest-neighbour blocks by block means) or the masked input."""
  c = np.asarray(conditions, np.float32)
  if degradation.task == 'sr':
    if degradation.upsample != 'nearest':
      raise ValueError('baseline_images recovers the low-res input from nearest-upsampled conditions; '
                       'pass the low-res images to Degradation.baseline_from_low_resolution instead.')
    low = degrade.downsample_area(c[..., :3], degradation.sr_factor)
    return images_lib.to_uint8(degradation.baseline_from_low_resolution(low))
  return images_lib.to_uint8(c[..., :3])


def restoration_truth(eval_set: EvalSet, num: int) -> np.ndarray:
  """The first G held-out images of every identity: uint8 [I, G, R, R, 3]."""
  g = min([num] + [len(h) for h in eval_set.held_out])
  if g < 1:
    raise ValueError('Every evaluated identity needs at least one held-out image beyond its references.')
  return np.stack([h[:g] for h in eval_set.held_out])


def markdown(metrics: dict) -> str:
  rows = [dict(metrics['rows'][name], run=name) for name in ROWS if name in metrics['rows']]
  cols = [c for c in TABLE if any(r.get(c) is not None for r in rows)]
  s = metrics['settings']
  return '\n'.join([f'# Evaluation: {s["task"]} (stage 2)', '', report.markdown_table(rows, cols), '',
                    '## Settings', '', '```', json.dumps(s, indent=2, default=str), '```', ''])


def _step(workdir: str) -> int | None:
  try:
    return ckpt_lib.checkpoint_step(workdir)
  except FileNotFoundError:   # a Restorer built from parameters in memory
    return None


def evaluate_restoration(config, workdir: str, *, restorer=None, max_identities: int | None = None
                         ) -> dict[str, Any]:
  """Runs the protocol above on the latest stage-2 checkpoint in `workdir`; writes WORKDIR/eval/*."""
  ev = config.eval
  t_start = time.time()
  restorer = restorer or Restorer.from_workdir(config, workdir)
  deg = restorer.degradation
  eval_set = load_eval_set(config, max_identities=max_identities)
  truth = restoration_truth(eval_set, ev.num_generated)
  n_id, g = truth.shape[:2]
  flat_truth = truth.reshape((-1,) + truth.shape[2:])
  conditions = restorer.degrade(flat_truth, seed=config.seed)
  holes = conditions[..., 3] > 0.5 if deg.task == 'inpaint' else None
  zs = embed_eval_set(restorer.personalizer, eval_set)
  steps = samplers.num_steps_from_config(ev.sampler, ev.steps, config.diffusion.timesteps,
                                         config.diffusion.sample_start_t)
  kw = dict(sampler=ev.sampler, steps=steps, eta=ev.eta, seed=config.seed)
  right, wrong = np.repeat(zs, g, axis=0), np.repeat(np.roll(zs, -1, axis=0), g, axis=0)
  t0 = time.time()
  images = {
      'restored': restorer.restore_batch(right, conditions, **kw)[:, 0],
      'wrong_identity': restorer.restore_batch(wrong, conditions, **kw)[:, 0],
      'baseline': baseline_images(deg, conditions),
  }
  if deg.task == 'inpaint' or deg.upsample == 'nearest':   # SR's projection reads nearest-upsampled inputs
    images['restored_projected'] = restorer.project(images['restored'], conditions)
    images['consistent'] = restorer.restore_batch(right, conditions, consistent=True, **kw)[:, 0]
    images['consistent_wrong_identity'] = restorer.restore_batch(wrong, conditions, consistent=True, **kw)[:, 0]
  sample_seconds = time.time() - t0
  evaluator = Evaluator(config, eval_set)
  rows = {}
  for name in [r for r in ROWS if r in images]:
    m = evaluator.metrics(images[name].reshape(truth.shape), ground_truth=truth)
    m.update(pixel_metrics(images[name], flat_truth, holes))
    rows[name] = m
    logging.info('eval %s %s: %s', deg.task, name, {k: m.get(k) for k in TABLE if m.get(k) is not None})

  metrics = dict(rows['restored'])
  metrics['rows'] = rows
  metrics['settings'] = {
      'task': deg.task, 'workdir': os.path.abspath(workdir), 'checkpoint_step': _step(workdir),
      'parameters': 'ema', 'sampler': ev.sampler, 'eta': ev.eta,
      'steps': steps or restorer.personalizer.start_t + 1, 'sample_start_t': restorer.personalizer.start_t,
      'num_references': ev.num_references, 'restorations_per_identity': g, 'num_identities': n_id,
      'sr_factor': deg.sr_factor if deg.task == 'sr' else None, 'sr_upsample': deg.upsample,
      'mask_side': deg.side if deg.task == 'inpaint' else None, 'resolution': config.model.resolution,
      'seed': config.seed, 'identity_sources': config.data.identity_sources, 'synthetic': eval_set.synthetic,
      'sample_seconds': sample_seconds, 'wall_seconds': time.time() - t_start,
  }
  out = os.path.join(os.path.abspath(workdir), 'eval')
  kept = report.step_dir(out, metrics['settings']['checkpoint_step'])
  metrics = report.write_report(kept, 'metrics', metrics, markdown(metrics))
  shown = restorer.show(conditions).reshape(truth.shape)
  restored = images['restored'].reshape(truth.shape)
  wrong = images['wrong_identity'].reshape(truth.shape)
  dc = images['consistent'].reshape(truth.shape) if 'consistent' in images else None
  grid_rows = [np.concatenate([eval_set.references[i], truth[i, :1], shown[i, :1], restored[i, :1], wrong[i, :1]]
                              + ([] if dc is None else [dc[i, :1]]))
               for i in range(min(n_id, 8))]
  Image.fromarray(images_lib.image_grid(grid_rows)).save(os.path.join(kept, 'samples.png'))
  report.publish_latest(out, metrics['settings']['checkpoint_step'], ['metrics.json', 'metrics.md', 'samples.png'])
  logging.info('Wrote %s/metrics.json (kept in %s)', out, kept)
  return metrics
