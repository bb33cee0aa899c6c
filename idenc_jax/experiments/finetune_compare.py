"""The identity encoder against the per-identity fine-tuning baseline (`personalize.finetune`): time to
personalize on this machine (after compilation, which is reported separately) and every metric of the
evaluation, on the same identities, references and seeds.

  python -m idenc_jax.experiments.finetune_compare --config=configs/base.py:cpu --workdir=TRAINED

writes WORKDIR/eval/finetune.json and finetune.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from absl import flags

from idenc_jax import cli, progress
from idenc_jax.data import images as images_lib
from idenc_jax.diffusion import samplers
from idenc_jax.evaluate import report
from idenc_jax.evaluate.evaluator import Evaluator
from idenc_jax.evaluate.protocol import generate_for_eval, load_eval_set
from idenc_jax.personalize.finetune import make_finetuner
from idenc_jax.personalize.personalizer import Personalizer


def _block(tree):
  return jax.tree.map(lambda x: x.block_until_ready(), tree)


def compare(config, workdir: str, *, num_identities: int | None = None, write: bool = True) -> dict[str, Any]:
  """Personalizes `finetune.num_identities` test identities by the encoder and by fine-tuning; returns (and
  writes to WORKDIR/eval/finetune.{json,md}) both methods' timings and harness metrics."""
  ev, ft = config.eval, config.finetune
  k = num_identities or ft.num_identities
  p = Personalizer.from_workdir(config, workdir)
  full = load_eval_set(config)
  subset = full.subset(range(min(k, len(full))))
  evaluator = Evaluator(config, subset, gallery=full)
  refs = [images_lib.to_float(r) for r in subset.references]
  steps = samplers.num_steps_from_config(ev.sampler, ev.steps, config.diffusion.timesteps,
                                         config.diffusion.sample_start_t)

  # Each way is timed per identity after a warm-up call on the first identity, whose extra time over a
  # timed call is reported as compile time.
  # ---- Encoder: one forward pass of the R references. ----
  encode = p._encode  # pylint: disable=protected-access
  t0 = time.perf_counter()
  _block(encode(p.params['encoder'], refs[0]))
  enc_first = time.perf_counter() - t0
  enc_times, zs = [], []
  for x in refs:
    t0 = time.perf_counter()
    zs.append(np.asarray(_block(encode(p.params['encoder'], x)).mean(0)))
    enc_times.append(time.perf_counter() - t0)
  zs = np.stack(zs)
  enc_compile = max(enc_first - float(np.mean(enc_times)), 0.0)

  # ---- Fine-tuning: finetune.steps optimiser steps on the R references. ----
  tuner = make_finetuner(config)
  rng = jax.random.key(config.seed + 7)
  t0 = time.perf_counter()
  _block(tuner(p.params['generator'], refs[0], rng))
  ft_first = time.perf_counter() - t0
  ft_times, ft_params, ft_z, loss_first, loss_last = [], [], [], [], []
  for i, x in enumerate(progress.bar(refs, desc=f'fine-tuning {ft.steps} steps per identity', unit='identity')):
    t0 = time.perf_counter()
    g, z, hist = _block(tuner(p.params['generator'], x, jax.random.fold_in(rng, i)))
    ft_times.append(time.perf_counter() - t0)
    ft_params.append(g)
    ft_z.append(np.asarray(z))
    hist = np.asarray(hist)
    w = max(1, len(hist) // 10)
    loss_first.append(float(hist[:w].mean()))
    loss_last.append(float(hist[-w:].mean()))
  ft_compile = max(ft_first - float(np.mean(ft_times)), 0.0)

  # ---- Same seeds, same sampler, same guidance (eval.guidance), same metrics for both. ----
  g_enc = generate_for_eval(p, zs, ev.num_generated, sampler=ev.sampler, steps=steps, seed=config.seed,
                            guidance=ev.guidance)
  with p.sampling_bar(f'sampling the fine-tuned models: {len(subset) * ev.num_generated} images', len(subset),
                      ev.sampler, steps):
    g_ft = np.stack([p.generate(ft_z[i], ev.num_generated, sampler=ev.sampler, steps=steps, seed=config.seed + i,
                                generator_params=ft_params[i], guidance=ev.guidance) for i in range(len(subset))])
  enc_m, ft_m = evaluator.metrics(g_enc), evaluator.metrics(g_ft)
  enc_m.update(personalize_seconds=float(np.mean(enc_times)), compile_seconds=enc_compile)
  ft_m.update(personalize_seconds=float(np.mean(ft_times)), compile_seconds=ft_compile,
              loss_start=float(np.mean(loss_first)), loss_end=float(np.mean(loss_last)))
  result = {
      'encoder': enc_m, 'finetune': ft_m,
      'speedup_encoder_vs_finetune': float(np.mean(ft_times) / max(np.mean(enc_times), 1e-12)),
      'settings': {
          'workdir': os.path.abspath(workdir), 'num_identities': len(subset), 'oracle_gallery_identities': len(full),
          'num_references': ev.num_references, 'num_generated': ev.num_generated, 'sampler': ev.sampler,
          'steps': ev.steps, 'finetune': ft.to_dict(),
          'timing': 'mean wall seconds per identity after a warm-up (compile) call, '
          f'{jax.devices()[0].platform} x{jax.device_count()} ({os.cpu_count()} host cores)'},
  }
  if write:
    result = report.write_report(os.path.join(os.path.abspath(workdir), 'eval'), 'finetune', result,
                                 finetune_markdown(result))
  else:
    result = report.json_ready(result)
  logging.info('fine-tuning baseline: %s',
               {m: {c: result[m].get(c) for c in _COLUMNS} for m in ('encoder', 'finetune')})
  return result


_COLUMNS = ['personalize_seconds', 'compile_seconds', 'oracle_id_accuracy', 'oracle_fd', 'id_score', 'fd_face',
            'diversity']


def finetune_markdown(result: dict) -> str:
  rows = [dict(result['encoder'], method='encoder (ours)'), dict(result['finetune'], method='fine-tuning')]
  return '\n'.join(['# Personalization: identity encoder vs per-identity fine-tuning', '',
                    report.markdown_table(rows, _COLUMNS, first='method'), '',
                    f'Encoder is {result["speedup_encoder_vs_finetune"]:.0f}x faster to personalize.', '',
                    '```', json.dumps(result['settings'], indent=2), '```', ''])


_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained stage-1 workdir.', required=True)


def main(argv):
  del argv
  compare(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
