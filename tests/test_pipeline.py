"""Tests of the grain input pipeline (idenc_jax/data/pipeline.py).

The identity sources here are small arrays whose pixels encode where they came from: channel 0 is
20 + source number, channel 1 the identity (within its source), channel 2 the image (within its identity),
and the left-most column is 255, so every batch row can be traced back to its record and its flip.
"""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from PIL import Image

from configs.base import get_config
from idenc_jax.data import pipeline
from idenc_jax.data import synthetic
from idenc_jax.data import prepare as prepare_lib
from idenc_jax.data import sources as sources_lib

R = 8


def _identity_source(source: int, counts) -> sources_lib.IdentitySource:
  images, labels = [], []
  for ident, n in enumerate(counts):
    for i in range(n):
      img = np.zeros((R, R, 3), np.uint8)
      img[...] = (20 + source, ident, i)
      img[:, 0] = 255
      images.append(img)
      labels.append(ident)
  return sources_lib.IdentitySource.from_arrays(np.stack(images), np.array(labels), name=f'src{source}')


def _agnostic(n: int) -> sources_lib.ArraySource:
  img = np.zeros((n, R, R, 3), np.uint8)
  img[..., 0] = 200
  img[..., 1] = np.arange(n)[:, None, None] // 256
  img[..., 2] = np.arange(n)[:, None, None] % 256
  img[:, :, 0] = 255
  return sources_lib.ArraySource(img, 'agnostic')


def _sources(counts_per_source=((6, 5, 4, 7, 5, 6, 4, 5), (4, 9, 5, 6, 4)), weights=None, num_agnostic=48):
  ids = [_identity_source(s, c) for s, c in enumerate(counts_per_source)]
  offset = 0
  for s in ids:
    s.label_offset, offset = offset, offset + s.num_identities
  w = np.full(len(ids), 1 / len(ids)) if weights is None else np.asarray(weights, float)
  return sources_lib.Sources(ids, w, _agnostic(num_agnostic), R)


def _config(batch_size=32, m=4, seed=0, workers=0, flip=True, agnostic_fraction=0.5):
  c = get_config('tiny')
  c.model.resolution = R
  c.train.batch_size = batch_size
  c.data.agnostic_fraction = agnostic_fraction
  c.data.images_per_identity = m
  c.data.num_workers = workers
  c.data.random_flip = flip
  c.seed = seed
  return c


def _decode(images: np.ndarray):
  """(channel codes [n, 3], flipped [n]) of batch rows, checking each is a pristine (flipped) record."""
  flipped = images[:, 0, -1, 0] == 255
  unflipped = np.where(flipped[:, None, None, None], images[:, :, ::-1], images)
  assert (unflipped[:, :, 0] == 255).all() and (unflipped[:, :, 1:] == unflipped[:, :1, 1:2]).all()
  return unflipped[:, 0, 1].astype(int), flipped


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_half_batch_structure():
  src = _sources()
  config = _config()
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1, sources=src)
  k, m = 4, 4
  for batch in _take(it, 6):
    assert batch['id_images'].shape == (16, R, R, 3) and batch['id_images'].dtype == np.uint8
    assert batch['agnostic_images'].shape == (16, R, R, 3) and batch['agnostic_images'].dtype == np.uint8
    assert batch['id_labels'].dtype == np.int32 and batch['id_groups'].dtype == np.int32
    np.testing.assert_array_equal(batch['id_groups'], np.repeat(np.arange(k), m))
    codes, _ = _decode(batch['id_images'])
    for g in range(k):
      rows = slice(g * m, (g + 1) * m)
      labels = batch['id_labels'][rows]
      assert (labels == labels[0]).all()
      source = codes[rows, 0] - 20
      assert (source == source[0]).all()
      s = src.identity[source[0]]
      assert labels[0] == s.label_offset + codes[g * m, 1]          # label = offset + identity
      assert (codes[rows, 1] == codes[g * m, 1]).all()
      assert len(set(codes[rows, 2])) == m                           # all identities have >= M images
      assert (codes[rows, 2] < s.counts[codes[g * m, 1]]).all()
    assert len(set(batch['id_labels'][::m])) == k                     # distinct identities in a batch
    ag, _ = _decode(batch['agnostic_images'])
    assert (ag[:, 0] == 200).all()


def test_identities_with_fewer_than_m_images():
  src = _sources(((2, 3, 2, 3, 2), (3, 2, 2, 3)))
  it = pipeline.make_train_iterator(_config(), process_index=0, process_count=1, sources=src)
  for batch in _take(it, 5):
    codes, _ = _decode(batch['id_images'])
    for g in range(4):
      rows = codes[g * 4:(g + 1) * 4]
      n = src.identity[rows[0, 0] - 20].counts[rows[0, 1]]
      assert set(rows[:, 2]) == set(range(n))      # every image of the identity, rest repeated


def test_flip():
  src = _sources()
  flips = []
  for batch in _take(pipeline.make_train_iterator(_config(), process_index=0, process_count=1,
                                                  sources=src), 20):
    flips.append(_decode(batch['id_images'])[1])
    flips.append(_decode(batch['agnostic_images'])[1])
  frac = np.concatenate(flips).mean()
  assert abs(frac - 0.5) < 5 * np.sqrt(0.25 / 640)
  for batch in _take(pipeline.make_train_iterator(_config(flip=False), process_index=0, process_count=1,
                                                  sources=src), 3):
    assert not _decode(batch['id_images'])[1].any() and not _decode(batch['agnostic_images'])[1].any()


class _RecordingSource(sources_lib.ArraySource):

  def __init__(self, base):
    super().__init__(base.images, base.name)
    self.reads = []

  def read(self, indices):
    self.reads.extend(int(i) for i in indices)
    return super().read(indices)


def _batch_and_reads(config, src, step, p, count):
  """One process's batch at `step` and the (source, record) pairs it read."""
  spec = pipeline.batch_spec(config, p, count)
  ids = [_RecordingSource(s.images) for s in src.identity]
  ag = _RecordingSource(src.agnostic)
  batch = pipeline.MakeBatch(pipeline.make_planner(config, src, spec), ids, ag).map(step)
  reads = {(j, r) for j, s in enumerate(ids) for r in s.reads} | {('ag', r) for r in ag.reads}
  return batch, reads


@pytest.mark.parametrize('fraction,id_rows,later_groups', [(0.5, 16, [2, 3]), (0.25, 24, [3, 4, 5])])
def test_processes_read_disjoint_shares_that_make_up_the_single_process_batch(fraction, id_rows, later_groups):
  # "What one process would read": the batch of process_count=1 at the same step. Process p of P reads
  # rows p*B_id/P .. of the identity part and p*B_ag/P .. of the agnostic part (group ids unchanged), so
  # concatenating the P batches gives it exactly.
  src = _sources(num_agnostic=48)     # 48 = 3 steps of 16 (6 of 8) agnostic images: no step straddles an epoch
  config = _config(agnostic_fraction=fraction)
  for step in range(6):
    whole, whole_reads = _batch_and_reads(config, src, step, 0, 1)
    assert whole['id_images'].shape[0] == id_rows and whole['agnostic_images'].shape[0] == 32 - id_rows
    parts = [_batch_and_reads(config, src, step, p, 2) for p in range(2)]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([b[key] for b, _ in parts]), whole[key])
    np.testing.assert_array_equal(parts[1][0]['id_groups'], np.repeat(later_groups, 4))
    assert not parts[0][1] & parts[1][1]                      # no record read by both processes
    assert parts[0][1] | parts[1][1] == whole_reads
    assert len(parts[0][1]) == len(parts[1][1])
  # The same through the iterators.
  its = [pipeline.make_train_iterator(config, process_index=p, process_count=2, sources=src)
         for p in range(2)]
  whole = pipeline.make_train_iterator(config, process_index=0, process_count=1, sources=src)
  for _ in range(3):
    a, b, w = next(its[0]), next(its[1]), next(whole)
    for key in w:
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), w[key])


def test_same_seed_same_batches():
  src = _sources()
  first = _take(pipeline.make_train_iterator(_config(), process_index=0, process_count=1, sources=src), 4)
  again = _take(pipeline.make_train_iterator(_config(), process_index=0, process_count=1, sources=src), 4)
  _assert_same(first, again)
  other = _take(pipeline.make_train_iterator(_config(seed=1), process_index=0, process_count=1,
                                             sources=src), 4)
  assert any(not np.array_equal(a['id_images'], b['id_images']) for a, b in zip(first, other))


def test_agnostic_images_cover_each_epoch_once():
  src = _sources(num_agnostic=40)
  records = []
  for step in range(5):                         # 5 x 16 = 80 positions = 2 epochs of 40
    codes, _ = _decode(pipeline.MakeBatch(
        pipeline.make_planner(_config(), src, pipeline.batch_spec(_config(), 0, 1)),
        [s.images for s in src.identity], src.agnostic).map(step)['agnostic_images'])
    records.extend(codes[:, 1] * 256 + codes[:, 2])
  assert sorted(records[:40]) == list(range(40)) and sorted(records[40:]) == list(range(40))
  assert records[:40] != records[40:]


def test_restore_state_gives_the_batches_that_followed():
  src = _sources()
  config = _config()
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1, sources=src)
  _take(it, 3)
  state = it.get_state()
  following = _take(it, 3)
  fresh = pipeline.make_train_iterator(config, process_index=0, process_count=1, sources=src)
  fresh.set_state(state)
  _assert_same(_take(fresh, 3), following)


def test_restore_with_worker_processes():
  src = _sources()
  reference = _take(pipeline.make_train_iterator(_config(), process_index=0, process_count=1,
                                                 sources=src), 6)
  config = _config(workers=2)
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1, sources=src)
  try:
    _assert_same(_take(it, 3), reference[:3])     # workers do not change the batches
    state = it.get_state()
  finally:
    it.close()
  fresh = pipeline.make_train_iterator(config, process_index=0, process_count=1, sources=src)
  try:
    fresh.set_state(state)
    _assert_same(_take(fresh, 3), reference[3:])
  finally:
    fresh.close()


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  src = _sources()
  config = _config()
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1, sources=src)
  _take(it, 2)
  mgr = ocp.CheckpointManager((tmp_path / 'ckpt').absolute())
  mgr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mgr.wait_until_finished()
  following = _take(it, 3)
  fresh = pipeline.make_train_iterator(config, process_index=0, process_count=1, sources=src)
  restored = mgr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_same(_take(restored['data'], 3), following)
  mgr.close()


def test_mixing_weights_and_uniform_identities():
  src = _sources(((2, 2, 2, 2, 30, 30, 30, 30), (4, 4, 4, 4, 4)), weights=(0.8, 0.2))
  config = _config(batch_size=64, m=2)          # K = 16 groups per step
  planner = pipeline.make_planner(config, src, pipeline.batch_spec(config, 0, 1))
  source_counts = np.zeros(2)
  ident_counts = np.zeros(8)
  steps = 250
  for step in range(steps):
    plan = planner.plan(step)
    groups_src = plan['id_source'][::2]
    source_counts += np.bincount(groups_src, minlength=2)
    ident_counts += np.bincount(plan['id_label'][::2][groups_src == 0], minlength=8)
  n = steps * 16
  assert abs(source_counts[0] - 0.8 * n) < 5 * np.sqrt(n * 0.8 * 0.2)
  # Source 0's identities are drawn uniformly whatever their image counts (2 vs 30).
  total = ident_counts.sum()
  assert np.all(np.abs(ident_counts - total / 8) < 5 * np.sqrt(total / 8 * 7 / 8))
  assert abs(ident_counts[4:].sum() / ident_counts[:4].sum() - 1) < 0.15


@pytest.mark.parametrize('batch_size,m,count,index,fraction,match', [
    (31, 4, 1, 0, 0.5, '= 15.5 is not a whole number of identity-agnostic images'),
    (32, 4, 1, 0, 0.3, '= 9.6 is not a whole number'),
    (32, 4, 1, 0, 0.0, 'strictly between 0 and 1'),
    (32, 4, 1, 0, 1.0, 'strictly between 0 and 1'),
    (32, 4, 1, 0, float('nan'), 'strictly between 0 and 1'),
    (16, 4, 1, 0, 15 / 16, 'leaves 1 identity image'),
    (16, 4, 1, 0, 0.75, 'K = 1 identity group per batch'),
    (36, 4, 1, 0, 0.5, 'not divisible by config.data.images_per_identity'),
    (32, 1, 1, 0, 0.5, '>= 2'),
    (32, 4, 3, 0, 0.5, 'divisible by the 3 processes'),
    (32, 4, 2, 2, 0.5, 'process_index 2'),
    (21, 4, 2, 0, 5 / 21, 'agnostic part of the batch, 5 images, is not divisible by the 2 processes'),
])
def test_validation_errors(batch_size, m, count, index, fraction, match):
  with pytest.raises(ValueError, match=match):
    pipeline.make_train_iterator(_config(batch_size, m, agnostic_fraction=fraction), process_index=index,
                                 process_count=count, sources=_sources())


def test_one_identity_group_only_without_the_identity_loss():
  # 16 images, 12 agnostic: one group of 4. The identity loss contrasts groups (0 with one), so a training
  # run with it on is refused; without it (diffae's settings) or for timing only, the layout is fine.
  one_group = _config(16, 4, agnostic_fraction=0.75)
  with pytest.raises(ValueError, match='K = 1 identity group per batch'):
    pipeline.batch_spec(one_group, 0, 1)
  assert pipeline.batch_spec(one_group, 0, 1, training=False).num_groups == 1
  one_group.loss.use_id_loss = False
  assert pipeline.batch_spec(one_group, 0, 1).num_groups == 1


def test_spec_sizes():
  spec = pipeline.batch_spec(_config(128, 4), 1, 4)
  assert (spec.id_size, spec.agnostic_size, spec.num_groups, spec.local_groups, spec.local_agnostic) == \
      (64, 64, 16, 4, 16)
  spec = pipeline.batch_spec(get_config('cpu'), 0, 1)    # the main job: 4 groups of 3 + 4 agnostic
  assert (spec.id_size, spec.agnostic_size, spec.num_groups, spec.local_agnostic) == (12, 4, 4, 4)
  spec = pipeline.batch_spec(_config())          # defaults from jax: one process here
  assert (spec.process_index, spec.process_count) == (0, 1)


def test_synthetic_identities_end_to_end():
  config = get_config('tiny')
  config.data.synthetic_train_identities = 8
  config.data.synthetic_images_per_identity = 4
  config.data.synthetic_agnostic_images = 16
  images, labels = synthetic.render_identities(8, 4, config.model.resolution, seed=config.seed)
  agnostic = synthetic.render_agnostic(16, config.model.resolution, seed=config.seed)
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  batch = next(it)
  k, m = 2, 4
  assert batch['id_images'].shape == (k * m, 16, 16, 3)
  for row, label in zip(batch['id_images'], batch['id_labels']):
    own = images[labels == label]
    assert any(np.array_equal(row, x) or np.array_equal(row, x[:, ::-1]) for x in own)
  for row in batch['agnostic_images']:
    assert any(np.array_equal(row, x) or np.array_equal(row, x[:, ::-1]) for x in agnostic)


def _prepared(tmp_path, name, seed, test_counts):
  """A prepared dataset with train/ and test/ identity folders; returns (dir, {test identity: images})."""
  root = tmp_path / f'{name}_raw'
  rng = np.random.default_rng(seed)
  test_images = {}
  for split, counts in (('train', (4, 5)), ('test', test_counts)):
    for j, n in enumerate(counts):
      ident = f'{name}{split}{j}'
      (root / split / ident).mkdir(parents=True)
      imgs = rng.integers(0, 256, (n, R, R, 3), dtype=np.uint8)
      for i, img in enumerate(imgs):
        Image.fromarray(img).save(root / split / ident / f'{i}.png')
      if split == 'test':
        test_images[ident] = imgs
  prepare_lib.prepare(root, tmp_path / name, resolution=R, log=lambda s: None)
  return tmp_path / name, test_images


def test_eval_identities_of_mixed_prepared_sources(tmp_path):
  a, a_imgs = _prepared(tmp_path, 'a', 0, (4, 6))
  b, b_imgs = _prepared(tmp_path, 'b', 1, (5,))
  config = _config()
  config.data.identity_sources = f'{a},{b}'
  out = pipeline.make_eval_identities(config, 'test')
  expected = list(a_imgs.values()) + list(b_imgs.values())    # labels: a's identities, then b's
  assert sorted(out) == [0, 1, 2]
  for label, imgs in enumerate(expected):
    np.testing.assert_array_equal(out[label], imgs)
  capped = pipeline.make_eval_identities(config, 'test', max_identities=2, max_images=3)
  assert sorted(capped) == [0, 1] and all(len(v) == 3 for v in capped.values())
  # And the training iterator over the same two prepared datasets, agnostic half from both ('same').
  config.data.agnostic_source = 'same'
  config.train.batch_size = 16
  train = pipeline.make_eval_identities(config, 'train')     # label -> images, from the index tables
  assert sorted(train) == [0, 1, 2, 3]                        # 2 + 2 train identities
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  for batch in _take(it, 3):
    assert batch['agnostic_images'].shape == (8, R, R, 3)
    for row, label in zip(batch['id_images'], batch['id_labels']):
      assert any(np.array_equal(row, x) or np.array_equal(row, x[:, ::-1]) for x in train[int(label)])


def test_eval_identities_synthetic():
  config = get_config('tiny')
  out = pipeline.make_eval_identities(config, 'test', max_images=3)
  images, labels = synthetic.render_identities(config.data.synthetic_test_identities,
                                               config.data.synthetic_images_per_identity,
                                               config.model.resolution, seed=config.seed, split='test')
  assert sorted(out) == list(range(config.data.synthetic_test_identities))
  for label, imgs in out.items():
    np.testing.assert_array_equal(imgs, images[labels == label][:3])
