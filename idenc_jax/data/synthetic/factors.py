"""Synthetic identities, the random part: what an identity looks like and how each of its images varies.

Each identity is a fixed set of appearance factors (skin tone, hair colour and style, face shape, eyes,
nose, mouth, beard, glasses, hat, earrings, blush); each image varies nuisance factors (position, scale,
in-plane rotation, head turn, background colour/gradient/pattern, lighting, expression, gaze).

Randomness comes from a counter-based hash of (seed, split, identity index, image index, slot), so the
factors of image j of identity i are the same whatever else is drawn (renderers may render any subset on
demand), and the 'train', 'test', identity-agnostic and calibration streams draw independent identities
for one seed. The argument checks live here too, since every public entry point shares them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MIN_RESOLUTION = 16
MAX_RESOLUTION = 512
_SPLIT_CODES = {'train': 1, 'test': 2, 'agnostic': 3, 'calibration': 4}
_IDENTITY_SLOTS = 48
_IMAGE_SLOTS = 40

HAIR_STYLES = ('bald', 'buzz', 'side_part', 'bangs', 'curly', 'long', 'bob', 'bun', 'mohawk', 'spiky')
BEARDS = ('none', 'moustache', 'goatee', 'full', 'stubble')
GLASSES = ('none', 'round', 'square', 'sunglasses')
HATS = ('none', 'beanie', 'cap', 'wide_brim')

_SKIN_PALETTE = np.array([(255, 226, 200), (241, 196, 160), (226, 174, 128), (198, 136, 94),
                          (150, 92, 60), (96, 60, 42)], np.float32) / 255
_HAIR_PALETTE = np.array([(28, 22, 20), (66, 42, 28), (118, 78, 44), (156, 72, 38), (222, 190, 118),
                          (236, 226, 202), (150, 150, 150), (196, 90, 44)], np.float32) / 255
_EYE_PALETTE = np.array([(92, 56, 30), (50, 32, 20), (70, 120, 190), (70, 130, 80), (140, 110, 60),
                         (120, 130, 140)], np.float32) / 255
_FRAME_PALETTE = np.array([(20, 20, 20), (200, 160, 60), (170, 30, 40), (40, 70, 170), (110, 60, 30),
                           (230, 230, 230)], np.float32) / 255
_METAL_PALETTE = np.array([(230, 190, 70), (200, 200, 210), (220, 60, 120)], np.float32) / 255


# ------------------------------------------------------------------------------------------------------
# Counter-based randomness.
# ------------------------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
  x = x + _GOLDEN
  x = (x ^ (x >> np.uint64(30))) * _MUL1
  x = (x ^ (x >> np.uint64(27))) * _MUL2
  return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, stream: int, ident: np.ndarray, image: np.ndarray, n: int) -> np.ndarray:
  """Uniforms in [0, 1), shape [len(ident), n], a pure function of every argument and the slot."""
  h = _mix(np.full((1, 1), seed % (1 << 64), np.uint64))
  h = _mix(h ^ np.uint64(stream))
  h = _mix(h ^ np.asarray(ident, np.int64).astype(np.uint64)[:, None])
  h = _mix(h ^ np.asarray(image, np.int64).astype(np.uint64)[:, None])
  h = _mix(h ^ np.arange(n, dtype=np.uint64)[None, :])
  return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _lerp_palette(palette: np.ndarray, t: np.ndarray) -> np.ndarray:
  pos = np.clip(t, 0, 1) * (len(palette) - 1)
  lo = np.minimum(pos.astype(np.int64), len(palette) - 2)
  frac = (pos - lo)[:, None]
  return palette[lo] * (1 - frac) + palette[lo + 1] * frac


def _pick(palette: np.ndarray, u: np.ndarray) -> np.ndarray:
  return palette[np.minimum((u * len(palette)).astype(np.int64), len(palette) - 1)]


def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Vectorised HSV -> RGB, all in [0, 1]; returns [..., 3]."""
  k = np.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -1)
  f = np.clip(np.minimum(k, 4 - k), 0, 1)
  return v[..., None] * (1 - s[..., None] * f)


def _categorical(u: np.ndarray, probs: tuple[float, ...]) -> np.ndarray:
  edges = np.cumsum(np.asarray(probs, np.float64) / sum(probs))[:-1]
  return np.searchsorted(edges, u, side='right').astype(np.int32)


# ------------------------------------------------------------------------------------------------------
# Factors.
# ------------------------------------------------------------------------------------------------------


def _check_split(split: str) -> int:
  if split not in ('train', 'test'):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  return _SPLIT_CODES[split]


def _identity_arrays(seed: int, code: int, ident: np.ndarray) -> dict[str, np.ndarray]:
  """Appearance factors of identities `ident` of split `code`, one row per identity."""
  u = _uniforms(seed, code * 16, ident, np.zeros_like(ident), _IDENTITY_SLOTS)
  f32 = lambda x: np.asarray(x, np.float32)
  skin = _lerp_palette(_SKIN_PALETTE, u[:, 0]) + (u[:, 1:4] - 0.5) * np.array([0.08, 0.05, 0.05])
  natural = _pick(_HAIR_PALETTE, u[:, 5]) + (u[:, 6:9] - 0.5) * 0.12
  fantasy = _hsv(u[:, 6], 0.55 + 0.35 * u[:, 7], 0.45 + 0.45 * u[:, 8])
  hair = np.where((u[:, 4] < 0.22)[:, None], fantasy, natural)
  eye = _pick(_EYE_PALETTE, u[:, 14]) + (u[:, 15:18] - 0.5) * 0.1
  hat_colour = _hsv(u[:, 33], 0.35 + 0.6 * u[:, 34], 0.3 + 0.65 * u[:, 40])
  return {
      'skin': f32(np.clip(skin, 0, 1)),
      'hair': f32(np.clip(hair, 0, 1)),
      'hair_style': _categorical(u[:, 9], (0.04, 0.1, 0.12, 0.12, 0.1, 0.14, 0.12, 0.09, 0.07, 0.1)),
      'hair_volume': f32(0.95 + 0.2 * u[:, 10]),
      'part_side': f32(np.where(u[:, 11] < 0.5, -1.0, 1.0)),
      'hair_length': f32(u[:, 39]),
      'face_width': f32(0.66 + 0.24 * u[:, 12]),
      'jaw': f32(0.05 + 0.35 * u[:, 13]),
      'eye_colour': f32(np.clip(eye, 0, 1)),
      'eye_size': f32(0.11 + 0.06 * u[:, 18]),
      'eye_spacing': f32(0.3 + 0.1 * u[:, 19]),
      'eye_height': f32(-0.12 + 0.12 * u[:, 20]),
      'brow_thickness': f32(0.03 + 0.04 * u[:, 21]),
      'brow_tilt': f32(-0.08 + 0.16 * u[:, 22]),
      'nose_length': f32(0.16 + 0.16 * u[:, 23]),
      'nose_width': f32(0.07 + 0.08 * u[:, 24]),
      'mouth_width': f32(0.2 + 0.18 * u[:, 25]),
      'lip_colour': f32(np.clip(skin * (0.85 - 0.2 * u[:, 26:27]) * (1 - u[:, 26:27] * 0.5)
                                + np.array([0.75, 0.15, 0.2]) * u[:, 26:27] * 0.5, 0, 1)),
      'lip_thickness': f32(0.03 + 0.035 * u[:, 27]),
      'mouth_height': f32(0.5 + 0.12 * u[:, 28]),
      'beard': _categorical(u[:, 29], (0.62, 0.1, 0.09, 0.11, 0.08)),
      'glasses': _categorical(u[:, 30], (0.55, 0.17, 0.16, 0.12)),
      'glasses_colour': f32(_pick(_FRAME_PALETTE, u[:, 31])),
      'hat': _categorical(u[:, 32], (0.68, 0.12, 0.11, 0.09)),
      'hat_colour': f32(hat_colour),
      'earrings': (u[:, 35] < 0.25).astype(np.int32),
      'earring_colour': f32(_pick(_METAL_PALETTE, u[:, 36])),
      'blush': f32(np.where(u[:, 37] < 0.35, 0.15 + 0.35 * u[:, 37] / 0.35, 0.0)),
      'ear_size': f32(0.8 + 0.4 * u[:, 38]),
  }


def _image_arrays(seed: int, code: int, ident: np.ndarray, image: np.ndarray,
                  avoid: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
  """Nuisance factors of image `image[k]` of identity `ident[k]`; the background avoids `avoid` colours."""
  u = _uniforms(seed, code * 16 + 1, ident, image, _IMAGE_SLOTS)
  f32 = lambda x: np.asarray(x, np.float32)
  # Four candidate background colours; take the first far from the skin and hair (a photographer's
  # backdrop contrasts with the subject), falling back to the most distant one.
  cands = _hsv(u[:, 5:9], 0.05 + 0.5 * u[:, 9:13], 0.25 + 0.7 * u[:, 13:17])  # [B, 4, 3]
  dist = np.min(np.stack([np.linalg.norm(cands - a[:, None, :], axis=-1) for a in avoid], 0), 0)
  ok = dist > 0.3
  choice = np.where(ok.any(1), np.argmax(ok, 1), np.argmax(dist, 1))
  return {
      'dx': f32(0.16 * (u[:, 0] - 0.5)),
      'dy': f32(0.14 * (u[:, 1] - 0.5)),
      'scale': f32(0.86 + 0.22 * u[:, 2]),
      'angle': f32(np.deg2rad(20.0) * (u[:, 3] - 0.5)),
      'yaw': f32(u[:, 4] - 0.5),
      'bg': f32(cands[np.arange(len(u)), choice]),
      'bg_gradient': f32(0.2 * u[:, 17]),
      'bg_gradient_angle': f32(2 * np.pi * u[:, 18]),
      'bg_pattern': _categorical(u[:, 19], (0.4, 0.3, 0.3)),
      'bg_frequency': f32(4 + 10 * u[:, 20]),
      'bg_pattern_angle': f32(np.pi * u[:, 21]),
      'bg_phase': f32(2 * np.pi * u[:, 22]),
      'bg_contrast': f32(0.05 * u[:, 23]),
      'gain': f32(0.84 + 0.28 * u[:, 24]),
      'tint': f32(0.94 + 0.12 * u[:, 25:28]),
      'light_x': f32(0.3 * (u[:, 28] - 0.5)),
      'light_y': f32(0.3 * (u[:, 29] - 0.5)),
      'smile': f32(-0.4 + 1.4 * u[:, 30]),
      'mouth_open': f32(np.where(u[:, 31] < 0.3, u[:, 32], 0.0)),
      'eye_open': f32(1 - 0.75 * u[:, 33] ** 3),
      'gaze_x': f32(u[:, 34] - 0.5),
      'gaze_y': f32(0.6 * (u[:, 35] - 0.5)),
      'brow_raise': f32(0.08 * (u[:, 36] - 0.5)),
  }


def _factor_dicts(arrays: dict[str, np.ndarray], ident: np.ndarray) -> list[dict[str, Any]]:
  names = {'hair_style': HAIR_STYLES, 'beard': BEARDS, 'glasses': GLASSES, 'hat': HATS}
  out = []
  for row in range(len(ident)):
    d: dict[str, Any] = {'identity': int(ident[row])}
    for key, val in arrays.items():
      v = val[row]
      if key in names:
        d[key] = names[key][int(v)]
      elif key == 'earrings':
        d[key] = bool(v)
      elif np.ndim(v):
        d[key] = tuple(round(float(x), 6) for x in v)
      else:
        d[key] = round(float(v), 6)
    out.append(d)
  return out


def identity_factors(num_identities: int, *, seed: int, split: str = 'train') -> list[dict[str, Any]]:
  """Appearance factors of identities 0..num_identities-1 of `split` (names for discrete factors,
  RGB tuples in [0, 1] for colours, floats in face units for geometry)."""
  _check_count('num_identities', num_identities)
  _check_seed(seed)
  ident = np.arange(num_identities)
  return _factor_dicts(_identity_arrays(seed, _check_split(split), ident), ident)


# ------------------------------------------------------------------------------------------------------
# Argument checks shared by the public entry points.
# ------------------------------------------------------------------------------------------------------


def _check_count(name: str, value: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}.')


def _check_resolution(resolution: int) -> None:
  if (isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer))
      or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION):
    raise ValueError(f'resolution must be an integer in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], '
                     f'got {resolution!r}.')


def _check_seed(seed: int) -> None:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}.')

