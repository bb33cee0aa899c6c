"""A curve variant's training run, timed: WORKDIR/clock.json records the wall time at each checkpoint, from
the start of the run (compile included), and its presence means the run finished; a finished run with a
constant learning rate can be continued to more steps, its clock following on. While a run trains, its clock
so far is kept in WORKDIR/clock.partial.json at every checkpoint, so a stopped run (first or continued) goes on
from its last checkpoint with what is left of its time budget, its clock following on from that checkpoint's."""

from __future__ import annotations

import json
import os
import time

from absl import logging

from idenc_jax import cli, xla_options
from idenc_jax.train import checkpoint as ckpt_lib
from idenc_jax.train import loop, resume


# What a continued run may change: how long it trains and how it is recorded, nothing that shapes the weights.
_EXTEND_MAY_CHANGE = ('train.num_steps', 'train.time_budget_minutes', 'train.checkpoint_every',
                      'train.keep_checkpoints', 'train.log_every', 'train.sample_every', 'compilation_cache_dir')
_TRAINING_SECTIONS = ('seed', 'stage', 'init_from', 'model', 'encoder', 'stage2', 'diffusion', 'loss', 'data',
                      'train')


_CLOCK, _PARTIAL = 'clock.json', 'clock.partial.json'


def _read_json(workdir: str, name: str):
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(workdir: str, name: str, value) -> None:
  tmp = os.path.join(workdir, name + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, os.path.join(workdir, name))   # never a half-written clock


def _read_clock(workdir: str) -> dict[str, float] | None:
  return _read_json(workdir, _CLOCK)


def _stopped_run(workdir: str, finished: dict[str, float] | None) -> dict | None:
  """The clock of a run stopped after a checkpoint ({'clock': {step: s}, 'budget_start': s}), if its last
  timed step is the workdir's last checkpoint and lies beyond `finished` (its clock.json, if any); else None."""
  partial = _read_json(workdir, _PARTIAL)
  if not partial or not partial['clock']:
    return None
  last = _last_step(partial['clock'])
  if ckpt_lib.checkpoint_step_or_none(workdir) != last or (finished and _last_step(finished) >= last):
    return None
  return partial


def _last_step(clock: dict[str, float]) -> int:
  return max(int(s) for s in clock)


def to_extend(config, workdir: str) -> bool:
  """Whether `--extend` continues the finished run in `workdir` (its last checkpoint is below
  train.num_steps); a ValueError, before anything trains, where continuing would not give the run trained
  straight to train.num_steps: a decaying learning rate (its horizon moves), a config that differs from the
  run's own config.json in anything but how long it trains, or checkpoints that do not end where its clock does."""
  clock = _read_clock(workdir)
  if not clock:
    return False
  last = _last_step(clock)
  if last >= config.train.num_steps:
    logging.info('%s: finished at step %d >= --max_steps=%d, nothing to extend.', workdir, last,
                 config.train.num_steps)
    return False
  if config.train.lr_schedule != 'constant':
    raise ValueError(f'{workdir}: train.lr_schedule={config.train.lr_schedule!r} decays over train.num_steps, so '
                     'continuing the run to more steps would not be the run trained to them; only a constant '
                     'learning rate can be extended.')
  # Fields one side lacks (added to the config after the run trained) are not counted as changes.
  changed = {k: old for k, (old, new) in resume.config_changes(config, workdir).items()
             if k.split('.')[0] in _TRAINING_SECTIONS and k not in _EXTEND_MAY_CHANGE
             and old is not None and new is not None
             and not (k == 'train.compiler_options' and xla_options.same_values(old, new, 'config.' + k))}
  if changed:
    raise ValueError(f'{workdir} was trained with ' + ', '.join(f'{k}={old!r}' for k, old in changed.items()) +
                     '; a continued run must keep them (pass the same config and overrides as its first run).')
  latest = ckpt_lib.checkpoint_step(workdir)
  if latest != last and not _stopped_run(workdir, clock):
    raise ValueError(f'{workdir}/checkpoints ends at step {latest} but its clock.json at step {last}, so the '
                     'new wall times would not follow on: keep only the checkpoints up to the clock\'s last step.')
  return True


def train_variant(config, workdir: str, *, extend: bool = False) -> dict[str, float]:
  """Trains `config` in `workdir` for its time budget; returns {step: seconds since the start} per checkpoint
  (kept in WORKDIR/clock.json, whose presence means the training finished). With `extend` (checked by
  `to_extend`), a finished run resumes from its last checkpoint for another time budget; its new checkpoints'
  times continue from the last recorded one (the restart's compile counts, as a user would wait for it). A
  stopped run resumes from its last checkpoint for what is left of its budget (the time between that checkpoint
  and the stop is not counted: no checkpoint holds its steps)."""
  clock = _read_clock(workdir)
  if clock is not None and not extend:
    return clock
  stopped = _stopped_run(workdir, clock)
  if stopped:
    clock = stopped['clock']
    logging.info('%s: resuming the stopped run from step %d.', workdir, _last_step(clock))
  elif clock is None and ckpt_lib.checkpoint_step_or_none(workdir) is not None:
    raise ValueError(f'{workdir} holds checkpoints but no clock of them (a run stopped before its first timed '
                     'checkpoint, or by an older version): its wall times are lost; delete the folder to train the '
                     'variant again.')
  clock = clock or {}
  resumed_at = clock[str(_last_step(clock))] if clock else 0.0
  # A stopped run's budget began where it first started; a new or continued one's begins now.
  budget_start = stopped['budget_start'] if stopped else resumed_at
  budget = config.train.time_budget_minutes
  if budget > 0:
    left = budget - (resumed_at - budget_start) / 60
    if left <= 0:   # stopped after the checkpoint that ended its budget
      return _finish(workdir, clock)
    config = cli.apply_overrides(config, {'train.time_budget_minutes': left})
  t0 = time.time() - resumed_at

  def on_checkpoint(step):
    clock[str(step)] = time.time() - t0
    _write_json(workdir, _PARTIAL, {'clock': clock, 'budget_start': budget_start})

  # Interrupted (Ctrl-C or SIGTERM) propagates: the variants after this one must not start.
  loop.train_and_evaluate(config, workdir, on_checkpoint=on_checkpoint, raise_on_signal=True)
  return _finish(workdir, clock)


def _finish(workdir: str, clock: dict[str, float]) -> dict[str, float]:
  """Writes the finished run's clock.json (the mark of a finished run), then drops its partial clock."""
  _write_json(workdir, _CLOCK, clock)
  if os.path.exists(os.path.join(workdir, _PARTIAL)):
    os.remove(os.path.join(workdir, _PARTIAL))
  return clock
