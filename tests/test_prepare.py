"""Tests of dataset preparation (idenc_jax/data/prepare.py and `python -m idenc_jax.data.prepare`)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from array_record.python import array_record_module as ar
from PIL import Image

from idenc_jax.data import prepare as prepare_lib

REPO = Path(__file__).resolve().parents[1]
CELEBA = Path(os.environ.get('IDENC_CELEBA_DIR',
                             Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'celeba_id128'))


def _rand_image(seed: int, h: int, w: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, arr: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(arr).save(path)


def _read_records(directory: Path, split: str) -> list[tuple[int, str, np.ndarray]]:
  """Reads a split's shards with the raw ArrayRecord reader and the documented record layout."""
  index = json.loads((directory / 'index.json').read_text())
  out = []
  for shard in index['splits'][split]['shards']:
    reader = ar.ArrayRecordReader(str(directory / shard))
    for raw in reader.read_all():
      label = int(np.frombuffer(raw[:4], '<i4')[0])
      n = int(np.frombuffer(raw[4:6], '<u2')[0])
      name = raw[6:6 + n].decode()
      image = np.asarray(Image.open(io.BytesIO(raw[6 + n:])).convert('RGB'))
      out.append((label, name, image))
    reader.close()
  return out


@pytest.fixture()
def tree(tmp_path):
  """alice: 5 good + corrupt + non-image + truncated; bob: 4 good + grey; carol: 3 (too few); dave: 5."""
  root = tmp_path / 'raw'
  images = {}
  for ident, n, seed in (('alice', 5, 0), ('bob', 4, 10), ('carol', 3, 20), ('dave', 5, 30)):
    for i in range(n):
      images[f'{ident}/{i}.png'] = _rand_image(seed + i, 8, 8)
      _save(root / ident / f'{i}.png', images[f'{ident}/{i}.png'])
  (root / 'alice' / 'corrupt.jpg').write_bytes(b'\x00garbage that is not a jpeg' * 10)
  (root / 'alice' / 'notes.txt').write_text('not an image')
  buf = io.BytesIO()
  Image.fromarray(_rand_image(99, 64, 64)).save(buf, 'JPEG')
  (root / 'alice' / 'cut.jpg').write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  Image.new('L', (8, 8), 128).save(root / 'bob' / 'grey.png')   # a grey single-channel image
  images['bob/grey.png'] = np.full((8, 8, 3), 128, np.uint8)
  (root / 'README.md').write_text('files outside identity folders are ignored')
  return root, images


class _GreyIsNoFace:
  """Stand-in face aligner: flat images hold no face; others come back unchanged."""

  def align(self, image):
    return None if image.std() < 1.0 else image


def _check_no_partial(out: Path):
  assert not [p for p in out.parent.iterdir() if '.partial-' in p.name]


def test_tree_counts_skip_reasons_and_records(tree, tmp_path):
  root, images = tree
  out = tmp_path / 'out'
  lines = []
  index = prepare_lib.prepare(root, out, resolution=8, test_dirs='dave', log=lines.append)
  on_disk = json.loads((out / 'index.json').read_text())
  assert on_disk == index
  tr, te = index['splits']['train'], index['splits']['test']
  assert (tr['identities'], tr['images']) == (2, 10)          # alice 5, bob 4 + grey
  assert (te['identities'], te['images']) == (1, 5)
  assert tr['identity_names'] == ['alice', 'bob'] and tr['identity_counts'] == [5, 5]
  assert te['identity_names'] == ['dave'] and te['identity_counts'] == [5]
  assert index['skipped']['images'] == {'not_an_image': 1, 'unreadable': 1, 'truncated': 1, 'too_large': 0,
                                        'no_face': 0, 'missing': 0}
  assert index['skipped']['identities'] == {'too_few_images': 1}
  assert index['skipped']['images_in_dropped_identities'] == 3
  assert sorted(index['skipped']['examples']) == sorted(
      [['alice/corrupt.jpg', 'unreadable'], ['alice/cut.jpg', 'truncated'], ['alice/notes.txt', 'not_an_image'],
       ['carol/0.png', 'too_few_images'], ['carol/1.png', 'too_few_images'],
       ['carol/2.png', 'too_few_images']])
  assert (index['resolution'], index['layout'], index['split_method']) == (8, 'folders', 'test_dirs')
  assert index['source'] == str(root)
  summary = '\n'.join(lines)
  for token in ('train: 2 identities, 10 images', 'test: 1 identities, 5 images', 'not_an_image 1',
                'unreadable 1', 'truncated 1', 'too_few_images 1 (holding 3 images)'):
    assert token in summary, (token, summary)
  # Records: grouped by identity in label order, pixels exactly the (lossless, same-size) sources.
  recs = _read_records(out, 'train')
  assert [r[0] for r in recs] == [0] * 5 + [1] * 5
  assert [r[1] for r in recs] == [f'alice/{i}.png' for i in range(5)] + \
      ['bob/0.png', 'bob/1.png', 'bob/2.png', 'bob/3.png', 'bob/grey.png']
  for _, name, image in recs + _read_records(out, 'test'):
    np.testing.assert_array_equal(image, images[name])
  assert sum(tr['shard_sizes']) == 10
  _check_no_partial(out)


def test_alignment_skips_images_without_a_face(tree, tmp_path):
  root, _ = tree
  index = prepare_lib.prepare(root, tmp_path / 'out', resolution=8, test_dirs='dave', align=True,
                              aligner_factory=_GreyIsNoFace, log=lambda s: None)
  assert index['skipped']['images']['no_face'] == 1
  assert index['splits']['train']['identity_counts'] == [5, 4]   # bob keeps 4 >= min_images
  assert index['aligned'] is True


def test_center_crop_and_lanczos_resize(tmp_path):
  # 12 rows x 20 columns: the centred 12x12 square is columns 4..15; left half red, right half blue
  # inside it, green outside it. After the crop no green may remain.
  a = np.zeros((12, 20, 3), np.uint8)
  a[:, :4] = a[:, 16:] = (0, 255, 0)
  a[:, 4:10] = (255, 0, 0)
  a[:, 10:16] = (0, 0, 255)
  for i in range(4):
    _save(tmp_path / 'raw' / 'x' / f'{i}.png', a)
  prepare_lib.prepare(tmp_path / 'raw', tmp_path / 'out', resolution=6, test_fraction=0.0,
                      log=lambda s: None)
  (_, _, got), *_ = _read_records(tmp_path / 'out', 'train')
  ref = np.asarray(Image.fromarray(a[:, 4:16]).resize((6, 6), Image.Resampling.LANCZOS))
  np.testing.assert_array_equal(got, ref)
  assert got[..., 1].max() == 0                     # no green from outside the square
  assert (got[:, :2, 0] > 200).all() and (got[:, :2, 2] < 50).all()    # left red (Lanczos rings at the
  assert (got[:, 4:, 2] > 200).all() and (got[:, 4:, 0] < 50).all()    # red/blue edge), right blue


def test_refuses_to_overwrite_and_cleans_up_failures(tree, tmp_path):
  root, _ = tree
  out = tmp_path / 'out'
  prepare_lib.prepare(root, out, resolution=8, test_dirs='dave', log=lambda s: None)
  with pytest.raises(FileExistsError, match='overwrite'):
    prepare_lib.prepare(root, out, resolution=8, log=lambda s: None)
  index = prepare_lib.prepare(root, out, resolution=4, test_dirs='dave', overwrite=True, log=lambda s: None)
  assert json.loads((out / 'index.json').read_text())['resolution'] == 4 == index['resolution']

  class Broken:
    def align(self, image):
      raise RuntimeError('detector crashed')

  for target in (out, tmp_path / 'fresh'):
    with pytest.raises(RuntimeError, match='detector crashed'):
      prepare_lib.prepare(root, target, resolution=8, align=True, aligner_factory=Broken, overwrite=True,
                          log=lambda s: None)
  assert json.loads((out / 'index.json').read_text())['resolution'] == 4   # old dataset intact
  assert not (tmp_path / 'fresh').exists()
  _check_no_partial(out)


def test_split_folders_are_kept(tmp_path):
  root = tmp_path / 'raw'
  for split, idents in (('train', ('p1', 'p2')), ('test', ('p3',))):
    for ident in idents:
      for i in range(4):
        _save(root / split / ident / f'{i}.png', _rand_image(i, 4, 4))
  index = prepare_lib.prepare(root, tmp_path / 'out', resolution=4, log=lambda s: None)
  assert list(index['splits']) == ['train', 'test']
  assert index['splits']['train']['identity_names'] == ['p1', 'p2']
  assert index['splits']['test']['identity_names'] == ['p3']
  assert index['split_method'] == 'split_dirs'
  with pytest.raises(ValueError, match='split folders'):
    prepare_lib.prepare(root, tmp_path / 'o2', resolution=4, test_fraction=0.5, log=lambda s: None)
  # split_dirs=false treats train/ and test/ as two identities.
  index = prepare_lib.prepare(root, tmp_path / 'o3', resolution=4, split_dirs='false', test_fraction=0.0,
                              log=lambda s: None)
  assert index['splits']['train']['identity_names'] == ['test', 'train']
  for i in range(4):
    _save(root / 'test' / 'p1' / f'{i}.png', _rand_image(i, 4, 4))
  with pytest.raises(ValueError, match="'p1' is in both"):
    prepare_lib.prepare(root, tmp_path / 'o4', resolution=4, log=lambda s: None)


def test_fraction_split_is_seeded_and_identity_level(tmp_path):
  root = tmp_path / 'raw'
  names = [f'id{i:02d}' for i in range(10)]
  for j, ident in enumerate(names):
    for i in range(4):
      _save(root / ident / f'{i}.png', _rand_image(10 * j + i, 4, 4))
  tests = []
  for seed in (0, 0, 1, 2, 3):
    out = tmp_path / f'out{len(tests)}'
    index = prepare_lib.prepare(root, out, resolution=4, test_fraction=0.3, seed=seed, log=lambda s: None)
    tr, te = index['splits']['train']['identity_names'], index['splits']['test']['identity_names']
    assert len(te) == 3 and sorted(tr + te) == names and not set(tr) & set(te)
    assert {r[1].split('/')[0] for r in _read_records(out, 'test')} == set(te)
    tests.append(tuple(te))
  assert tests[0] == tests[1]
  assert len(set(tests)) > 1


def test_celeba_layout(tmp_path):
  root = tmp_path / 'celeba'
  lines, k = [], 1
  for ident, n in ((7, 5), (9, 4), (3, 2)):
    for _ in range(n):
      name = f'{k:06d}.jpg'
      _save(root / 'img_align_celeba' / name, _rand_image(k, 6, 6))
      lines.append(f'{name} {ident}')
      k += 1
  lines.append('999999.jpg 9')   # listed, absent
  (root / 'identity_CelebA.txt').write_text('\n'.join(lines) + '\n')
  index = prepare_lib.prepare(root, tmp_path / 'out', layout='celeba', resolution=6, test_dirs='9',
                              log=lambda s: None)
  assert index['splits']['train']['identity_names'] == ['7']
  assert index['splits']['test']['identity_names'] == ['9']
  assert (index['splits']['train']['images'], index['splits']['test']['images']) == (5, 4)
  assert index['skipped']['images']['missing'] == 1
  assert index['skipped']['identities']['too_few_images'] == 1
  assert index['skipped']['images_in_dropped_identities'] == 2
  (root / 'identity_CelebA.txt').write_text('000001.jpg seven\n')
  with pytest.raises(ValueError, match='line 1'):
    prepare_lib.prepare(root, tmp_path / 'o2', layout='celeba', resolution=6, log=lambda s: None)


def test_unlabelled_layout(tmp_path):
  root = tmp_path / 'ffhq'
  for i in range(6):
    _save(root / f'{i // 3:02d}000' / f'{i}.png', _rand_image(i, 5, 5))
  (root / 'LICENSE.txt').write_text('x')
  index = prepare_lib.prepare(root, tmp_path / 'out', layout='unlabelled', resolution=5, log=lambda s: None)
  assert list(index['splits']) == ['train']
  assert (index['splits']['train']['identities'], index['splits']['train']['images']) == (0, 6)
  assert index['skipped']['images']['not_an_image'] == 1
  recs = _read_records(tmp_path / 'out', 'train')
  assert [r[0] for r in recs] == [-1] * 6
  np.testing.assert_array_equal(recs[4][2], _rand_image(4, 5, 5))
  with pytest.raises(ValueError, match='no identities'):
    prepare_lib.prepare(root, tmp_path / 'o2', layout='unlabelled', test_fraction=0.2, log=lambda s: None)


def test_tfds_layout_offline(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (9, 6, 6, 3), dtype=np.uint8)
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])

  class TinyIdentities(tfds.core.GeneratorBasedBuilder):   # built locally: no download
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(6, 6, 3)), 'label': tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(len(labels)):
        yield i, {'image': images[i], 'label': int(labels[i])}

  data_dir = tmp_path / 'tfds'
  TinyIdentities(data_dir=str(data_dir)).download_and_prepare()
  index = prepare_lib.prepare(data_dir, tmp_path / 'out', layout='tfds', tfds_name='tiny_identities',
                              tfds_label_key='label', resolution=6, min_images=3, test_fraction=0.0,
                              log=lambda s: None)
  tr = index['splits']['train']
  assert (tr['identities'], tr['images'], tr['identity_names'], tr['identity_counts']) == \
      (2, 7, ['0', '2'], [3, 4])
  assert index['source'] == 'tfds:tiny_identities/train'
  # TFDS stores examples in its own order: match the records to the inputs by content.
  recs = _read_records(tmp_path / 'out', 'train')
  found = sorted(next(i for i in range(len(images)) if np.array_equal(images[i], r[2])) for r in recs)
  assert found == [0, 1, 2, 5, 6, 7, 8]
  assert all(str(labels[i]) == tr['identity_names'][r[0]]
             for r in recs for i in range(len(images)) if np.array_equal(images[i], r[2]))
  assert all(r[1].startswith('tiny_identities-train') for r in recs)   # TFDS example ids as names
  index = prepare_lib.prepare(data_dir, tmp_path / 'out2', layout='tfds', tfds_name='tiny_identities',
                              resolution=3, log=lambda s: None)
  assert (index['splits']['train']['identities'], index['splits']['train']['images']) == (0, 9)
  with pytest.raises(ValueError, match="no split 'validation'"):
    prepare_lib.prepare(data_dir, tmp_path / 'o3', layout='tfds', tfds_name='tiny_identities',
                        tfds_split='validation', log=lambda s: None)


def test_command_line(tree, tmp_path):
  root, _ = tree
  out = tmp_path / 'out'
  cmd = [sys.executable, '-m', 'idenc_jax.data.prepare', f'--input={root}', '--layout=folders',
         '--resolution=8', f'--output={out}', '--test_dirs=dave', '--num_shards=2']
  run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert 'too_few_images 1' in run.stderr
  index = json.loads((out / 'index.json').read_text())
  assert len(index['splits']['train']['shards']) == 2 and index['splits']['train']['shard_sizes'] == [5, 5]
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert again.returncode != 0 and 'overwrite' in again.stderr


@pytest.mark.skipif(not CELEBA.is_dir(), reason=f'{CELEBA} not present')
def test_real_faces_with_dlib_alignment(tmp_path):
  pytest.importorskip('dlib')
  from idenc_jax.data import align
  if not align.dlib_available():
    pytest.skip('dlib models not installed')
  src = sorted((CELEBA / 'train').iterdir())[0]
  root = tmp_path / 'raw'
  for f in sorted(src.iterdir())[:4]:
    _save(root / 'person' / f.name, np.asarray(Image.open(f).convert('RGB')))
  _save(root / 'person' / 'grey.png', np.full((128, 128, 3), 128, np.uint8))
  index = prepare_lib.prepare(root, tmp_path / 'out', resolution=32, align=True, test_fraction=0.0,
                              log=lambda s: None)
  assert index['skipped']['images']['no_face'] == 1
  assert index['splits']['train']['images'] == 4


@pytest.mark.skipif(not CELEBA.is_dir(), reason=f'{CELEBA} not present')
def test_celeba_id128_counts(tmp_path):
  index = prepare_lib.prepare(CELEBA, tmp_path / 'celeba32', resolution=32, log=lambda s: None)
  assert (index['splits']['train']['identities'], index['splits']['train']['images']) == (243, 5261)
  assert (index['splits']['test']['identities'], index['splits']['test']['images']) == (34, 756)
  assert sum(index['skipped']['images'].values()) == 0
