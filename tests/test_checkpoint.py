"""Stop and resume: a run stopped (at the end of a shorter run, preempted by SIGTERM, or killed by SIGKILL)
and restarted from its workdir ends bitwise-identical to an uninterrupted run, and its input pipeline
continues with the same batches.

The tiny config with 24 agnostic images (8 per batch: an epoch every 3 steps), checkpoints every 3
steps, N = 8 steps: the run stops at step 5 (no multiple of the checkpoint interval, mid-epoch), is
restarted in a subprocess and preempted at step 6 or 7 (past an epoch boundary), then finishes.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from idenc_jax.data import pipeline
from idenc_jax.train import checkpoint as ckpt_lib
from idenc_jax.train import loop
from idenc_jax.train import run_control

import train_testing as tt

N = 8
OVERRIDES = {'train.num_steps': N, 'train.checkpoint_every': 3, 'train.keep_checkpoints': 10,
             'data.synthetic_agnostic_images': 24}


def config_for(num_steps: int = N):
  return tt.tiny_config(**dict(OVERRIDES, **{'train.num_steps': num_steps}))


def checkpoint_steps(workdir: str) -> list[int]:
  return sorted(int(d) for d in os.listdir(ckpt_lib.checkpoint_dir(workdir)) if d.isdigit())


def data_state(workdir: str, step: int) -> dict:
  path = os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step), 'data', 'process_0-of-1.json')
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  loop.train_and_evaluate(config_for(), workdir)
  assert checkpoint_steps(workdir) == [3, 6, 8]
  return workdir


def assert_same_state(workdir, reference, step):
  got, want = tt.read_state(workdir, step), tt.read_state(reference, step)
  assert int(got['step']) == int(want['step']) == step
  for key in ('params', 'ema_params', 'opt_state', 'rng'):
    tt.assert_trees_equal(got[key], want[key], key)
  assert data_state(workdir, step) == data_state(reference, step)


def test_restored_pipeline_continues_with_the_same_batches(uninterrupted):
  config = config_for()
  for step in (3, 6):
    # The checkpoint at `step` resumes the pipeline at batch `step`: what a fresh pipeline yields there.
    position = data_state(uninterrupted, step)
    restored = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    restored.set_state(position)
    fresh = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    expected = [next(fresh) for _ in range(step + 2)][step:]
    for want in expected:
      got = next(restored)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f'{key} after step {step}')


def test_finished_run_restarts_as_a_no_op(uninterrupted):
  before = tt.read_state(uninterrupted)
  state = loop.train_and_evaluate(config_for(), uninterrupted)
  assert int(state.step) == N and checkpoint_steps(uninterrupted) == [3, 6, 8]
  tt.assert_trees_equal(jax.device_get(state.params), before['params'])


def _start(workdir: str) -> subprocess.Popen:
  # The subprocess inherits the test environment: 8 CPU devices, as in this process, so it runs the
  # very same compiled step (and finds it in the compilation cache).
  args = ['--config=configs/base.py:tiny', f'--workdir={workdir}', *tt.override_flags(**OVERRIDES)]
  return subprocess.Popen([sys.executable, '-m', 'idenc_jax.main', *args], cwd=tt.REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_step(process: subprocess.Popen, log: list[str]) -> int:
  """Reads the log (absl writes it to stderr) until the first 'step S/N' line; returns S."""
  for line in process.stderr:
    log.append(line)
    if '] step ' in line and f'/{N} | loss' in line:
      return int(line.split('] step ')[1].split('/')[0])
  process.wait()
  raise AssertionError(f'no step logged (exit {process.returncode}):\n' + ''.join(log[-30:]))


def _finish(process: subprocess.Popen, log: list[str], timeout: float = 600) -> int:
  log.extend(process.stderr)
  return process.wait(timeout=timeout)


def test_stop_preempt_and_resume_is_bitwise_identical(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  # 1. A shorter run ends at step 5, between checkpoints and mid-way through an agnostic epoch.
  loop.train_and_evaluate(config_for(5), workdir)
  assert checkpoint_steps(workdir) == [3, 5]
  assert_same_state(workdir, uninterrupted, 3)

  # 2. Restarted in a subprocess, which resumes at step 5 and is preempted (SIGTERM) at its first logged
  # step: it saves a checkpoint at the step it reached and exits 0. SIGSTOP first, so the signal
  # surely arrives before the run could finish.
  log = []
  process = _start(workdir)
  try:
    first = _wait_for_step(process, log)
    process.send_signal(signal.SIGSTOP)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
  finally:
    returncode = _finish(process, log)
  text = ''.join(log)
  assert returncode == 0, text[-3000:]
  assert 'Resuming from the workdir checkpoint at step 5.' in text
  preempted = [line for line in log if 'Preempted at step' in line]
  assert len(preempted) == 1, text[-3000:]
  stopped = int(preempted[0].split('Preempted at step ')[1].split(':')[0])
  assert first == 6 and stopped in (6, 7)
  assert checkpoint_steps(workdir) == [3, 5, 6] + ([7] if stopped == 7 else [])
  assert_same_state(workdir, uninterrupted, 6)   # past the agnostic epoch boundary at step 6

  # 3. Restarted (in this process) to the end: exactly the uninterrupted run.
  loop.train_and_evaluate(config_for(), workdir)
  assert_same_state(workdir, uninterrupted, N)


def test_sigkill_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  # Killed hard once step 7 is logged: the checkpoint of step 3 is complete (the asynchronous save at
  # step 6 first waited for it); that of step 6 may be half-written, and orbax then ignores it.
  log = []
  process = _start(workdir)
  try:
    killed_after = _wait_for_step(process, log)
    while killed_after < 7:
      killed_after = _wait_for_step(process, log)
    process.kill()
  finally:
    _finish(process, log)
  assert checkpoint_steps(workdir)[-1] in (3, 6), ''.join(log[-30:])
  loop.train_and_evaluate(config_for(), workdir)   # resumes from the last complete checkpoint
  assert_same_state(workdir, uninterrupted, N)


def test_time_budget_stops_with_a_checkpoint_and_resumes_exactly(uninterrupted, tmp_path):
  """train.time_budget_minutes: past the budget the run checkpoints the step it is at and stops
  (on_checkpoint sees it); the same workdir without a budget then ends as the uninterrupted run."""
  workdir = str(tmp_path / 'budget')
  config = config_for()
  config.train.time_budget_minutes = 1e-9     # over as soon as the first step is done
  seen = []
  state = loop.train_and_evaluate(config, workdir, on_checkpoint=seen.append)
  assert int(state.step) == 1 and seen == [1] and checkpoint_steps(workdir) == [1]
  loop.train_and_evaluate(config_for(), workdir)
  assert_same_state(workdir, uninterrupted, N)
  with pytest.raises(ValueError, match='time_budget_minutes'):
    run_control.TimeBudget(-1.0, 0.0)
