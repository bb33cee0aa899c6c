"""A small-scale reproduction of the paper's Table 1 (generation vs baselines) and Table 3 (ablations).

For each dataset (synthetic identities; optionally the real faces of celeba_id128, prepared at the run's
resolution) and each Table 3 variant (diffae, avg, multitask, full; see configs/base.py), the script trains
the variant with the project's trainer, evaluates it (`--mode=eval`, `evaluate.generation`), runs the
sampler sweep (quality against steps) and the fine-tuning baseline on the full method, trains stage 2
(super-resolution, inpainting) on the full method and evaluates it against ground truth (Table 1's
conditional columns, `evaluate/restoration.py`), and writes OUT/results.json, OUT/tables.md. Finished
pieces are reused, so a stopped run resumes where it left off.

Every scale choice is a flag and lands in the results:
  python -m idenc_jax.experiments.reproduce --out=/tmp/repro --base=tiny --resolution=16 --steps=400 \
      --train_identities=128 --test_identities=16 --images_per_identity=10 --num_references=4 \
      --num_generated=4 --eval_steps=25 --finetune_steps=100 --data=synthetic
  (add --data=synthetic,celeba --resolution=32 for the real faces too; celeba is prepared into OUT).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from absl import app, flags, logging

from configs.base import get_config
from idenc_jax.data import prepare as prepare_lib
from idenc_jax.evaluate import report
from idenc_jax.evaluate.generation import evaluate_generation
from idenc_jax.evaluate.restoration import evaluate_restoration
from idenc_jax.experiments import finetune_compare
from idenc_jax.train import checkpoint as ckpt_lib
from idenc_jax.train import loop

# The paper's half-agnostic batch of groups of 4, which Table 3's rows and earlier results.json assume.
_AGNOSTIC_FRACTION = 0.5
_IMAGES_PER_GROUP = 4

_OUT = flags.DEFINE_string('out', None, 'Output folder (workdirs, tables).', required=True)
_BASE = flags.DEFINE_string('base', 'tiny', 'Base config variant (model size): tiny or cpu.')
_RESOLUTION = flags.DEFINE_integer('resolution', 16, 'Image resolution (model.resolution).')
_STEPS = flags.DEFINE_integer('steps', 400, 'Training steps per variant.')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Global training batch (half identity groups, half agnostic).')
_LR = flags.DEFINE_float('learning_rate', 1e-3, 'Training learning rate.')
_WARMUP = flags.DEFINE_integer('warmup_steps', 50, 'Learning-rate warm-up steps.')
_EMA = flags.DEFINE_float('ema_decay', 0.99, 'EMA decay of the evaluated weights (reached after the '
                          "train.ema_warmup ramp; short runs need a short average).")
_TIMESTEPS = flags.DEFINE_integer('timesteps', 1000, 'Diffusion steps T (ddpm in the sweep uses all T).')
_VARIANTS = flags.DEFINE_list('variants', ['diffae', 'avg', 'multitask', 'full'], 'Table 3 rows to train.')
_DATA = flags.DEFINE_list('data', ['synthetic'], 'Datasets: synthetic and/or celeba.')
_CELEBA = flags.DEFINE_string('celeba_dir', os.environ.get('IDENC_CELEBA_DIR', os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'shared', 'data',
    'celeba_id128')), 'Raw celeba_id128 folder (train/, test/ of identity folders).')
_TRAIN_IDS = flags.DEFINE_integer('train_identities', 128, 'Synthetic training identities.')
_TEST_IDS = flags.DEFINE_integer('test_identities', 16, 'Synthetic test identities.')
_IMAGES_PER_ID = flags.DEFINE_integer('images_per_identity', 10, 'Synthetic images per identity.')
_NUM_REFS = flags.DEFINE_integer('num_references', 4, 'R: references per test identity.')
_NUM_GEN = flags.DEFINE_integer('num_generated', 4, 'G: generated images per test identity.')
_EVAL_SAMPLER = flags.DEFINE_string('eval_sampler', 'ddim', 'Sampler of the tables.')
_EVAL_STEPS = flags.DEFINE_integer('eval_steps', 25, 'Sampler steps of the tables.')
_SWEEP = flags.DEFINE_string('sweep', 'ddim:10,ddim:25,ddim:50,dpmpp:10,dpmpp:25,ddpm:1000',
                             'Quality-vs-steps runs on the full method (sampler:steps, comma-separated).')
_FT_STEPS = flags.DEFINE_integer('finetune_steps', 100, 'Fine-tuning baseline: steps per identity.')
_FT_LR = flags.DEFINE_float('finetune_learning_rate', 2e-4, 'Fine-tuning baseline: generator learning rate.')
_FT_IDS = flags.DEFINE_integer('finetune_identities', 4, 'Fine-tuning baseline: identities personalized.')
_TASKS = flags.DEFINE_list('restoration_tasks', ['sr', 'inpaint'], 'Stage-2 tasks trained on the full method '
                           '(Table 1\'s conditional columns); empty to skip.')
_TASK_STEPS = flags.DEFINE_integer('restoration_steps', 300, 'Stage-2 training steps per task.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of data, initialisation and sampling.')

ROW_NAMES = {'diffae': 'DiffAE', 'avg': '+ average embedding', 'multitask': '+ multi-task',
             'full': '+ identity loss (ours)'}
# Paper (128 px, real faces): Table 3 ID / FID and Table 1 ID / FID / Diversity.
PAPER_TABLE3 = {'diffae': (0.135, 118.0), 'avg': (0.146, 102.2), 'multitask': (0.126, 93.4),
                'full': (0.119, 92.9)}
PAPER_TABLE1 = {'DiffAE': (0.135, 118.0, 0.028), 'MyStyle (fine-tuning)': (0.117, 214.9, 0.027),
                'Ours': (0.119, 92.9, 0.115)}
# Paper Table 1, conditional columns (Ours): ID / FID / LPIPS.
PAPER_RESTORATION = {'sr': (0.118, 98.6, 0.146), 'inpaint': (0.110, 94.0, 0.125)}
RESTORATION_ROWS = {'consistent': 'ours, data-consistent sampling', 'restored': 'ours, model alone',
                    'consistent_wrong_identity': 'wrong identity (data-consistent)',
                    'baseline': 'input alone (bicubic / grey hole)'}


def make_config(variant: str, dataset: str, prepared: str | None):
  """The base config with the variant and this run's scale flags applied."""
  c = get_config(f'{_BASE.value},{variant}')
  c.seed = _SEED.value
  c.model.resolution = _RESOLUTION.value
  c.diffusion.timesteps = _TIMESTEPS.value
  t = c.train
  steps = _TASK_STEPS.value if c.stage == 2 else _STEPS.value
  t.num_steps, t.batch_size, t.learning_rate, t.warmup_steps = steps, _BATCH.value, _LR.value, _WARMUP.value
  c.data.agnostic_fraction = _AGNOSTIC_FRACTION
  c.data.images_per_identity = _IMAGES_PER_GROUP
  t.checkpoint_every = steps
  t.ema_decay = _EMA.value
  t.log_every = max(1, min(50, steps // 10))
  t.sample_every = 0
  c.loss.curriculum_steps = max(1, _STEPS.value // 2)   # identity information mostly kept by mid-run
  if dataset == 'synthetic':
    d = c.data
    d.synthetic_train_identities, d.synthetic_test_identities = _TRAIN_IDS.value, _TEST_IDS.value
    d.synthetic_images_per_identity = _IMAGES_PER_ID.value
  else:
    c.data.identity_sources = prepared
    c.data.agnostic_source = 'same'
  e = c.eval
  e.num_references, e.num_generated = _NUM_REFS.value, _NUM_GEN.value
  e.sampler, e.steps = _EVAL_SAMPLER.value, _EVAL_STEPS.value
  e.sweep = _SWEEP.value if variant == 'full' else ''
  if c.stage == 2:   # a restoration task on the full method of the same dataset
    c.init_from = os.path.join(os.path.abspath(_OUT.value), dataset, 'full')
  c.finetune.steps, c.finetune.learning_rate = _FT_STEPS.value, _FT_LR.value
  c.finetune.num_identities = _FT_IDS.value
  return c


def prepare_celeba(out: str) -> str:
  """celeba_id128 prepared at the run's resolution into OUT (reused when present)."""
  dest = os.path.join(out, f'celeba_{_RESOLUTION.value}')
  if not os.path.exists(os.path.join(dest, 'index.json')):
    if not os.path.isdir(_CELEBA.value):
      raise FileNotFoundError(f'--data=celeba needs the celeba_id128 folder; not found: {_CELEBA.value}')
    prepare_lib.prepare(_CELEBA.value, dest, layout='folders', resolution=_RESOLUTION.value)
  return dest


def _finished(workdir: str, steps: int) -> bool:
  step = ckpt_lib.checkpoint_step_or_none(workdir)
  return step is not None and step >= steps


def run_dataset(dataset: str, out: str) -> dict:
  prepared = prepare_celeba(out) if dataset == 'celeba' else None
  results = {'variants': {}, 'timings': {}}
  for variant in _VARIANTS.value:
    config = make_config(variant, dataset, prepared)
    workdir = os.path.join(out, dataset, variant)
    t0 = time.time()
    if not _finished(workdir, config.train.num_steps):
      loop.train_and_evaluate(config, workdir)
    t1 = time.time()
    metrics = _evaluated(config, workdir)
    results['variants'][variant] = metrics
    results['timings'][variant] = {'train_seconds': t1 - t0, 'eval_seconds': time.time() - t1}
    logging.info('%s/%s done: train %.0f s, eval %.0f s', dataset, variant, t1 - t0, time.time() - t1)
    _write(out, dataset, results)
  if 'full' in _VARIANTS.value:
    config = make_config('full', dataset, prepared)
    workdir = os.path.join(out, dataset, 'full')
    ft_path = os.path.join(workdir, 'eval', 'finetune.json')
    if os.path.exists(ft_path):
      with open(ft_path) as f:
        results['finetune'] = json.load(f)
    else:
      results['finetune'] = finetune_compare.compare(config, workdir)
    _write(out, dataset, results)
    results['restoration'] = {}
    for task in _TASKS.value:
      config = make_config(task, dataset, prepared)
      workdir = os.path.join(out, dataset, f'full_{task}')
      if not _finished(workdir, config.train.num_steps):
        loop.train_and_evaluate(config, workdir)
      results['restoration'][task] = _evaluated(config, workdir)
      _write(out, dataset, results)
  return results


def _evaluated(config, workdir: str) -> dict:
  """WORKDIR/eval/metrics.json when an earlier (stopped) run wrote it, else a fresh evaluation."""
  path = os.path.join(workdir, 'eval', 'metrics.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return (evaluate_restoration if config.stage == 2 else evaluate_generation)(config, workdir)


def _row(metrics: dict, keys: list[str]) -> dict:
  return {k: metrics.get(k) for k in keys}


def tables_markdown(dataset: str, results: dict) -> str:
  """Table 3 (ablation), Table 1 (vs baselines), the fine-tuning comparison and the sampler sweep."""
  cols = ['id_score', 'fd_face', 'oracle_id_accuracy', 'oracle_chance', 'oracle_fd', 'oracle_distance', 'diversity']
  v = results['variants']
  lines = [f'## {dataset}', '', '### Table 3: ablation (paper ID / FID at 128 px in the last columns)', '']
  rows = []
  for name, m in v.items():
    paper = PAPER_TABLE3.get(name, (None, None))
    rows.append(dict(_row(m, cols), row=ROW_NAMES.get(name, name), paper_id=paper[0], paper_fid=paper[1]))
  lines += [report.markdown_table(rows, cols + ['paper_id', 'paper_fid'], first='row'), '']
  ft = results.get('finetune')
  if v:
    lines += ['### Table 1: generation (paper ID / FID / Diversity in the last columns)', '']
    rows = []
    if 'diffae' in v:
      rows.append(dict(_row(v['diffae'], cols), method='DiffAE', paper=str(PAPER_TABLE1['DiffAE'])))
    if ft:
      rows.append(dict(_row(ft['finetune'], cols + ['personalize_seconds']), method='fine-tuning (MyStyle-like)*',
                       paper=str(PAPER_TABLE1['MyStyle (fine-tuning)'])))
    if 'full' in v:
      rows.append(dict(_row(v['full'], cols), method='Ours', paper=str(PAPER_TABLE1['Ours'])))
      if ft:
        rows[-1]['personalize_seconds'] = ft['encoder']['personalize_seconds']
    lines += [report.markdown_table(rows, cols + ['personalize_seconds', 'paper'], first='method'), '']
  if ft:
    lines += [f'\\* fine-tuning is measured on {ft["settings"]["num_identities"]} identities (oracle gallery: all '
              f'{ft["settings"]["oracle_gallery_identities"]}); on those same identities, seeds and sampler:', '',
              report.markdown_table([dict(ft['encoder'], method='encoder (ours)'),
                                      dict(ft['finetune'], method='fine-tuning')],
                                     ['personalize_seconds', 'compile_seconds'] + cols, first='method'), '',
              f'Personalizing with the encoder is {ft["speedup_encoder_vs_finetune"]:.0f}x faster than fine-tuning '
              f'({ft["settings"]["finetune"]["steps"]} steps) on this machine (paper: up to 29x).', '']
  for task, m in (results.get('restoration') or {}).items():
    rcols = ['lpips', 'pixel_mse', 'oracle_id_accuracy', 'oracle_fd', 'id_score', 'fd_face', 'fid']
    rows = [dict(_row(m['rows'][name], rcols), row=label) for name, label in RESTORATION_ROWS.items()
            if name in m['rows']]
    paper = PAPER_RESTORATION.get(task)
    st = m['settings']
    lines += [f'### Table 1: {"super-resolution" if task == "sr" else "inpainting"} (stage 2, '
              f'{st["checkpoint_step"]} steps; paper, ours at 128 px: ID / FID / LPIPS {paper})', '',
              report.markdown_table(rows, rcols, first='row'), '']
  sweep = v.get('full', {}).get('sweep') or []
  if sweep:
    lines += ['### Quality against sampling steps (ours)', '',
              report.markdown_table(sweep, ['steps', 'sample_seconds', 'oracle_id_accuracy', 'oracle_fd',
                                             'id_score', 'fd_face', 'diversity'], first='sampler'), '']
  return '\n'.join(lines)


def _scale() -> dict:
  return {'base': _BASE.value, 'resolution': _RESOLUTION.value, 'train_steps': _STEPS.value,
          'batch_size': _BATCH.value, 'agnostic_fraction': _AGNOSTIC_FRACTION,
          'images_per_group': _IMAGES_PER_GROUP, 'learning_rate': _LR.value,
          'ema_decay': _EMA.value,
          'timesteps': _TIMESTEPS.value,
          'train_identities': _TRAIN_IDS.value, 'test_identities': _TEST_IDS.value,
          'images_per_identity': _IMAGES_PER_ID.value, 'num_references': _NUM_REFS.value,
          'num_generated': _NUM_GEN.value, 'eval_sampler': f'{_EVAL_SAMPLER.value}:{_EVAL_STEPS.value}',
          'finetune_steps': _FT_STEPS.value, 'finetune_identities': _FT_IDS.value, 'seed': _SEED.value,
          'restoration_tasks': _TASKS.value, 'restoration_steps': _TASK_STEPS.value,
          'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}',
          'command': ' '.join(sys.argv)}


_ALL: dict = {}


def _write(out: str, dataset: str, results: dict):
  _ALL[dataset] = results
  doc = {'scale': _scale(), 'datasets': _ALL}
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(report.json_ready(doc), f, indent=2)
  md = ['# Small-scale reproduction of Tables 1 and 3', '', '```', json.dumps(_scale(), indent=2), '```', '']
  md += [tables_markdown(name, res) for name, res in _ALL.items()]
  with open(os.path.join(out, 'tables.md'), 'w') as f:
    f.write('\n'.join(md))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  out = os.path.abspath(_OUT.value)
  os.makedirs(out, exist_ok=True)
  for dataset in _DATA.value:
    if dataset not in ('synthetic', 'celeba'):
      raise app.UsageError(f'--data entries must be synthetic or celeba, got {dataset!r}')
    run_dataset(dataset, out)
  logging.info('Wrote %s/tables.md and results.json', out)


if __name__ == '__main__':
  app.run(main)
