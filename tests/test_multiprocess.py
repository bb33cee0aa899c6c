"""A real 2-process job on localhost (JAX's multi-controller runtime, gloo CPU collectives, one CPU device
per process) through launch/local_multiprocess.sh trains like one process on the same global batches (the
same loss and gradient norm at every step, the same parameters after);
the launchers are valid shell; the local launcher fails when any process fails.
"""

import os
import stat
import subprocess
import time

import jax
import numpy as np
import pytest

from idenc_jax.train import checkpoint as ckpt_lib
from idenc_jax.train import loop

import train_testing as tt

STEPS = 3
OVERRIDES = {'train.num_steps': STEPS, 'train.checkpoint_every': STEPS, 'train.log_every': 1}
LAUNCHER = os.path.join(tt.REPO, 'launch', 'local_multiprocess.sh')


def launcher_env(**extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', **extra)
  env.pop('XLA_FLAGS', None)   # one CPU device per process, not the tests' 8
  return env


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('two_processes'))
  logs = str(tmp_path_factory.mktemp('logs'))
  args = ['bash', LAUNCHER, '2', '--config=configs/base.py:tiny', f'--workdir={workdir}',
          *tt.override_flags(**OVERRIDES)]
  result = subprocess.run(args, cwd=tt.REPO, env=launcher_env(IDENC_LOG_DIR=logs), capture_output=True,
                          text=True, timeout=900)
  texts = []
  for i in range(2):
    with open(os.path.join(logs, f'process_{i}.log')) as f:
      texts.append(f.read())
  assert result.returncode == 0, result.stderr[-2000:] + '\n'.join(t[-3000:] for t in texts)
  return workdir, texts


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
  """The same run in this process (8 devices, data-parallel)."""
  workdir = str(tmp_path_factory.mktemp('one_process'))
  loop.train_and_evaluate(tt.tiny_config(**OVERRIDES), workdir)
  return workdir


def test_two_processes_form_one_job(two_processes):
  _, logs = two_processes
  for i, text in enumerate(logs):
    assert f'JAX process {i}/2, local devices: [CpuDevice(id=' in text
    assert "Mesh {'data': 2, 'fsdp': 1} over 2 devices (2 processes)" in text
    assert f'step {STEPS}/{STEPS} | loss' in text


def test_two_processes_match_one_process(two_processes, one_process):
  workdir, _ = two_processes
  assert ckpt_lib.checkpoint_step(workdir) == STEPS
  for ema in (False, True):
    got, want = ckpt_lib.load_params(workdir, ema=ema), ckpt_lib.load_params(one_process, ema=ema)
    tt.assert_trees_close(got, want, rtol=1e-4, atol=2e-5, what='ema ' if ema else 'params ')
  # Training did move the parameters (the comparison is not between two initial states).
  state = tt.read_state(workdir)
  assert int(state['step']) == STEPS
  first = jax.tree.leaves(state['params'])
  assert any(abs(a - b).max() > 1e-4 for a, b in zip(first, jax.tree.leaves(state['ema_params'])))


def test_two_processes_log_the_same_loss_and_gradient_norm_at_every_step(two_processes, one_process):
  """Adam (with clipping) ignores the gradient's scale, so equal parameters alone would not see a gradient
  summed instead of averaged over processes; the logged global gradient norm and loss per step do."""
  got, want = tt.read_scalars(two_processes[0]), tt.read_scalars(one_process)
  for tag in ('train/loss', 'train/diff_id', 'train/diff_agnostic', 'train/id_loss', 'train/grad_norm'):
    assert sorted(got[tag]) == sorted(want[tag]) == list(range(1, STEPS + 1)), tag
    np.testing.assert_allclose([got[tag][s] for s in range(1, STEPS + 1)],
                               [want[tag][s] for s in range(1, STEPS + 1)], rtol=1e-4, err_msg=tag)
  assert min(want['train/grad_norm'].values()) > 0


def test_all_processes_checkpoint_only_process_0_writes_logs(two_processes):
  workdir, _ = two_processes
  data = os.path.join(ckpt_lib.checkpoint_dir(workdir), str(STEPS), 'data')
  assert sorted(n for n in os.listdir(data) if n.startswith('process_')) == ['process_0-of-2.json',
                                                                      'process_1-of-2.json']
  events = [n for n in os.listdir(workdir) if n.startswith('events.out.tfevents')]
  assert len(events) == 1
  assert os.path.exists(os.path.join(workdir, 'config.json'))


def test_launcher_fails_when_a_process_fails(tmp_path):
  # A stand-in interpreter: process 1 fails at once, process 0 would run for a minute. The launcher
  # must stop process 0 and exit with process 1's status, long before that minute.
  fake = tmp_path / 'fake_python'
  fake.write_text('#!/usr/bin/env bash\n'
                  'echo "process $IDENC_PROCESS_ID of $IDENC_NUM_PROCESSES at $IDENC_COORDINATOR: $*"\n'
                  'if [[ "$IDENC_PROCESS_ID" == 1 ]]; then exit 3; fi\n'
                  'exec sleep 60\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  start = time.time()
  result = subprocess.run(['bash', LAUNCHER, '2', '--workdir=x'], cwd=tt.REPO, capture_output=True,
                          text=True, timeout=120,
                          env=launcher_env(PYTHON=str(fake), IDENC_COORDINATOR_PORT='12345'))
  assert result.returncode == 3
  assert time.time() - start < 30
  assert '[0] process 0 of 2 at localhost:12345: -m idenc_jax.main --workdir=x --config.distributed=True' \
      in result.stdout
  assert 'exited with status 3; stopping the others' in result.stderr


def test_launcher_succeeds_when_all_processes_succeed(tmp_path):
  fake = tmp_path / 'fake_python'
  fake.write_text('#!/usr/bin/env bash\necho "ok $IDENC_PROCESS_ID"\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  result = subprocess.run(['bash', LAUNCHER, '3'], cwd=tt.REPO, capture_output=True, text=True, timeout=60,
                          env=launcher_env(PYTHON=str(fake), IDENC_COORDINATOR_PORT='12345'))
  assert result.returncode == 0
  assert sorted(result.stdout.split('\n')[:3]) == ['[0] ok 0', '[1] ok 1', '[2] ok 2']


@pytest.mark.parametrize('script', ['local_multiprocess.sh', 'tpu_vm.sh', 'slurm.sbatch'])
def test_launchers_are_valid_bash(script):
  path = os.path.join(tt.REPO, 'launch', script)
  result = subprocess.run(['bash', '-n', path], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  with open(path) as f:
    text = f.read()
  assert '--config.distributed=True' in text


def test_launchers_refuse_missing_arguments():
  for script in ('local_multiprocess.sh', 'tpu_vm.sh'):
    result = subprocess.run(['bash', os.path.join(tt.REPO, 'launch', script)], capture_output=True,
                            text=True)
    assert result.returncode == 2 and 'usage:' in result.stderr
