"""Time-to-identity curves: train recipes for a wall-clock budget, evaluate their checkpoints, plot them.

  python -m idenc_jax.experiments.curve --config=configs/base.py:cpu --workdir=runs/curve \
      --minutes=15 --eval_every=1000 --variant='paper_eps:' --variant='minsnr:loss.weighting=min_snr'

Each variant (`NAME:field=value;field=value`, fields of the config; default one variant 'base', the config
as given) trains in WORKDIR/NAME for `--minutes` of wall time (config.train.time_budget_minutes; a checkpoint
every `--eval_every` steps, all kept; with `--max_steps` it also stops there, the horizon of a decaying learning
rate). The wall time at each checkpoint is recorded from the start of its
training call, compile and sample grids included: what a user waits for. Then every checkpoint is evaluated
with the protocol of `--mode=eval` (`evaluate.protocol`, config.eval: references, samples, sampler, steps)
at each guidance weight of `--guidance` (default config.eval.guidance): on synthetic identities the oracle's
top-1 and top-5 accuracy with their standard errors and its Frechet distance; on real faces (`faces_cpu`)
dlib's share of samples with a face, the ID accuracy among those faces (nearest identity mean descriptor)
with its chance level, and the ID score; diversity on both. Variants train one after another in this
process, so a comparison is one sitting on one machine; run it on an otherwise idle machine.

With `--seeds=0,1,2,3` every variant trains once per seed (NAME_s0, NAME_s1, ...; config.seed), and the
report adds each variant's mean over its seeds with the standard error of that mean, and each later
variant's difference from the first, paired by seed: runs of one recipe spread by about twice one
evaluation's sampling error (docs/training.md), so one run per arm cannot show a difference of a few
hundredths.

Writes WORKDIR/curve.json (every point and the settings), curve.md (one table per variant) and curve.png
(the identity accuracy against minutes and against steps; on real faces also the face rate). A variant
whose training finished (WORKDIR/NAME/clock.json) is not trained again, and evaluated points are kept
(WORKDIR/NAME/points.json): a stopped run resumes, its training from its last checkpoint with what was left
of its budget and its clock following on from that checkpoint's time (WORKDIR/NAME/clock.partial.json). With
`--extend --max_steps=M` finished runs that stopped below step M continue from their last checkpoint for another
`--minutes` (a constant learning rate and the run's own config only, so that they follow the run trained straight
through), their new checkpoints timed from where the clock stopped; a stopped extension resumes the same way.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time

from absl import flags, logging

from idenc_jax import cli
from idenc_jax.data import batch_layout
from idenc_jax.diffusion import guidance as guidance_lib
from idenc_jax.diffusion import samplers
from idenc_jax.evaluate import report
from idenc_jax.evaluate.evaluator import Evaluator
from idenc_jax.evaluate.generation import run_protocol
from idenc_jax.evaluate.protocol import embed_eval_set, load_eval_set
from idenc_jax.experiments.timed_run import to_extend, train_variant
from idenc_jax.personalize.personalizer import Personalizer
from idenc_jax.train import checkpoint as ckpt_lib

METRICS = ('oracle_id_accuracy', 'oracle_top5_accuracy', 'oracle_fd', 'diversity')
# Real faces (no oracle): dlib's share of samples with a face, and the identity accuracy among those faces.
FACE_METRICS = ('face_rate', 'id_accuracy', 'id_chance', 'id_score', 'no_face_generated')


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
  """'minsnr:loss.weighting=min_snr;train.learning_rate=2e-3' -> ('minsnr', {field: text value})."""
  name, sep, rest = spec.partition(':')
  if not sep or not name or not name.replace('_', '').replace('-', '').isalnum():
    raise ValueError(f'--variant {spec!r} is not NAME:field=value;... (NAME of letters, digits, _ and -).')
  overrides = {}
  for item in filter(None, (s.strip() for s in rest.split(';'))):
    key, eq, value = item.partition('=')
    if not eq:
      raise ValueError(f'--variant {spec!r}: {item!r} is not field=value.')
    overrides[key.strip()] = value.strip()
  return name, overrides


def standard_error(p: float | None, n: int) -> float | None:
  """Binomial standard error sqrt(p (1 - p) / n) of an accuracy over n samples."""
  return None if p is None or n <= 0 else math.sqrt(max(p * (1 - p), 0.0) / n)


def parse_seeds(spec: str) -> list[int]:
  """'0,1,2,3' -> [0, 1, 2, 3] (--seeds); '' -> [] (one run per variant, the config's seed)."""
  items = [s.strip() for s in (spec or '').split(',') if s.strip()]
  try:
    seeds = [int(s) for s in items]
  except ValueError:
    raise ValueError(f"--seeds must be whole numbers separated by commas, e.g. '0,1,2,3', got {spec!r}.") from None
  if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
    raise ValueError(f'--seeds must be distinct numbers >= 0, got {spec!r}.')
  return seeds


def expand_seeds(variants: list[tuple[str, dict]], seeds: list[int]) -> tuple[list[tuple[str, dict]],
                                                                                dict[str, list[str]]]:
  """Each variant once per seed: ([(NAME_sN, overrides + seed=N), ...], {NAME: [NAME_s0, ...]}).
  Without seeds, the variants as given, each its own group of one."""
  if not seeds:
    return variants, {name: [name] for name, _ in variants}
  runs, groups = [], {}
  for name, overrides in variants:
    if 'seed' in overrides:
      raise ValueError(f'--variant {name} sets seed itself; with --seeds every variant takes the seeds given.')
    groups[name] = [f'{name}_s{seed}' for seed in seeds]
    runs += [(f'{name}_s{seed}', {**overrides, 'seed': str(seed)}) for seed in seeds]
  return runs, groups


def _mean_and_error(values: list[float]) -> tuple[float, float | None]:
  """The mean and its standard error (sample standard deviation / sqrt(n); None for one value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, None
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def seed_summary(curves: dict[str, list[dict]], groups: dict[str, list[str]]) -> list[dict]:
  """Per variant (a group of runs differing only in seed) and per (step, guidance) that every one of its runs
  reached: the mean of each metric over the runs with the standard error of that mean, and, for every variant
  after the first, the identity accuracy's difference from the first variant's run of the same seed (the
  i-th run of each group), mean and standard error over the seeds."""
  def points_by_key(run):
    return {(p['step'], p['guidance']): p for p in curves[run]}

  rows, first = [], next(iter(groups.values()), [])
  base = [points_by_key(r) for r in first]
  for name, runs in groups.items():
    if len(runs) < 2:
      continue
    by_run = [points_by_key(r) for r in runs]
    for key in sorted(set.intersection(*(set(b) for b in by_run)), key=lambda k: (k[1], k[0])):
      points = [b[key] for b in by_run]
      acc = _accuracy_key(points)
      row = {'variant': name, 'step': key[0], 'guidance': key[1], 'seeds': len(runs),
             'minutes': sum(p['minutes'] for p in points) / len(points)}
      for metric in (acc,) + tuple(m for m in METRICS + ('face_rate',) if m != acc):
        values = [p.get(metric) for p in points]
        if all(v is not None for v in values):
          row[metric], row[f'{metric}_sem'] = _mean_and_error(values)
      if runs is not first and len(first) == len(runs) and all(key in b for b in base):
        diffs = [p[acc] - b[key][acc] for p, b in zip(points, base)]
        if all(d is not None for d in diffs):
          row[f'{acc}_minus_first'], row[f'{acc}_minus_first_sem'] = _mean_and_error(diffs)
      rows.append(report.json_ready(row))
  return rows


def make_point(step: int, minutes: float, guidance: float, samples: int, metrics: dict) -> dict:
  """One curve point from the protocol's metrics, with binomial standard errors: the oracle's accuracies
  and the face rate over all samples, the face ID accuracy over the samples in which dlib found a face."""
  point = {'step': step, 'minutes': minutes, 'guidance': guidance, 'samples': samples,
           **{k: metrics.get(k) for k in METRICS + FACE_METRICS + ('oracle_chance',)}}
  for key in ('oracle_id_accuracy', 'oracle_top5_accuracy', 'face_rate'):
    point[f'{key}_se'] = standard_error(point[key], samples)
  faces = None if point['no_face_generated'] is None else samples - point['no_face_generated']
  point['id_accuracy_se'] = standard_error(point['id_accuracy'], faces or 0)
  return report.json_ready(point)


def _accuracy_key(points: list[dict]) -> str:
  """The curve's identity metric: the oracle's on synthetic identities, dlib's on real faces."""
  return 'oracle_id_accuracy' if any(p.get('oracle_id_accuracy') is not None for p in points) else 'id_accuracy'


def evaluate_checkpoints(config, workdir: str, clock: dict[str, float], weights: list[float]) -> list[dict]:
  """One point per (checkpoint, guidance weight): step, minutes and the METRICS with standard errors."""
  path = os.path.join(workdir, 'points.json')
  points = []
  if os.path.exists(path):
    with open(path) as f:
      points = json.load(f)
  done = {(p['step'], p['guidance']) for p in points}
  eval_set = load_eval_set(config)
  evaluator = Evaluator(config, eval_set, use_dlib=not eval_set.synthetic)
  ev = config.eval
  steps = samplers.num_steps_from_config(ev.sampler, ev.steps, config.diffusion.timesteps,
                                         config.diffusion.sample_start_t)
  n = len(eval_set) * ev.num_generated
  for step in sorted(int(s) for s in clock):
    todo = [w for w in weights if (step, w) not in done]
    if not todo:
      continue
    params = ckpt_lib.load_params(os.path.join(workdir, 'checkpoints', str(step)), ema=True)
    p = Personalizer(config, params)
    zs = embed_eval_set(p, eval_set)
    for w in todo:
      m, _ = run_protocol(config, p, eval_set, evaluator, sampler=ev.sampler, steps=steps, zs=zs, eta=ev.eta,
                          guidance=w)
      point = make_point(step, clock[str(step)] / 60, w, n, m)
      points.append(point)
      logging.info('%s step %d (%.1f min), guidance %g: %s', os.path.basename(workdir), step, point['minutes'], w,
                   {k: point[k] for k in METRICS + FACE_METRICS if point[k] is not None})
      with open(path, 'w') as f:
        json.dump(points, f, indent=2)
  return sorted(points, key=lambda p: (p['guidance'], p['step']))


def curve_markdown(curves: dict[str, list[dict]], summary: list[dict] | None = None) -> str:
  oracle = ['oracle_id_accuracy', 'oracle_id_accuracy_se', 'oracle_top5_accuracy', 'oracle_fd']
  faces = ['face_rate', 'face_rate_se', 'id_accuracy', 'id_accuracy_se', 'id_chance', 'id_score']
  lines = ['# Time to identity', '']
  if summary:
    cols = [c for c in ('step', 'guidance', 'seeds', 'minutes', 'oracle_id_accuracy', 'oracle_id_accuracy_sem',
                        'id_accuracy', 'id_accuracy_sem', 'oracle_id_accuracy_minus_first',
                        'oracle_id_accuracy_minus_first_sem', 'id_accuracy_minus_first', 'id_accuracy_minus_first_sem',
                        'oracle_top5_accuracy', 'oracle_fd', 'face_rate', 'diversity')
            if any(r.get(c) is not None for r in summary)]
    lines += ['## Over seeds (mean, standard error of the mean; differences from the first variant paired by seed)',
              '', report.markdown_table(summary, cols, first='variant'), '']
  for name, points in curves.items():
    cols = ['minutes', 'guidance'] + [c for c in oracle + faces if any(p.get(c) is not None for p in points)]
    lines += [f'## {name}', '', report.markdown_table(points, cols + ['diversity'], first='step'), '']
  return '\n'.join(lines)


def plot(curves: dict[str, list[dict]], path: str, title: str):
  import matplotlib  # lazy: only the plot needs it
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  everything = [p for pts in curves.values() for p in pts]
  key = _accuracy_key(everything)
  faces = any(p.get('face_rate') is not None for p in everything)
  # Real faces get a third panel: the share of samples in which dlib finds a face, against minutes.
  fig, axes = plt.subplots(1, 3 if faces else 2, figsize=(16 if faces else 11, 4))
  for name, points in curves.items():
    for w in sorted({p['guidance'] for p in points}):
      label = name if len({p['guidance'] for p in points}) == 1 else f'{name}, w={w:g}'
      panels = [(axes[0], 'minutes', key), (axes[1], 'step', key)]
      if faces:
        panels.append((axes[2], 'minutes', 'face_rate'))
      for ax, x_key, y_key in panels:
        pts = [p for p in points if p['guidance'] == w and p.get(y_key) is not None]
        if pts:
          ax.errorbar([p[x_key] for p in pts], [p[y_key] for p in pts],
                      yerr=[p.get(f'{y_key}_se') or 0.0 for p in pts], marker='o', ms=3, capsize=2, label=label)
  chance_key = 'oracle_chance' if key == 'oracle_id_accuracy' else 'id_chance'
  chance = next((p[chance_key] for p in everything if p.get(chance_key)), None)
  for ax, xlabel in zip(axes[:2], ('training wall time (minutes, compile included)', 'training steps')):
    if chance:
      ax.axhline(chance, color='grey', ls=':', lw=1, label='chance' if ax is axes[0] else None)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  axes[1].sharey(axes[0])
  axes[0].set_ylabel(('oracle top-1 accuracy' if key == 'oracle_id_accuracy' else
                      'face ID accuracy among faces found') + ' (+- 1 s.e.)')
  if faces:
    axes[2].set_xlabel('training wall time (minutes, compile included)')
    axes[2].set_ylabel('share of samples with a face (dlib)')
    axes[2].set_ylim(0, 1)
    axes[2].grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_curves(base_config, workdir: str, variants: list[tuple[str, dict]], *, minutes: float, eval_every: int,
               weights: list[float], max_steps: int = 0, groups: dict[str, list[str]] | None = None,
               extend: bool = False) -> dict:
  """Trains and evaluates every variant (one run each), then writes the curve files; `groups` ({recipe:
  [its runs' names]}, from `expand_seeds`) adds the over-seeds summary of its groups of two runs or more;
  `extend` continues finished runs to `max_steps` (see train_variant)."""
  if minutes <= 0 or eval_every < 1 or max_steps < 0:
    raise ValueError(f'--minutes must be > 0, --eval_every >= 1 and --max_steps >= 0, got {minutes}, {eval_every} '
                     f'and {max_steps}.')
  if extend and not max_steps:
    raise ValueError('--extend continues finished runs to --max_steps; pass --max_steps.')
  configs = {}
  for name, overrides in variants:   # every override checked before anything trains
    c = cli.apply_overrides(base_config, overrides)
    if c.train.lr_schedule != 'constant' and not max_steps:
      raise ValueError(f'--variant {name}: train.lr_schedule={c.train.lr_schedule!r} decays over train.num_steps, '
                       'which a time-budgeted run never reaches; pass --max_steps (the decay horizon).')
    try:
      batch_layout.batch_spec(c)
    except ValueError as e:
      raise ValueError(f'--variant {name}: {e}') from e
    with c.unlocked():
      c.train.time_budget_minutes = minutes
      c.train.num_steps = max_steps or 10_000_000
      c.train.checkpoint_every = eval_every
      c.train.keep_checkpoints = 1_000_000
    configs[name] = c
  extending = {name: extend and to_extend(c, os.path.join(workdir, name)) for name, c in configs.items()}
  curves = {}
  for name, c in configs.items():
    wd = os.path.join(workdir, name)
    clock = train_variant(c, wd, extend=extending[name])
    curves[name] = evaluate_checkpoints(c, wd, clock, weights or [guidance_lib.check_guidance(c.eval.guidance)])
  summary = seed_summary(curves, groups) if groups else []
  result = {'curves': curves, 'variants': {n: o for n, o in variants}, **({'seed_summary': summary} if summary else {}),
            'settings': {'minutes': minutes, 'eval_every': eval_every, 'machine': platform.processor() or
                         platform.machine(), 'cpus': os.cpu_count(), 'date': time.strftime('%Y-%m-%d'),
                         'eval': base_config.eval.to_dict()}}
  report.write_report(workdir, 'curve', result, curve_markdown(curves, summary))
  plot(curves, os.path.join(workdir, 'curve.png'),
       f'time to identity ({minutes:g} min per variant, {os.cpu_count()} CPUs)')
  logging.info('Wrote %s/curve.json, curve.md and curve.png', workdir)
  return result


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags; defined at start-up, not at import, since other entry points define flags of
  the same names (--config, --workdir) and may be imported into the same process (the tests)."""
  where = {'flag_values': flag_values}
  cli.define_config_flag(**where)
  flags.DEFINE_string('workdir', None, "Folder of the variants' workdirs and the curve files.", required=True,
                      **where)
  flags.DEFINE_float('minutes', 15.0, 'Wall-clock training budget per variant, in minutes.', **where)
  flags.DEFINE_integer('eval_every', 1000, 'Steps between evaluated checkpoints.', **where)
  flags.DEFINE_integer('max_steps', 0, 'Stop a variant at this many steps if its time budget lasts that long, and '
                       "decay the learning rate over them (train.num_steps); 0: the time budget alone.", **where)
  flags.DEFINE_multi_string('variant', [], "NAME:field=value;field=value (repeatable); 'NAME:' is the config "
                            'as given. Default: one variant, base.', **where)
  flags.DEFINE_string('guidance', '', "Guidance weights evaluated at each checkpoint, e.g. '1,3' (default "
                      'config.eval.guidance).', **where)
  flags.DEFINE_string('seeds', '', "Train every variant once per seed, e.g. '0,1,2,3', and report means over the "
                      'seeds with their standard errors (default: one run, config.seed).', **where)
  flags.DEFINE_bool('extend', False, 'Continue finished runs whose last checkpoint is below --max_steps (constant '
                    'learning rate only) for another --minutes, and evaluate their new checkpoints.', **where)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  f = flag_values
  variants = [parse_variant(v) for v in f.variant] or [('base', {})]
  runs, groups = expand_seeds(variants, parse_seeds(f.seeds))
  names = [n for n, _ in runs]
  if len(set(names)) != len(names):
    raise ValueError(f'--variant names must differ (with --seeds, NAME_sN too), got {names}.')
  run_curves(f.config, f.workdir, runs, minutes=f.minutes, eval_every=f.eval_every,
             weights=guidance_lib.parse_guidance_sweep(f.guidance), max_steps=f.max_steps, groups=groups,
             extend=f.extend)


def console_main() -> None:
  """`python -m idenc_jax.experiments.curve` and its console command."""
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  console_main()
