"""The time-to-identity curve command: variant parsing, standard errors, and one tiny end-to-end run."""

import json
import math
import os

import jax
import numpy as np
import pytest

from configs import base
from idenc_jax.experiments import curve, timed_run
from idenc_jax.train import checkpoint as ckpt_lib

from test_personalize import shrink  # noqa: E402


def test_parse_variant():
  assert curve.parse_variant('base:') == ('base', {})
  assert curve.parse_variant('minsnr:loss.weighting=min_snr; train.learning_rate=2e-3') == (
      'minsnr', {'loss.weighting': 'min_snr', 'train.learning_rate': '2e-3'})
  assert curve.parse_variant('wide:model.channel_mult=(1,2,2)') == ('wide', {'model.channel_mult': '(1,2,2)'})
  for bad in ('nocolon', ':x=1', 'a b:x=1', 'v:loss.weighting'):
    with pytest.raises(ValueError, match='--variant'):
      curve.parse_variant(bad)


def test_standard_error_is_the_binomial_one():
  assert curve.standard_error(0.25, 256) == pytest.approx(math.sqrt(0.25 * 0.75 / 256))
  assert curve.standard_error(None, 256) is None and curve.standard_error(0.5, 0) is None


def test_seeds_expand_each_variant_into_one_run_per_seed():
  assert curve.parse_seeds('0, 1,3') == [0, 1, 3] and curve.parse_seeds('') == []
  for bad in ('0,x', '1,1', '-1'):
    with pytest.raises(ValueError, match='--seeds'):
      curve.parse_seeds(bad)
  runs, groups = curve.expand_seeds([('base', {}), ('m3', {'data.images_per_identity': '3'})], [0, 2])
  assert runs == [('base_s0', {'seed': '0'}), ('base_s2', {'seed': '2'}),
                  ('m3_s0', {'data.images_per_identity': '3', 'seed': '0'}),
                  ('m3_s2', {'data.images_per_identity': '3', 'seed': '2'})]
  assert groups == {'base': ['base_s0', 'base_s2'], 'm3': ['m3_s0', 'm3_s2']}
  assert curve.expand_seeds([('a', {})], []) == ([('a', {})], {'a': ['a']})
  with pytest.raises(ValueError, match='sets seed itself'):
    curve.expand_seeds([('a', {'seed': '4'})], [0, 1])


def test_seed_summary_means_errors_and_paired_differences_against_numpy():
  def point(step, acc, fd):
    return curve.make_point(step, step / 250, 5.0, 256, {'oracle_id_accuracy': acc, 'oracle_top5_accuracy': 0.5,
                                                         'oracle_fd': fd, 'diversity': 0.1})
  base = [0.2, 0.3, 0.25]
  other = [0.3, 0.3, 0.35]
  curves = {f'base_s{i}': [point(1000, a, 3.0 + i)] for i, a in enumerate(base)}
  curves.update({f'm3_s{i}': [point(1000, a, 2.0)] for i, a in enumerate(other)})
  curves['m3_s2'].append(point(2000, 0.4, 2.0))      # a step only one run reached: not summarised
  groups = {'base': ['base_s0', 'base_s1', 'base_s2'], 'm3': ['m3_s0', 'm3_s1', 'm3_s2']}
  rows = curve.seed_summary(curves, groups)
  assert [(r['variant'], r['step']) for r in rows] == [('base', 1000), ('m3', 1000)]
  sem = lambda x: np.std(x, ddof=1) / np.sqrt(len(x))
  assert rows[0]['oracle_id_accuracy'] == pytest.approx(np.mean(base))
  assert rows[0]['oracle_id_accuracy_sem'] == pytest.approx(sem(base))
  assert rows[0]['oracle_fd'] == pytest.approx(4.0) and 'oracle_id_accuracy_minus_first' not in rows[0]
  diffs = np.subtract(other, base)
  assert rows[1]['oracle_id_accuracy_minus_first'] == pytest.approx(np.mean(diffs))
  assert rows[1]['oracle_id_accuracy_minus_first_sem'] == pytest.approx(sem(diffs))
  assert rows[1]['oracle_id_accuracy_sem'] == pytest.approx(sem(other)) and rows[1]['seeds'] == 3
  table = curve.curve_markdown(curves, rows)
  assert '## Over seeds' in table and '| m3 | 1000 |' in table
  # Groups of one run (no --seeds) have no spread to report.
  assert curve.seed_summary(curves, {'base_s0': ['base_s0']}) == []


def test_face_points_take_their_errors_over_the_right_counts_and_plot(tmp_path):
  # Real faces: no oracle; dlib found a face in 200 of 272 samples, 30 of them its own identity's.
  m = {'face_rate': 200 / 272, 'no_face_generated': 72, 'id_accuracy': 30 / 200, 'id_chance': 1 / 34,
       'id_score': 0.61, 'diversity': 0.1, 'oracle_id_accuracy': None}
  p = curve.make_point(2000, 12.5, 5.0, 272, m)
  assert p['face_rate_se'] == pytest.approx(math.sqrt((200 / 272) * (72 / 272) / 272))
  assert p['id_accuracy_se'] == pytest.approx(math.sqrt(0.15 * 0.85 / 200))   # over the faces found, not 272
  assert p['oracle_id_accuracy_se'] is None and p['id_chance'] == pytest.approx(1 / 34)
  no_face = curve.make_point(1000, 6.0, 5.0, 272, {**m, 'face_rate': 0.0, 'no_face_generated': 272,
                                                     'id_accuracy': None})
  assert no_face['id_accuracy_se'] is None and no_face['face_rate_se'] == 0.0
  curves = {'full': [no_face, p], 'diffae': [p]}
  table = curve.curve_markdown(curves)
  assert '| face_rate |' in table.replace('face_rate_se', '') and 'oracle_id_accuracy' not in table
  curve.plot(curves, str(tmp_path / 'faces.png'), 'faces')
  assert (tmp_path / 'faces.png').stat().st_size > 1000


def test_a_misspelt_variant_field_fails_before_training(tmp_path):
  with pytest.raises(ValueError, match='unknown config field'):
    curve.run_curves(base.get_config('tiny'), str(tmp_path), [('a', {}), ('b', {'loss.weighing': 'min_snr'})],
                     minutes=1, eval_every=1, weights=[1.0])
  # A decaying learning rate needs a horizon in steps, which a time budget alone does not give.
  with pytest.raises(ValueError, match='--max_steps'):
    curve.run_curves(base.get_config('tiny'), str(tmp_path), [('cos', {'train.lr_schedule': 'cosine'})],
                     minutes=1, eval_every=1, weights=[1.0])
  # A batch the layout cannot split (24 x 0.25 = 6 agnostic leaves 18 identity images, not groups of 4).
  with pytest.raises(ValueError, match=r'--variant b24: The identity part of the batch, 18 images'):
    curve.run_curves(base.get_config('tiny'), str(tmp_path), [('a', {}), ('b24', {'train.batch_size': '24',
                     'data.agnostic_fraction': '0.25'})], minutes=1, eval_every=1, weights=[1.0])
  assert not os.listdir(tmp_path)


def test_tiny_curve_end_to_end(tmp_path):
  config = base.get_config('tiny')
  shrink(config)
  config.eval.steps = 2
  result = curve.run_curves(config, str(tmp_path), [('plain', {}), ('cfg', {'loss.null_identity_prob': '0.2'})],
                            minutes=1e-9, eval_every=5, weights=[1.0, 2.0])
  for name in ('plain', 'cfg'):
    points = result['curves'][name]
    # The budget ends the run after its first step, which is checkpointed, timed and evaluated at both weights.
    assert [(p['step'], p['guidance']) for p in points] == [(1, 1.0), (1, 2.0)]
    for p in points:
      assert p['minutes'] > 0 and 0 <= p['oracle_id_accuracy'] <= 1 and p['samples'] == 4 * 2
      assert p['oracle_id_accuracy_se'] == pytest.approx(curve.standard_error(p['oracle_id_accuracy'], 8))
    assert json.load(open(tmp_path / name / 'clock.json')).keys() == {'1'}
  saved = json.load(open(tmp_path / 'curve.json'))
  assert saved['curves'] == json.loads(json.dumps(result['curves']))
  assert saved['variants'] == {'plain': {}, 'cfg': {'loss.null_identity_prob': '0.2'}}
  assert (tmp_path / 'curve.png').stat().st_size > 1000 and '## cfg' in (tmp_path / 'curve.md').read_text()
  # A second call reuses the finished training and the evaluated points.
  again = curve.run_curves(config, str(tmp_path), [('plain', {})], minutes=1e-9, eval_every=5, weights=[1.0, 2.0])
  assert again['curves']['plain'] == result['curves']['plain']
  # Runs grouped as one recipe's seeds: the report gains their means (here over the two finished runs).
  grouped = curve.run_curves(config, str(tmp_path), [('plain', {}), ('cfg', {'loss.null_identity_prob': '0.2'})],
                             minutes=1e-9, eval_every=5, weights=[1.0], groups={'both': ['plain', 'cfg']})
  rows = grouped['seed_summary']   # one row per (step, guidance): the points evaluated before are kept
  assert [(r['variant'], r['step'], r['guidance'], r['seeds']) for r in rows] == [('both', 1, 1.0, 2),
                                                                                 ('both', 1, 2.0, 2)]
  accs = [result['curves'][n][0]['oracle_id_accuracy'] for n in ('plain', 'cfg')]
  assert rows[0]['oracle_id_accuracy'] == pytest.approx(np.mean(accs))
  assert json.load(open(tmp_path / 'curve.json'))['seed_summary'] == rows
  assert '## Over seeds' in (tmp_path / 'curve.md').read_text()


def test_extend_continues_a_finished_run_and_times_it_from_where_it_stopped(tmp_path):
  config = base.get_config('tiny')
  shrink(config)
  config.eval.steps = 2
  first = curve.run_curves(config, str(tmp_path), [('a', {})], minutes=10, eval_every=2, weights=[1.0], max_steps=2)
  assert [p['step'] for p in first['curves']['a']] == [2]
  # Without --extend a finished run is kept as it is, whatever --max_steps says.
  same = curve.run_curves(config, str(tmp_path), [('a', {})], minutes=10, eval_every=2, weights=[1.0], max_steps=4)
  assert same['curves']['a'] == first['curves']['a']
  # Refusals come before anything trains: a decaying learning rate (its horizon would move) and a config
  # that differs from the run's own in what shapes the weights.
  for overrides, message in (({'train.lr_schedule': 'cosine'}, 'only a constant learning rate can be extended'),
                             ({'loss.null_identity_prob': '0.3'}, r'trained with loss.null_identity_prob=0.0; '),
                             # YNNPACK off sums in another order: another trajectory.
                             ({'train.compiler_options': 'xla_cpu_experimental_ynn_fusion_type='},
                              'trained with train.compiler_options=')):
    with pytest.raises(ValueError, match=message):
      curve.run_curves(config, str(tmp_path), [('new', {}), ('a', overrides)], minutes=10, eval_every=2,
                       weights=[1.0], max_steps=4, extend=True)
    assert not (tmp_path / 'new').exists()
  with pytest.raises(ValueError, match='pass --max_steps'):
    curve.run_curves(config, str(tmp_path), [('a', {})], minutes=10, eval_every=2, weights=[1.0], extend=True)
  # The clock goes on from step 2's recorded time (set far ahead here, so a restart from zero would show).
  json.dump({'2': 1e6}, open(tmp_path / 'a' / 'clock.json', 'w'))
  # Continued without the copy-insertion option it trained with, which changes no value: still the same run.
  neutral = config.train.compiler_options.replace(base.NO_STATE_COPIES, '')
  assert neutral != config.train.compiler_options
  more = curve.run_curves(config, str(tmp_path), [('a', {'train.compiler_options': neutral})], minutes=10,
                          eval_every=2, weights=[1.0], max_steps=4, extend=True)
  points = more['curves']['a']
  assert [p['step'] for p in points] == [2, 4] and points[0] == first['curves']['a'][0]
  clock = json.load(open(tmp_path / 'a' / 'clock.json'))
  assert clock.keys() == {'2', '4'} and 1e6 < clock['4'] < 1e6 + 600
  assert points[1]['minutes'] == pytest.approx(clock['4'] / 60)
  # The continued run is the run trained straight to step 4 (constant learning rate, exact resume).
  straight = curve.run_curves(config, str(tmp_path / 'straight'), [('a', {})], minutes=10, eval_every=4,
                              weights=[1.0], max_steps=4)
  a = ckpt_lib.load_params(str(tmp_path / 'a' / 'checkpoints' / '4'), ema=True)
  b = ckpt_lib.load_params(str(tmp_path / 'straight' / 'a' / 'checkpoints' / '4'), ema=True)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  assert straight['curves']['a'][0]['oracle_id_accuracy'] == pytest.approx(points[1]['oracle_id_accuracy'])
  # Checkpoints that end past every clock's last step (an extension stopped with no clock of them): refused.
  json.dump({'2': clock['2']}, open(tmp_path / 'a' / 'clock.json', 'w'))
  with pytest.raises(ValueError, match='checkpoints ends at step 4 but its clock.json at step 2'):
    curve.run_curves(config, str(tmp_path), [('a', {})], minutes=10, eval_every=2, weights=[1.0], max_steps=6,
                     extend=True)


def test_a_stopped_run_resumes_from_its_last_checkpoint_and_its_clock(tmp_path, monkeypatch):
  """A run stopped after a checkpoint (Ctrl-C) goes on from it: the clock follows on from that checkpoint's
  recorded time and the budget is what was left of it; a stopped run whose budget was spent is finished."""
  config = base.get_config('tiny')
  shrink(config)
  config.eval.steps = 2
  real = timed_run.loop.train_and_evaluate

  def stop_after_first_checkpoint(config, workdir, *, on_checkpoint, **kwargs):
    def record_then_stop(step):
      on_checkpoint(step)
      raise KeyboardInterrupt
    return real(config, workdir, on_checkpoint=record_then_stop, **kwargs)

  for name in ('a', 'spent'):
    monkeypatch.setattr(timed_run.loop, 'train_and_evaluate', stop_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
      curve.run_curves(config, str(tmp_path), [(name, {})], minutes=1e5, eval_every=2, weights=[1.0], max_steps=4)
    monkeypatch.undo()
    partial = json.load(open(tmp_path / name / 'clock.partial.json'))
    assert partial['clock'].keys() == {'2'} and partial['budget_start'] == 0
    assert not (tmp_path / name / 'clock.json').exists()
    # Step 2's time set far ahead, so a clock restarted from zero would show: within the budget for 'a', past it
    # for 'spent'.
    partial['clock']['2'] = 1e6 if name == 'a' else 1e5 * 60 + 1
    json.dump(partial, open(tmp_path / name / 'clock.partial.json', 'w'))
  result = curve.run_curves(config, str(tmp_path), [('a', {}), ('spent', {})], minutes=1e5, eval_every=2,
                            weights=[1.0], max_steps=4)
  clock = json.load(open(tmp_path / 'a' / 'clock.json'))
  assert clock['2'] == 1e6 and 1e6 < clock['4'] < 1e6 + 600
  assert [p['step'] for p in result['curves']['a']] == [2, 4]
  assert json.load(open(tmp_path / 'spent' / 'clock.json')) == {'2': 1e5 * 60 + 1}
  assert [p['step'] for p in result['curves']['spent']] == [2]
  assert not any(os.path.exists(tmp_path / n / 'clock.partial.json') for n in ('a', 'spent'))
  # A stopped --extend resumes the same way: 'a' continued to 8 steps, stopped after step 6, then run again.
  monkeypatch.setattr(timed_run.loop, 'train_and_evaluate', stop_after_first_checkpoint)
  with pytest.raises(KeyboardInterrupt):
    curve.run_curves(config, str(tmp_path), [('a', {})], minutes=1e5, eval_every=2, weights=[1.0], max_steps=8,
                     extend=True)
  monkeypatch.undo()
  assert json.load(open(tmp_path / 'a' / 'clock.partial.json'))['clock'].keys() == {'2', '4', '6'}
  assert json.load(open(tmp_path / 'a' / 'clock.json')) == clock   # the finished clock is kept until the end
  more = curve.run_curves(config, str(tmp_path), [('a', {})], minutes=1e5, eval_every=2, weights=[1.0], max_steps=8,
                          extend=True)
  extended = json.load(open(tmp_path / 'a' / 'clock.json'))
  assert extended.keys() == {'2', '4', '6', '8'} and {k: extended[k] for k in ('2', '4')} == clock
  assert clock['4'] < extended['6'] < extended['8'] < clock['4'] + 600
  assert [p['step'] for p in more['curves']['a']] == [2, 4, 6, 8]


def test_command_line_flags():
  from absl import flags
  fv = flags.FlagValues()
  curve.define_flags(fv)
  fv(['curve', '--config=configs/base.py:tiny', '--workdir=out', '--minutes=2', "--variant=a:", '--variant=b:x.y=1',
      '--guidance=1,3', '--seeds=0,1', '--extend', '--max_steps=9'])
  assert (fv.workdir, fv.minutes, fv.variant, fv.guidance, fv.seeds) == ('out', 2.0, ['a:', 'b:x.y=1'], '1,3', '0,1')
  assert fv.extend and fv.max_steps == 9
  assert fv.config.eval.steps == 4 and fv.eval_every == 1000   # the tiny config, loaded
