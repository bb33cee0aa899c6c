"""`--mode=eval` on a stage-0/1 config: personalized generation measured with the protocol (`protocol`) and
every metric (`evaluator`).

`config.eval.sweep` (e.g. 'ddim:10,ddim:25,dpmpp:10,ddpm:1000') repeats generation and metrics for each
sampler:steps pair: quality against the number of model calls, with the sampling wall time (`sample_seconds`,
which includes compiling that sampler unless an earlier run already did). `config.eval.guidance_sweep` (e.g.
'1,2,3,5') repeats them for each identity-guidance weight (`guidance_sweep`: identity against diversity), and
`config.eval.reference_sweep` (e.g. '1,2,4,8', the paper's Fig. 7) for each reference count R
(`reference_sweep`): the first R of the same references, against the same held-out images, so rows differ
only in R. The main run and both sweeps use `config.eval.guidance` unless they vary it.
Outputs: eval/step_N/{metrics.json (metrics, `sweep`, `settings`), metrics.md, samples.png} for checkpoint N,
copied to eval/ as the latest evaluation, and TensorBoard scalars under `eval/` in WORKDIR/eval.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np
from PIL import Image

from idenc_jax.data import images as images_lib
from idenc_jax.diffusion import guidance as guidance_lib
from idenc_jax.diffusion import samplers
from idenc_jax.evaluate import report
from idenc_jax.evaluate.evaluator import EXTRAS, METRICS, Evaluator
from idenc_jax.evaluate.protocol import (EvalSet, embed_eval_set, generate_for_eval, load_eval_set,
                                         parse_reference_sweep, parse_sweep)
from idenc_jax.personalize.personalizer import Personalizer
from idenc_jax.train import checkpoint as ckpt_lib


def samples_grid(eval_set: EvalSet, generated: np.ndarray, max_rows: int = 8) -> np.ndarray:
  """One row per identity: its references, then its generated images."""
  rows = [np.concatenate([eval_set.references[i], generated[i]]) for i in range(min(len(generated), max_rows))]
  return images_lib.image_grid(rows)


def run_protocol(config, personalizer, eval_set: EvalSet, evaluator: Evaluator, *, sampler: str,
                 steps: int | None, generator_params: Any = None, zs: np.ndarray | None = None,
                 eta: float = 0.0, guidance: float = 1.0, desc: str = 'eval') -> tuple[dict[str, Any], np.ndarray]:
  """Embeds, generates G images per identity and measures them: (metrics + timings, generated)."""
  t0 = time.perf_counter()
  zs = embed_eval_set(personalizer, eval_set) if zs is None else zs
  t1 = time.perf_counter()
  gen = generate_for_eval(personalizer, zs, config.eval.num_generated, sampler=sampler, steps=steps,
                          seed=config.seed, generator_params=generator_params, eta=eta, guidance=guidance, desc=desc)
  t2 = time.perf_counter()
  m = evaluator.metrics(gen)
  m.update(embed_seconds=t1 - t0, sample_seconds=t2 - t1, metric_seconds=time.perf_counter() - t2)
  return m, gen


def evaluate_generation(config, workdir: str) -> dict[str, Any]:
  """Runs the protocol on the latest checkpoint in `workdir`; writes WORKDIR/eval/{metrics.json, metrics.md,
  samples.png} and TensorBoard scalars. Returns the metrics dict."""
  ev = config.eval
  t_start = time.time()
  p = Personalizer.from_workdir(config, workdir)
  step = ckpt_lib.checkpoint_step(workdir)
  eval_set = load_eval_set(config)
  evaluator = Evaluator(config, eval_set)
  T = config.diffusion.timesteps
  main_steps = samplers.num_steps_from_config(ev.sampler, ev.steps, T, config.diffusion.sample_start_t)
  # Parsed before anything runs, so a bad sweep entry fails in seconds.
  step_sweep = parse_sweep(ev.sweep, T, config.diffusion.sample_start_t)
  w_main = guidance_lib.check_guidance(ev.guidance)
  guidance_sweep = guidance_lib.parse_guidance_sweep(ev.guidance_sweep)
  reference_counts = parse_reference_sweep(ev.reference_sweep)
  if any(r > ev.num_references for r in reference_counts):
    raise ValueError(f'config.eval.reference_sweep {ev.reference_sweep!r} asks for more references than '
                     f'config.eval.num_references={ev.num_references}.')
  zs = embed_eval_set(p, eval_set)
  metrics, gen = run_protocol(config, p, eval_set, evaluator, sampler=ev.sampler, steps=main_steps, zs=zs,
                              eta=ev.eta, guidance=w_main)
  logging.info('eval (%s, %s steps, guidance %g): %s', ev.sampler, ev.steps, w_main,
               {k: metrics[k] for k in METRICS + EXTRAS if metrics.get(k) is not None})
  keys = METRICS + EXTRAS + ('sample_seconds',)

  sweep = []
  for name, steps in step_sweep:
    m, _ = run_protocol(config, p, eval_set, evaluator, sampler=name, steps=steps, zs=zs, guidance=w_main,
                        desc='eval sweep')
    row = {'sampler': name, 'steps': steps or p.start_t + 1, 'model_calls': steps or p.start_t + 1}
    row.update({k: m.get(k) for k in keys})
    sweep.append(row)
    logging.info('eval sweep %s:%d: %s', name, row['steps'], row)

  guidance_rows = []
  for w in guidance_sweep:
    m, _ = run_protocol(config, p, eval_set, evaluator, sampler=ev.sampler, steps=main_steps, zs=zs, eta=ev.eta,
                        guidance=w, desc='eval guidance sweep')
    # Guidance doubles the batch of every model call (one call per step on [x; x]) except at w = 1.
    guidance_rows.append({'guidance': w, **{k: m.get(k) for k in keys}})
    logging.info('eval guidance %g: %s', w, guidance_rows[-1])

  reference_rows = []
  for r in reference_counts:
    zs_r = embed_eval_set(p, dataclasses.replace(eval_set, references=eval_set.references[:, :r]))
    m, _ = run_protocol(config, p, eval_set, evaluator, sampler=ev.sampler, steps=main_steps, zs=zs_r,
                        eta=ev.eta, guidance=w_main, desc=f'eval R={r}')
    reference_rows.append({'num_references': r, **{k: m.get(k) for k in keys}})
    logging.info('eval references %d: %s', r, reference_rows[-1])

  metrics['sweep'] = sweep
  metrics['guidance_sweep'] = guidance_rows
  metrics['reference_sweep'] = reference_rows
  metrics['settings'] = {
      'workdir': os.path.abspath(workdir), 'checkpoint_step': step, 'parameters': 'ema',
      'sampler': ev.sampler, 'steps': main_steps or p.start_t + 1, 'sample_start_t': p.start_t, 'eta': ev.eta,
      'guidance': w_main, 'prediction': config.diffusion.prediction,
      'num_references': ev.num_references,
      'num_generated': ev.num_generated, 'num_identities': len(eval_set),
      'identities_skipped_too_few_images': eval_set.num_skipped,
      'held_out_real_images': int(sum(len(h) for h in eval_set.held_out)),
      'identity_sources': config.data.identity_sources, 'synthetic': eval_set.synthetic,
      'resolution': config.model.resolution, 'seed': config.seed, 'diffusion_timesteps': T,
      'schedule': config.diffusion.schedule, 'inception_weights': ev.inception_weights,
      'loss': config.loss.to_dict(), 'face_descriptor': 'dlib_face_recognition_resnet_model_v1, HOG detector, '
      '5-point landmarks, 150 px chip, padding 0.25', 'wall_seconds': time.time() - t_start,
  }
  out = os.path.join(os.path.abspath(workdir), 'eval')
  kept = report.step_dir(out, step)
  metrics = report.write_report(kept, 'metrics', metrics, report.metrics_markdown(metrics))
  Image.fromarray(samples_grid(eval_set, gen)).save(os.path.join(kept, 'samples.png'))
  report.publish_latest(out, step, ['metrics.json', 'metrics.md', 'samples.png'])
  report.write_tensorboard(out, step, metrics)
  logging.info('Wrote %s/metrics.json (kept in %s)', out, kept)
  return metrics
