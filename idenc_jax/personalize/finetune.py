"""The fine-tuning baseline: personalize the trained generator per identity by optimisation, as DreamBooth-
and MyStyle-like methods do, instead of one pass of the identity encoder.

Method (per identity, from the trained model's EMA generator):
  - a copy of the generator's weights and a new identity vector z in R^D, initialised to zero (the
    generator's conditioning is h * (1 + W silu(z) + b), so z = 0 starts from the learned bias alone, with no
    encoder involved);
  - `config.finetune.steps` Adam steps on the diffusion loss ||eps_theta(x_t, t, z) - eps||^2 over the
    identity's R references (all R each step, random timestep, noise and horizontal flip per image);
    generator weights at `config.finetune.learning_rate`, z at `config.finetune.embedding_learning_rate`;
    no prior-preservation term;
  - sampling exactly as for the encoder, with the fine-tuned weights and z.
The trained parameters are never modified (every identity starts from them). The whole optimisation is one
jitted `lax.scan`.

`compare(config, workdir)` times both ways of personalizing on this machine (after compilation, which is
reported separately) and evaluates both with the harness on the same identities, references and seeds:
  python -m idenc_jax.personalize.finetune --config=configs/base.py:cpu --workdir=TRAINED
writes WORKDIR/eval/finetune.json and finetune.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from idenc_jax import models
from idenc_jax.train import losses
from idenc_jax.diffusion import samplers, schedules


def _flip(rng: jax.Array, x: jax.Array) -> jax.Array:
  flip = jax.random.bernoulli(rng, 0.5, (x.shape[0], 1, 1, 1))
  return jnp.where(flip, x[:, :, ::-1], x)


def reference_loss(generator, schedule: schedules.NoiseSchedule, gen_params, z: jax.Array, refs: jax.Array,
                   t: jax.Array, noise: jax.Array) -> jax.Array:
  """Mean diffusion loss of references refs [R, H, W, 3] in [-1, 1] at given timesteps t [N*R] and noise
  [N*R, H, W, 3] (N draws per reference), conditioned on z [D]."""
  x0 = jnp.tile(refs, (t.shape[0] // refs.shape[0], 1, 1, 1))
  x_t = schedules.q_sample(schedule, x0, t, noise)
  eps = generator.apply({'params': gen_params}, x_t, t, jnp.broadcast_to(z, (x0.shape[0],) + z.shape))
  return losses.diffusion_loss(eps, noise).mean()


_FINETUNERS: dict[str, Any] = {}


def make_finetuner(config, *, steps: int | None = None):
  """A jitted fn(gen_params, refs [R, H, W, 3] in [-1, 1], rng) -> (gen_params', z [D], losses [steps]).

  Inputs are not donated: the caller's parameters stay intact. One compiled function per architecture and
  fine-tuning setting is shared.
  """
  ft = config.finetune
  steps = ft.steps if steps is None else steps
  if steps < 1:
    raise ValueError(f'config.finetune.steps must be >= 1, got {steps}.')
  key = config.model.to_json() + config.diffusion.to_json() + ft.to_json() + str(steps)
  if key not in _FINETUNERS:
    _FINETUNERS[key] = _build_finetuner(config, steps)
  return _FINETUNERS[key]


def _build_finetuner(config, steps: int):
  ft = config.finetune
  generator = models.build_generator(config)
  schedule = schedules.from_config(config)
  opt = optax.multi_transform({'generator': optax.adam(ft.learning_rate),
                               'z': optax.adam(ft.embedding_learning_rate)},
                              {'generator': 'generator', 'z': 'z'})

  def loss_fn(params, refs, rng):
    r_t, r_n, r_f = jax.random.split(rng, 3)
    x0 = _flip(r_f, refs)
    t = jax.random.randint(r_t, (refs.shape[0],), 0, schedule.timesteps)
    noise = jax.random.normal(r_n, refs.shape, jnp.float32)
    return reference_loss(generator, schedule, params['generator'], params['z'], x0, t, noise)

  def run(gen_params, refs, rng):
    params = {'generator': gen_params, 'z': jnp.zeros((config.model.embed_dim,), jnp.float32)}

    def step(carry, i):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, refs, jax.random.fold_in(rng, i))
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), hist = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
    return params['generator'], params['z'], hist

  return jax.jit(run)


def _block(tree):
  return jax.tree.map(lambda x: x.block_until_ready(), tree)


def compare(config, workdir: str, *, num_identities: int | None = None, write: bool = True) -> dict[str, Any]:
  """Personalizes `finetune.num_identities` test identities by the encoder and by fine-tuning; returns (and
  writes to WORKDIR/eval/finetune.{json,md}) both methods' timings and harness metrics."""
  from idenc_jax.personalize import personalizer as personalize  # pylint: disable=import-outside-toplevel
  from idenc_jax.evaluate import harness  # pylint: disable=import-outside-toplevel
  ev, ft = config.eval, config.finetune
  k = num_identities or ft.num_identities
  p = personalize.Personalizer.from_workdir(config, workdir)
  full = harness.load_eval_set(config)
  subset = full.subset(range(min(k, len(full))))
  evaluator = harness.Evaluator(config, subset, gallery=full)
  refs = [jnp.asarray(r, jnp.float32) / 127.5 - 1.0 for r in subset.references]
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
  for i, x in enumerate(refs):
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

  # ---- Same seeds, same sampler, same metrics for both. ----
  g_enc = harness.generate_for_eval(p, zs, ev.num_generated, sampler=ev.sampler, steps=steps, seed=config.seed)
  g_ft = np.stack([p.generate(ft_z[i], ev.num_generated, sampler=ev.sampler, steps=steps, seed=config.seed + i,
                              generator_params=ft_params[i]) for i in range(len(subset))])
  enc_m, ft_m = evaluator.metrics(g_enc), evaluator.metrics(g_ft)
  enc_m.update(personalize_seconds=float(np.mean(enc_times)), compile_seconds=enc_compile)
  ft_m.update(personalize_seconds=float(np.mean(ft_times)), compile_seconds=ft_compile,
              loss_start=float(np.mean(loss_first)), loss_end=float(np.mean(loss_last)))
  result = harness._json_ready({  # pylint: disable=protected-access
      'encoder': enc_m, 'finetune': ft_m,
      'speedup_encoder_vs_finetune': float(np.mean(ft_times) / max(np.mean(enc_times), 1e-12)),
      'settings': {
          'workdir': os.path.abspath(workdir), 'num_identities': len(subset), 'oracle_gallery_identities': len(full),
          'num_references': ev.num_references, 'num_generated': ev.num_generated, 'sampler': ev.sampler,
          'steps': ev.steps, 'finetune': ft.to_dict(), 'timing': 'mean wall seconds per identity after a warm-up (compile) call, '
          f'{jax.devices()[0].platform} x{jax.device_count()} ({os.cpu_count()} host cores)'},
  })
  if write:
    out = os.path.join(os.path.abspath(workdir), 'eval')
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'finetune.json'), 'w') as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(out, 'finetune.md'), 'w') as f:
      f.write(finetune_markdown(result))
  logging.info('fine-tuning baseline: %s', {m: {c: result[m].get(c) for c in _COLUMNS} for m in ('encoder', 'finetune')})
  return result


_COLUMNS = ['personalize_seconds', 'compile_seconds', 'oracle_id_accuracy', 'oracle_fd', 'id_score', 'fd_face',
            'diversity']


def finetune_markdown(result: dict) -> str:
  from idenc_jax.evaluate import harness  # pylint: disable=import-outside-toplevel
  rows = [dict(result['encoder'], method='encoder (ours)'), dict(result['finetune'], method='fine-tuning')]
  return '\n'.join(['# Personalization: identity encoder vs per-identity fine-tuning', '',
                    harness.markdown_table(rows, _COLUMNS, first='method'), '',
                    f'Encoder is {result["speedup_encoder_vs_finetune"]:.0f}x faster to personalize.', '',
                    '```', json.dumps(result['settings'], indent=2), '```', ''])


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  compare(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'configs/base.py[:variant]', lock_config=True)
  flags.DEFINE_string('workdir', None, 'A trained stage-1 workdir.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
