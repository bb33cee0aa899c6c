"""The training loop end to end (tiny config, in-process on 8 simulated devices unless noted):
a NaN stops the run and keeps the last good checkpoint; stage 0 -> stage 1 initialisation copies the
generator exactly; TensorBoard metrics, config.json and sample grids are written; the diffusion loss
over-fits a handful of images and the EMA follows its warm-up; main.py rejects misspelt config fields and
missing modes clearly.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from idenc_jax.train import losses
from idenc_jax.data import pipeline
from idenc_jax.train import checkpoint as ckpt_lib
from idenc_jax.train import loop
from idenc_jax.train import resume
from idenc_jax.train import sharding as sharding_lib
from idenc_jax.train import state as state_lib
from idenc_jax.train import step as step_lib

import train_testing as tt

NAN_AT = 4   # state step whose update gets a NaN loss in the stage-0 run


# ---------------------------------------------------------------------------------------------------------
# Stage 0 with a NaN on purpose; its last good checkpoint then initialises stage 1.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def stage0_run(tmp_path_factory):
  """Stage 0 trained until its loss turns NaN at state step NAN_AT: (workdir, the error raised)."""
  workdir = str(tmp_path_factory.mktemp('stage0'))
  config = tt.tiny_config('tiny,stage0', **{'train.num_steps': 8, 'train.checkpoint_every': 2})
  real_loss = losses.compute_loss

  def nan_at_step(params, batch, rng, step, **kwargs):
    loss, metrics = real_loss(params, batch, rng, step, **kwargs)
    return jnp.where(step == NAN_AT, jnp.nan, loss), metrics

  mp = pytest.MonkeyPatch()
  mp.setattr(losses, 'compute_loss', nan_at_step)  # read by the step when it is traced
  try:
    with pytest.raises(loop.NonFiniteLossError) as error:
      loop.train_and_evaluate(config, workdir)
  finally:
    mp.undo()
  return workdir, error.value


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(stage0_run):
  workdir, error = stage0_run
  assert f'train step {NAN_AT + 1} ' in str(error) and f'from step {NAN_AT})' in str(error)
  # Steps 1..NAN_AT were good; the NaN step left the state alone, and nothing after it was saved.
  steps = sorted(int(d) for d in os.listdir(ckpt_lib.checkpoint_dir(workdir)) if d.isdigit())
  assert steps[-1] == NAN_AT
  state = tt.read_state(workdir)
  assert int(state['step']) == NAN_AT
  for leaf in jax.tree.leaves((state['params'], state['ema_params'], state['opt_state'])):
    assert np.all(np.isfinite(leaf))
  assert f'(step {NAN_AT})' in str(error)


def test_stage1_initialises_from_stage0(stage0_run, tmp_path):
  stage0_dir, _ = stage0_run
  stage0 = ckpt_lib.load_params(stage0_dir, ema=True)
  assert sorted(stage0) == ['generator']
  config = tt.tiny_config(init_from=stage0_dir)
  mesh = sharding_lib.make_mesh(config)

  def initial(cfg, workdir):
    checkpointer = ckpt_lib.Checkpointer(workdir, save_every=1, keep=1)
    try:
      return jax.device_get(resume.initial_state(cfg, mesh, checkpointer, ckpt_lib.DataPosition())[0])
    finally:
      checkpointer.close()

  state = initial(config, str(tmp_path / 'from_stage0'))
  fresh = initial(tt.tiny_config(), str(tmp_path / 'fresh'))
  assert int(state.step) == 0
  gen0 = tt.flat(stage0['generator'])
  for tree in (state.params, state.ema_params):
    gen1 = tt.flat(tree['generator'])
    fresh1 = tt.flat(fresh.params['generator'])
    # Every array of the stage-0 EMA generator is copied exactly, into params and EMA alike ...
    for k, v in gen0.items():
      assert gen1[k].dtype == v.dtype and np.array_equal(gen1[k], v), k
    # ... and what stage 0 lacks (the identity-conditioning projections) is exactly the fresh init.
    new = sorted(set(gen1) - set(gen0))
    assert new and all('cond_proj' in k for k in new)
    assert all(np.array_equal(gen1[k], fresh1[k]) for k in new)
    tt.assert_trees_equal(tree['encoder'], fresh.params['encoder'], 'encoder')
  # The copy is real: stage 0 trained, so its generator differs from a fresh one.
  assert any(not np.array_equal(v, tt.flat(fresh.params['generator'])[k]) for k, v in gen0.items())
  # Adam starts from zero moments.
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(state.opt_state))


def test_init_from_rejects_a_different_architecture(stage0_run):
  stage0_dir, _ = stage0_run
  config = tt.tiny_config(init_from=stage0_dir, **{'model.base_channels': 8})
  fresh = jax.eval_shape(lambda r: state_lib.init_params(config, r), jax.random.key(0))
  loaded = ckpt_lib.load_params(stage0_dir)
  with pytest.raises(ValueError, match=r'generator/conv_in/bias has shape \(16,\) in the checkpoint but '
                                       r'\(8,\) in this model; the architectures differ'):
    state_lib.params_from_earlier_stage(config, fresh, loaded)
  with pytest.raises(ValueError, match='no generator'):
    state_lib.params_from_earlier_stage(config, fresh, {'encoder': loaded['generator']})


def test_init_from_a_missing_checkpoint_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint found'):
    ckpt_lib.load_params(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# Metrics, config and sample grids of a short stage-1 run.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def short_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('stage1'))
  config = tt.tiny_config(**{'train.num_steps': 2, 'train.sample_every': 2, 'train.checkpoint_every': 2})
  loop.train_and_evaluate(config, workdir)
  return config, workdir


def test_metrics_are_written_to_tensorboard(short_run):
  _, workdir = short_run
  scalars = tt.read_scalars(workdir)
  for tag in ('loss', 'diff_id', 'diff_agnostic', 'id_loss', 'grad_norm', 'learning_rate',
              'curriculum_p', 'images_per_s', 'step_time_s'):
    assert sorted(scalars[f'train/{tag}']) == [1, 2], tag
  # Values that can be checked by hand: warm-up lr(step) = 1e-3 * step / 2; p(step) = 1 - 0.95 step/1500.
  assert scalars['train/learning_rate'] == pytest.approx({1: 0.0, 2: 5e-4})
  assert scalars['train/curriculum_p'] == pytest.approx({1: 1.0, 2: 1 - 0.95 / 1500})
  assert all(0.5 < v < 2.0 for v in scalars['train/diff_id'].values())   # unit-variance noise
  assert all(v > 0 for v in scalars['train/images_per_s'].values())


def test_config_json_is_the_resolved_config(short_run):
  config, workdir = short_run
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['train']['num_steps'] == 2 and saved['model']['resolution'] == 16
  assert saved == json.loads(config.to_json_best_effort())


def test_sample_grid_shows_held_out_references_beside_samples(short_run):
  config, workdir = short_run
  path = os.path.join(workdir, 'samples', 'step_0000002.png')
  grid = np.asarray(Image.open(path).convert('RGB'))
  held_out = pipeline.make_eval_identities(config, 'test', max_identities=config.train.sample_identities)
  r, n_ref, gap = config.model.resolution, config.train.num_references, 2
  rows = [v for v in held_out.values() if len(v) > n_ref]
  assert grid.shape == (len(rows) * (r + gap) - gap, (n_ref + 4) * (r + gap) - gap, 3)
  for i, images in enumerate(rows):
    for j in range(n_ref):
      cell = grid[i * (r + gap):i * (r + gap) + r, j * (r + gap):j * (r + gap) + r]
      np.testing.assert_array_equal(cell, images[j])
    samples = grid[i * (r + gap):i * (r + gap) + r, n_ref * (r + gap):]
    assert samples.std() > 0   # generated, not blank
  # The held-out identities are not training identities: no reference is a training image.
  train_images = np.concatenate(list(pipeline.make_eval_identities(config, 'train').values()))
  for images in rows:
    for ref in images[:n_ref]:
      assert not np.any(np.all(train_images == ref, axis=(1, 2, 3)))


# ---------------------------------------------------------------------------------------------------------
# Over-fitting: one fixed batch of 16 images (8 of 2 identities, 8 agnostic), one device.
# ---------------------------------------------------------------------------------------------------------
OVERFIT_STEPS = 60


def test_diffusion_loss_overfits_a_handful_of_images_and_ema_warms_up():
  config = tt.tiny_config()
  batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
  mesh = sharding_lib.make_mesh(tt.tiny_config(**{'mesh.data': 1}), jax.devices()[:1])
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(lambda r: state_lib.create_train_state(config, r), rng)
  shardings = sharding_lib.state_shardings(abstract, mesh)
  state = jax.jit(lambda r: state_lib.create_train_state(config, r), out_shardings=shardings)(rng)
  optimizer = state_lib.make_optimizer(config, state.params)
  step = jax.jit(step_lib.make_train_step(config, optimizer),
                 in_shardings=(shardings, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))
  batch = sharding_lib.global_batch(batch, mesh)
  history, params_seen, ema_seen = [], [jax.device_get(state.params)], [jax.device_get(state.ema_params)]
  for i in range(OVERFIT_STEPS):
    state, metrics = step(state, batch)
    history.append(metrics)
    if i < 3:
      params_seen.append(jax.device_get(state.params))
      ema_seen.append(jax.device_get(state.ema_params))
  history = jax.device_get(history)
  # The EMA's warm-up, against a float64 numpy recursion: decay at update n is min(0.999, (1+n)/(10+n)).
  assert [float(m['ema_decay']) for m in history[:3]] == pytest.approx([1 / 10, 2 / 11, 3 / 12])
  expected = jax.tree.map(lambda p: np.asarray(p, np.float64), params_seen[0])
  for n in range(3):
    d = min(0.999, (1 + n) / (10 + n))
    expected = jax.tree.map(lambda e, p: e + (1 - d) * (np.asarray(p, np.float64) - e), expected,
                            params_seen[n + 1])
    tt.assert_trees_close(ema_seen[n + 1], expected, rtol=1e-5, atol=1e-7, what=f'ema after {n + 1} steps')
  diff = np.array([(m['diff_id'] + m['diff_agnostic']) / 2 for m in history])
  assert all(m['finite'] for m in history)
  start, end = diff[:10].mean(), diff[-20:].mean()
  print(f'diffusion loss over-fitting 16 images: first 10 steps {start:.3f}, last 20 steps {end:.3f}')
  assert start > 0.5
  assert end < 0.5 * start, (start, end)


# ---------------------------------------------------------------------------------------------------------
# main.py: clear errors for a misspelt config field and for a mode whose module is missing.
# ---------------------------------------------------------------------------------------------------------
def test_misspelt_config_field_is_a_clear_error(tmp_path):
  result = tt.run_main(['--config=configs/base.py:tiny', f'--workdir={tmp_path}', '--config.train.foo=1'],
                       timeout=120)
  assert result.returncode != 0
  assert 'no such config field: --config.train.foo=1' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.listdir(tmp_path)   # nothing ran


@pytest.mark.parametrize('mode,module', [('sample', 'idenc_jax.personalize.sample_mode'),
                                         ('eval', 'idenc_jax.evaluate.generation')])
def test_mode_with_missing_module_is_a_clear_error(tmp_path, mode, module):
  # The module is made unimportable in the subprocess (a None entry in sys.modules), as in an
  # installation that lacks it.
  code = (f'import sys; sys.modules[{module!r}] = None; from absl import app; from idenc_jax import main; '
          f'app.run(main.main, argv=["main", "--config=configs/base.py:tiny", "--workdir={tmp_path}", '
          f'"--mode={mode}"])')
  result = subprocess.run([sys.executable, '-c', code], cwd=tt.REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode != 0
  assert f'--mode={mode} needs the module {module}, which this installation does not have' in result.stderr


@pytest.mark.parametrize('kind', ['constant', 'cosine'])
def test_learning_rate_schedule_matches_its_formula(kind):
  """Warm-up 0 -> lr over W steps, then lr (constant) or lr (1 + cos(pi (n - W) / (N - W))) / 2 (cosine)."""
  config = tt.tiny_config('tiny', **{'train.lr_schedule': kind, 'train.learning_rate': 1e-3,
                                     'train.warmup_steps': 10, 'train.num_steps': 110})
  schedule = state_lib.learning_rate_schedule(config)
  for n in (0, 5, 10, 35, 60, 109, 110):
    if n < 10:
      want = 1e-3 * n / 10
    elif kind == 'constant':
      want = 1e-3
    else:
      want = 1e-3 * 0.5 * (1 + np.cos(np.pi * (n - 10) / 100))
    np.testing.assert_allclose(float(schedule(n)), want, rtol=1e-5, atol=1e-9, err_msg=f'step {n}')


def test_unknown_learning_rate_schedule_is_named():
  with pytest.raises(ValueError, match='train.lr_schedule'):
    state_lib.learning_rate_schedule(tt.tiny_config('tiny', **{'train.lr_schedule': 'cosin'}))


def test_console_is_one_line_per_log_point_with_an_eta(tmp_path):
  """The main job's console (tiny config, 4 steps, a log point every step): one `step | loss | img/s | ETA` line
  per log point, the parameter table in WORKDIR/parameters.txt and not on the console, no metric or
  hyperparameter line from the TensorBoard writer, no line twice."""
  result = tt.run_main(['--config=configs/base.py:tiny', f'--workdir={tmp_path}'])
  assert result.returncode == 0, result.stderr[-3000:]
  # absl's Python log lines (TensorFlow's C++ start-up notices, printed on its import, are not ours).
  ours = [line for line in (result.stdout + result.stderr).splitlines()
          if re.match(r'[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+\.py:\d+\] ', line)]
  progress = [line for line in ours if re.search(r'\] step \d/4 \| loss \d+\.\d{4} \| [\d.]+ img/s \| ETA \d+s$', line)]
  assert [int(re.search(r'step (\d)/', line).group(1)) for line in progress] == [1, 2, 3, 4]
  text = result.stdout + result.stderr
  for noise in ('train/loss=', 'Hyperparameters', 'Setting work unit notes', '| Name ', '+----', 'libtpu'):
    assert noise not in text, noise
  logged = [line.split('] ', 1)[1] for line in ours]
  assert len(logged) == len(set(logged)), 'a line printed twice'
  assert len(logged) <= 12, logged           # start-up, parameters, compile, memory, 4 steps, a checkpoint note
  assert 'Parameters: encoder ' in text and 'parameters.txt' in text
  table = (tmp_path / 'parameters.txt').read_text()
  assert '| Name ' in table and 'generator/' in table and 'encoder/' in table
