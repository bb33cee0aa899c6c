"""Reports of an evaluation: metrics as JSON (NaN as null) and Markdown tables, TensorBoard scalars."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np

from idenc_jax.evaluate.evaluator import BETTER, EXTRAS, METRICS


def _fmt(v) -> str:
  if v is None:
    return 'n/a'
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


def markdown_table(rows: list[dict], columns: list[str], first: str = 'run') -> str:
  """Rows of metric dicts -> a Markdown table (null as n/a), its last row saying which way each metric is
  better (`evaluator.BETTER`)."""
  lines = ['| ' + ' | '.join([first] + columns) + ' |', '|' + '---|' * (len(columns) + 1)]
  for row in rows:
    lines.append('| ' + ' | '.join([str(row.get(first, ''))] + [_fmt(row.get(c)) for c in columns]) + ' |')
  lines.append('| ' + ' | '.join(['*better*'] + [BETTER.get(c, '') for c in columns]) + ' |')
  return '\n'.join(lines)


def metrics_markdown(metrics: dict) -> str:
  lines = ['# Evaluation', '', '| metric | value | better | note |', '|---|---|---|---|']
  for k in METRICS + EXTRAS:
    lines.append(f'| {k} | {_fmt(metrics.get(k))} | {BETTER[k]} | {metrics.get(f"{k}_skipped", "")} |')
  sweep = metrics.get('sweep') or []
  if sweep:
    cols = ['steps', 'model_calls', 'sample_seconds', 'oracle_id_accuracy', 'oracle_fd', 'id_score', 'fd_face',
            'fid', 'diversity']
    lines += ['', '## Quality against sampling steps', '', markdown_table(sweep, cols, first='sampler')]
  cols = ['oracle_id_accuracy', 'oracle_top5_accuracy', 'oracle_fd', 'id_score', 'fd_face', 'diversity',
          'sample_seconds']
  if metrics.get('guidance_sweep'):
    lines += ['', '## Identity guidance: identity against diversity', '',
              markdown_table(metrics['guidance_sweep'], cols, first='guidance')]
  if metrics.get('reference_sweep'):
    lines += ['', '## Number of references R', '',
              markdown_table(metrics['reference_sweep'], cols, first='num_references')]
  s = metrics.get('settings', {})
  lines += ['', '## Settings', '', '```', json.dumps(s, indent=2, default=str), '```', '']
  return '\n'.join(lines)


def json_ready(x):
  """Numpy scalars as Python numbers, non-finite floats as None (JSON has no NaN)."""
  if isinstance(x, dict):
    return {k: json_ready(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_ready(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return None if not math.isfinite(float(x)) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_tensorboard(logdir: str, step: int, metrics: dict):
  from clu import metric_writers  # lazy: clu's writer imports TensorFlow
  scalars = {f'eval/{k}': v for k, v in metrics.items() if isinstance(v, (int, float)) and k in METRICS + EXTRAS}
  for row in metrics.get('sweep') or []:
    scalars.update({f'eval/{row["sampler"]}_{row["steps"]}/{k}': v for k, v in row.items()
                    if isinstance(v, (int, float)) and k in METRICS + EXTRAS + ('sample_seconds',)})
  for sweep, key, tag in (('guidance_sweep', 'guidance', 'guidance_{}'), ('reference_sweep', 'num_references', 'R{}')):
    for row in metrics.get(sweep) or []:
      scalars.update({f'eval/{tag.format(row[key])}/{k}': v for k, v in row.items()
                      if isinstance(v, (int, float)) and k in METRICS + EXTRAS})
  writer = metric_writers.create_default_writer(logdir, just_logging=False)
  writer.write_scalars(step, scalars)
  writer.flush()
  writer.close()


def write_report(out_dir: str, name: str, result: dict, markdown: str) -> dict:
  """Writes OUT_DIR/NAME.json (`json_ready`) and OUT_DIR/NAME.md; returns the JSON-ready result."""
  result = json_ready(result)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out_dir, f'{name}.md'), 'w') as f:
    f.write(markdown)
  return result


def step_dir(eval_dir: str, step: int | None) -> str:
  """EVAL_DIR/step_N: where the evaluation of checkpoint N is kept (step_unknown without a step)."""
  return os.path.join(eval_dir, f'step_{step}' if step is not None else 'step_unknown')


def publish_latest(eval_dir: str, step: int | None, names: list[str]) -> None:
  """Copies the files `names` of EVAL_DIR/step_N up to EVAL_DIR, the latest evaluation's place (each copy
  replaced atomically, so a reader never sees half a file)."""
  src = step_dir(eval_dir, step)
  for name in names:
    tmp = os.path.join(eval_dir, f'.{name}.tmp')
    shutil.copyfile(os.path.join(src, name), tmp)
    os.replace(tmp, os.path.join(eval_dir, name))
