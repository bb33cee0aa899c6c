"""Synthetic identities: procedural face-like images and a pixel-based identity oracle.

The embedded default dataset, so that training runs on a fresh machine with no download. Each identity
is a fixed set of appearance factors (skin tone, hair colour and style, face shape, eyes, nose, mouth,
beard, glasses, hat, earrings, blush); each image varies nuisance factors (position, scale, in-plane
rotation, head turn, background colour/gradient/pattern, lighting, expression, gaze).

Randomness comes from a counter-based hash of (seed, split, identity index, image index, slot), so image j
of identity i is the same pixels whatever else is rendered, and the 'train', 'test' and identity-agnostic
streams draw independent identities for one seed.

`IdentityOracle` tells from the pixels alone (never from factors) which identity an image shows: it finds
the head from its contrast with the background, samples colours on a grid in that head-centred frame, and
classifies by nearest identity centroid under a metric whitened against nuisance variation.

View a grid: `python -m idenc_jax.data.synthetic --out=grid.png --resolution=64`.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

MIN_RESOLUTION = 16
MAX_RESOLUTION = 512
_SPLIT_CODES = {'train': 1, 'test': 2, 'agnostic': 3, 'calibration': 4}
_IDENTITY_SLOTS = 48
_IMAGE_SLOTS = 40
# Pixels per chunk: keeps the working arrays a few MiB so they stay cache friendly.
_CHUNK_PIXELS = 1 << 18
# Pixels of margin around each shape's window (anti-aliasing reaches half a pixel past the outline).
_WINDOW_PAD = 2

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
# Rasterisation: anti-aliased soft shapes in a head-centred frame, composited back to front. Each shape
# is evaluated only inside the pixel window that can contain it (over the batch), which keeps small
# features (eyes, mouth) cheap at any resolution.
# ------------------------------------------------------------------------------------------------------


def _col(x) -> np.ndarray:
  """Per-image scalars [B] -> [B, 1, 1] for broadcasting against [B, H, W]."""
  return np.asarray(x, np.float32)[:, None, None]


def _cover(d: np.ndarray, pw) -> np.ndarray:
  """Coverage of a pixel from its signed distance (negative inside) and the pixel width."""
  return np.clip(0.5 - d / pw, 0.0, 1.0)


def _ellipse_sdf(u, v, cu, cv, a, b) -> np.ndarray:
  """Approximate signed distance to an ellipse: first order, (k - 1) / |grad k|, which underestimates far
  from thin ellipses, so bounded below by the signed distance to the bounding box."""
  du, dv = u - cu, v - cv
  x, y = du / a, dv / b
  k = np.sqrt(x * x + y * y) + 1e-6
  g = np.sqrt((x / a) ** 2 + (y / b) ** 2) / k + 1e-6
  return np.maximum((k - 1) / g, np.maximum(np.abs(du) - a, np.abs(dv) - b))


def _capsule_sdf(u, v, x0, y0, x1, y1, r) -> np.ndarray:
  dx, dy = x1 - x0, y1 - y0
  t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
  return np.sqrt((u - x0 - t * dx) ** 2 + (v - y0 - t * dy) ** 2) - r


def _box_sdf(u, v, cu, cv, hw, hh, r) -> np.ndarray:
  """Rounded box with half sizes (hw, hh) and corner radius r."""
  qx = np.abs(u - cu) - hw + r
  qy = np.abs(v - cv) - hh + r
  outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
  return outside + np.minimum(np.maximum(qx, qy), 0) - r


def _face_sdf(u, v, w, jaw):
  """The face outline: an ellipse of half-width w narrowing towards the chin; returns (sdf, k)."""
  a = w * (1 - jaw * np.clip(v, 0, 1) ** 2)
  x = u / a
  k = np.sqrt(x * x + v * v) + 1e-6
  g = np.sqrt((x / a) ** 2 + v * v) / k + 1e-6
  return (k - 1) / g, k


def _const(rgb, n: int) -> np.ndarray:
  return np.broadcast_to(np.asarray(rgb, np.float32), (n, 3))


class _Region:
  """The pixels of some images inside a window: coordinates, pixel width and colours, painted in place."""

  def __init__(self, canvas: '_Canvas', idx, ys: slice, xs: slice):
    self.canvas, self.idx, self.ys, self.xs = canvas, idx, ys, xs
    sel = slice(None) if idx is None else idx
    self.u = canvas.u[sel, ys, xs]
    self.v = canvas.v[sel, ys, xs]
    self.pw = canvas.pw[sel]
    self.img = canvas.img[sel, ys, xs]   # a view when idx is None, else a copy written back by done()
    self.f = canvas.f if idx is None else {k: a[idx] for k, a in canvas.f.items()}
    self.n = canvas.n if idx is None else {k: a[idx] for k, a in canvas.n.items()}

  def paint(self, cov: np.ndarray, colour: np.ndarray) -> None:
    """Over-composite: img <- img + cov * (colour - img); colour [b, 3] or [b, h, w, 3]."""
    if colour.ndim == 2:
      colour = colour[:, None, None, :]
    delta = np.subtract(colour, self.img, dtype=np.float32)
    delta *= cov[..., None]
    self.img += delta

  def done(self) -> None:
    if self.idx is not None:
      self.canvas.img[self.idx, self.ys, self.xs] = self.img


class _Canvas:
  """A batch of images in progress with the head-centred coordinates (u, v) of each pixel: the head
  outline is the ellipse u^2/w^2 + v^2 = 1, u to the right, v down."""

  def __init__(self, ident: dict[str, np.ndarray], nuis: dict[str, np.ndarray], resolution: int):
    self.f, self.n, self.res = ident, nuis, resolution
    r = resolution
    t = ((np.arange(r, dtype=np.float32) + 0.5) / r * 2 - 1)
    self.x, self.y = t[None, None, :], t[None, :, None]
    self.half = 0.48 * nuis['scale']  # head half-height in image units ([-1, 1] across the image)
    self.cos, self.sin = np.cos(nuis['angle']), np.sin(nuis['angle'])
    half, ca, sa = _col(self.half), _col(self.cos), _col(self.sin)
    px, py = self.x - _col(nuis['dx']), self.y - _col(nuis['dy'])
    self.u = (ca * px + sa * py) / half
    self.v = (-sa * px + ca * py) / half
    self.pw = (2.0 / r) / half
    self.img = np.empty((len(self.half), r, r, 3), np.float32)

  def region(self, mask, u0, u1, v0, v1) -> _Region | None:
    """Images where `mask` holds (None: all), restricted to the pixel window covering the head-frame box
    [u0, u1] x [v0, v1] (scalars or per-image [B] arrays) in every one of them; None if empty."""
    if mask is None:
      idx, sel = None, slice(None)
    else:
      idx = np.nonzero(mask)[0]
      if not len(idx):
        return None
      sel = idx
    n = len(self.half) if idx is None else len(idx)
    bu = np.stack([np.broadcast_to(np.asarray(u0, np.float32), (len(self.half),))[sel],
                   np.broadcast_to(np.asarray(u1, np.float32), (len(self.half),))[sel]], 1)
    bv = np.stack([np.broadcast_to(np.asarray(v0, np.float32), (len(self.half),))[sel],
                   np.broadcast_to(np.asarray(v1, np.float32), (len(self.half),))[sel]], 1)
    qu = np.repeat(bu, 2, 1)                  # corners (u0, v0), (u0, v1), (u1, v0), (u1, v1)
    qv = np.tile(bv, (1, 2))
    half, ca, sa = (a[sel][:, None] for a in (self.half, self.cos, self.sin))
    x = self.n['dx'][sel][:, None] + half * (ca * qu - sa * qv)
    y = self.n['dy'][sel][:, None] + half * (sa * qu + ca * qv)
    to_pix = lambda z: (z + 1) / 2 * self.res - 0.5
    pad = _WINDOW_PAD
    x0 = int(max(0, np.floor(to_pix(x.min())) - pad))
    x1 = int(min(self.res, np.ceil(to_pix(x.max())) + pad + 1))
    y0 = int(max(0, np.floor(to_pix(y.min())) - pad))
    y1 = int(min(self.res, np.ceil(to_pix(y.max())) + pad + 1))
    if x1 <= x0 or y1 <= y0 or n == 0:
      return None
    return _Region(self, idx, slice(y0, y1), slice(x0, x1))


def _draw_background(c: _Canvas) -> None:
  n = c.n
  ga = _col(n['bg_gradient_angle'])
  ramp = 1 + _col(n['bg_gradient']) * (np.cos(ga) * c.x + np.sin(ga) * c.y)
  # Stripes sin(f (x cos a + y sin a) + phase) and dots (its product with the perpendicular stripes),
  # expanded by the angle-sum identity into separable row and column factors (cheap at any resolution).
  pa, fr, ph = _col(n['bg_pattern_angle']), _col(n['bg_frequency']), _col(n['bg_phase'])
  ax, ay = fr * np.cos(pa) * c.x + ph, fr * np.sin(pa) * c.y
  bx, by = -fr * np.sin(pa) * c.x + ph, fr * np.cos(pa) * c.y
  stripes = np.sin(ax) * np.cos(ay) + np.cos(ax) * np.sin(ay)
  perpendicular = np.sin(bx) * np.cos(by) + np.cos(bx) * np.sin(by)
  kind = _col(n['bg_pattern'])
  amp = _col(n['bg_contrast'])
  pattern = stripes * (amp * (kind >= 1)) * np.where(kind == 2, perpendicular, 1.0)
  c.img[...] = n['bg'][:, None, None, :] * ramp[..., None]
  c.img += pattern[..., None]


def _hair_cap(r: _Region, vol, hairline) -> np.ndarray:
  """Hair over the skull above a hairline curve; returns coverage."""
  w = _col(r.f['face_width'])
  cap = _cover(_ellipse_sdf(r.u, r.v, 0.0, -0.1, w * 1.1 * vol, 1.02 * vol), r.pw)
  return np.minimum(cap, _cover(r.v - hairline, r.pw))


def _draw_hair_back(c: _Canvas) -> None:
  f = c.f
  style, w, vol = f['hair_style'], f['face_width'], f['hair_volume']
  boxes = {  # head-frame boxes (u0, u1, v0, v1) holding each style's back hair
      'curly': (-1.7 * w * vol, 1.7 * w * vol, -0.3 - 1.42 * vol, -0.3 + 1.42 * vol),
      'long': (-1.25 * w * vol, 1.25 * w * vol, -1.0, 1.1 + 0.4 * f['hair_length']),
      'bob': (-1.32 * w * vol, 1.32 * w * vol, -0.06 - 1.2 * vol, 0.6),
      'bun': (-0.33, 0.33, -1.22 * vol - 0.31, -1.22 * vol + 0.31),
  }
  for name, box in boxes.items():
    r = c.region(style == HAIR_STYLES.index(name), *box)
    if r is None:
      continue
    u, v, pw = r.u, r.v, r.pw
    w, vol = _col(r.f['face_width']), _col(r.f['hair_volume'])
    if name == 'curly':
      bump = 1 + 0.07 * np.sin(11 * np.arctan2(v + 0.3, u))
      cov = _cover(_ellipse_sdf(u, v, 0.0, -0.3, w * 1.55 * vol * bump, 1.32 * vol * bump), pw)
    elif name == 'long':
      length = _col(r.f['hair_length'])
      cov = _cover(_box_sdf(u, v, 0.0, 0.05 + 0.2 * length, w * 1.22 * vol, 1.05 + 0.2 * length, w * 0.9),
                   pw)
    elif name == 'bob':
      cov = np.minimum(_cover(_ellipse_sdf(u, v, 0.0, -0.05, w * 1.3 * vol, 1.15 * vol), pw),
                       _cover(v - 0.55, pw))
    else:  # bun
      cov = _cover(_ellipse_sdf(u, v, 0.0, -1.22 * vol, 0.32, 0.3), pw)
    r.paint(cov, r.f['hair'] * 0.85)
    r.done()


def _draw_head(c: _Canvas) -> None:
  f, w = c.f, c.f['face_width']
  # Neck behind the face.
  r = c.region(None, -0.45 * w, 0.45 * w, 0.55 - 0.45 * w, 1.7)
  if r is not None:
    r.paint(_cover(_capsule_sdf(r.u, r.v, 0.0, 0.6, 0.0, 1.22, 0.42 * _col(r.f['face_width'])), r.pw),
            r.f['skin'] * 0.82)
  # Ears, then earrings hanging below them.
  es = f['ear_size']
  for side in (-1.0, 1.0):
    r = c.region(None, side * 0.97 * w - 0.14 * es, side * 0.97 * w + 0.14 * es, -0.2 * es, 0.05 + 0.22 * es)
    if r is not None:
      rw, res = _col(r.f['face_width']), _col(r.f['ear_size'])
      r.paint(_cover(_ellipse_sdf(r.u, r.v, side * rw * 0.97, 0.05, 0.13 * res, 0.21 * res), r.pw),
              r.f['skin'] * 0.9)
    r = c.region(f['earrings'] > 0, side * 0.99 * w - 0.07, side * 0.99 * w + 0.07, 0.25, 0.39)
    if r is not None:
      rw = _col(r.f['face_width'])
      r.paint(_cover(_ellipse_sdf(r.u, r.v, side * rw * 0.99, 0.32, 0.06, 0.06), r.pw), r.f['earring_colour'])
      r.done()
  # Face, shaded darker towards its rim, and cheek blush.
  r = c.region(None, -w, w, -1.0, 1.0)
  d, k = _face_sdf(r.u, r.v, _col(r.f['face_width']), _col(r.f['jaw']))
  face = _cover(d, r.pw)
  shade = (1.05 - 0.16 * np.clip(k, 0, 1) ** 4)[..., None]
  r.paint(face, r.f['skin'][:, None, None, :] * shade)
  blush_on = f['blush'] > 0
  ox = 0.22 * c.n['yaw']
  for side in (-1.0, 1.0):
    r = c.region(blush_on, ox + side * 0.5 * w - 0.17, ox + side * 0.5 * w + 0.17, 0.21, 0.43)
    if r is None:
      continue
    d, _ = _face_sdf(r.u, r.v, _col(r.f['face_width']), _col(r.f['jaw']))
    cheek = _cover(_ellipse_sdf(r.u, r.v, _col(0.22 * r.n['yaw'] + side * 0.5 * r.f['face_width']), 0.32,
                                0.16, 0.1), r.pw)
    r.paint(np.minimum(cheek, _cover(d, r.pw)) * _col(r.f['blush']), _const((0.9, 0.35, 0.4), len(cheek)))
    r.done()


def _draw_beard(c: _Canvas) -> None:
  f, w = c.f, c.f['face_width']
  ox = 0.22 * c.n['yaw']
  boxes = {
      'moustache': (ox - 0.8 * f['mouth_width'], ox + 0.8 * f['mouth_width'], f['mouth_height'] - 0.16,
                    f['mouth_height'] - 0.02),
      'goatee': (ox - 0.21, ox + 0.21, 0.63, 1.0),
      'full': (-w, w, 0.1, 1.0),
      'stubble': (-w, w, 0.1, 1.0),
  }
  for name, box in boxes.items():
    r = c.region(f['beard'] == BEARDS.index(name), *box)
    if r is None:
      continue
    u, v, pw = r.u, r.v, r.pw
    rox = _col(0.22 * r.n['yaw'])
    face = _cover(_face_sdf(u, v, _col(r.f['face_width']), _col(r.f['jaw']))[0], pw)
    if name == 'moustache':
      cov = _cover(_ellipse_sdf(u, v, rox, _col(r.f['mouth_height']) - 0.09, _col(r.f['mouth_width']) * 0.75,
                                0.06), pw)
    elif name == 'goatee':
      cov = np.minimum(_cover(_ellipse_sdf(u, v, rox, 0.86, 0.2, 0.22), pw), face)
    else:  # the lower face below a line through the cheeks
      cov = np.minimum(face, _cover(0.12 + 0.25 * u * u - v, pw)) * (0.4 if name == 'stubble' else 1.0)
    r.paint(cov, r.f['hair'] * 0.9)
    r.done()


def _draw_features(c: _Canvas) -> None:
  f, n = c.f, c.n
  ox = 0.22 * n['yaw']
  # Nose: a soft shadow and a nostril line.
  nl, nw = f['nose_length'], f['nose_width']
  ny = 0.12 + 0.5 * nl
  r = c.region(None, 1.2 * ox - nw - 0.03, 1.2 * ox + nw + 0.03, ny - 0.05 - 0.5 * nl, ny + 0.5 * nl + 0.03)
  rox, rnl, rnw = _col(1.2 * r.n['yaw'] * 0.22), _col(r.f['nose_length']), _col(r.f['nose_width'])
  rny = 0.12 + 0.5 * rnl
  skin = r.f['skin']
  r.paint(_cover(_ellipse_sdf(r.u, r.v, rox, rny - 0.05, rnw, rnl * 0.5), r.pw) * 0.5, skin * 0.78)
  r.paint(_cover(_capsule_sdf(r.u, r.v, rox - rnw * 0.6, rny + rnl * 0.45, rox + rnw * 0.6, rny + rnl * 0.45,
                              0.02), r.pw) * 0.7, skin * 0.6)
  # Mouth: a curve whose corners rise with the smile; an open mouth shows a dark inside.
  mw, my = f['mouth_width'], f['mouth_height']
  r = c.region(None, ox - mw - 0.14, ox + mw + 0.14, my - 0.2, my + 0.2)
  rox, mw, my = _col(0.22 * r.n['yaw']), _col(r.f['mouth_width']), _col(r.f['mouth_height'])
  smile, du = _col(r.n['smile']), r.u - rox
  t = du / mw
  curve = my + 0.03 * smile - 0.09 * smile * t * t
  slope = -0.18 * smile * du / (mw * mw)
  d = np.maximum(np.abs(r.v - curve) / np.sqrt(1 + slope * slope), np.abs(du) - mw)
  open_ = _col(r.n['mouth_open'])
  r.paint(_cover(d - _col(r.f['lip_thickness']) - 0.05 * open_, r.pw), r.f['lip_colour'])
  inside = _cover(_ellipse_sdf(r.u, r.v, rox, my + 0.02, mw * 0.75, 0.09 * open_ + 1e-3), r.pw)
  r.paint(inside * (open_ > 0.05), _const((0.3, 0.08, 0.1), len(inside)))
  # Eyes: sclera, iris and pupil, lids closing with eye_open; eyebrows above.
  esz, esp, ey = f['eye_size'], f['eye_spacing'], f['eye_height']
  brow_colour = np.where((f['hair_style'] != 0)[:, None], f['hair'] * 0.8, f['skin'] * 0.55)
  for side in (-1.0, 1.0):
    cx = side * esp + ox
    r = c.region(None, cx - 1.2 * esz - 0.08, cx + 1.2 * esz + 0.08, ey - 1.3 * esz - 0.22, ey + esz)
    resz, rey, opn = _col(r.f['eye_size']), _col(r.f['eye_height']), _col(r.n['eye_open'])
    rcx = _col(side * r.f['eye_spacing'] + 0.22 * r.n['yaw'])
    gx, gy = _col(r.n['gaze_x']) * resz * 0.45, _col(r.n['gaze_y']) * resz * 0.3
    u, v, pw = r.u, r.v, r.pw
    # The eyeball's colour (white, iris, pupil) composited first, then painted once through the lids.
    sclera = _cover(_ellipse_sdf(u, v, rcx, rey, resz, resz * 0.62 * opn + 1e-3), pw)
    iris = _cover(_ellipse_sdf(u, v, rcx + gx, rey + gy, resz * 0.55, resz * 0.55), pw)[..., None]
    pupil = _cover(_ellipse_sdf(u, v, rcx + gx, rey + gy, resz * 0.25, resz * 0.25), pw)[..., None]
    white = np.float32([0.96, 0.96, 0.94])
    eyeball = white + iris * (r.f['eye_colour'][:, None, None, :] - white)
    eyeball += pupil * (np.float32([0.06, 0.05, 0.06]) - eyeball)
    r.paint(sclera, eyeball)
    by = rey - resz * 1.3 - 0.04 - _col(r.n['brow_raise'])
    tilt = _col(r.f['brow_tilt']) * 0.5 * side
    r.paint(_cover(_capsule_sdf(u, v, rcx - resz * 1.1, by + tilt, rcx + resz * 1.1, by - tilt,
                                _col(r.f['brow_thickness'])), pw), brow_colour)


def _draw_hair_front(c: _Canvas) -> None:
  f = c.f
  w, vol = f['face_width'], f['hair_volume']
  for s_id in range(1, len(HAIR_STYLES)):
    name = HAIR_STYLES[s_id]
    top = -1.0 - 0.75 * vol if name == 'mohawk' else -0.1 - (1.25 if name == 'spiky' else 1.05) * vol
    r = c.region(f['hair_style'] == s_id, -1.15 * w * vol, 1.15 * w * vol, top, 0.95)
    if r is None:
      continue
    u, v, pw = r.u, r.v, r.pw
    rw, rvol, side = _col(r.f['face_width']), _col(r.f['hair_volume']), _col(r.f['part_side'])
    colour = r.f['hair']
    if name == 'buzz':
      cov = _hair_cap(r, 1.0, -0.62 + 0.35 * u * u)
      colour = colour * 0.7 + r.f['skin'] * 0.3
    elif name == 'side_part':
      cov = _hair_cap(r, rvol, -0.55 + 0.22 * side * u + 0.35 * u * u)
    elif name == 'bangs':
      cov = _hair_cap(r, rvol, -0.32 + 0.1 * u * u)
    elif name == 'curly':
      cov = _hair_cap(r, rvol, -0.5 + 0.12 * np.abs(np.sin(9 * u)))
    elif name == 'long':
      cov = _hair_cap(r, rvol, -0.62 + 0.6 * np.abs(u - 0.1 * side))
    elif name == 'bob':
      cov = _hair_cap(r, rvol, -0.38 + 0.05 * u * u)
    elif name == 'bun':
      cov = _hair_cap(r, 1.0, -0.66 + 0.3 * u * u)
    elif name == 'mohawk':
      strip = _cover(_ellipse_sdf(u, v, 0.0, -0.9, 0.17, 0.72 * rvol), pw)
      cov = np.maximum(np.minimum(strip, _cover(v + 0.45, pw)), _hair_cap(r, 1.0, -0.6 + 0.3 * u * u) * 0.3)
    else:  # spiky: a zigzag crown above the skull
      zig = 0.14 * np.abs(((u / rw * 3.5 + 0.25 * side) % 1.0) - 0.5) * 2
      crown = _cover(_ellipse_sdf(u, v, 0.0, -0.1, rw * 1.12 * rvol, (1.06 + zig) * rvol), pw)
      cov = np.minimum(crown, _cover(v - (-0.52 + 0.3 * u * u), pw))
    r.paint(cov, colour)
    r.done()


def _draw_accessories(c: _Canvas) -> None:
  f = c.f
  ox = 0.22 * c.n['yaw']
  esz, esp, ey = f['eye_size'], f['eye_spacing'], f['eye_height']
  for g_id in range(1, len(GLASSES)):
    r = c.region(f['glasses'] == g_id, ox - esp - 2 * esz - 0.05, ox + esp + 2 * esz + 0.05,
                 ey - 1.6 * esz - 0.05, ey + 1.6 * esz + 0.05)
    if r is None:
      continue
    u, v, pw = r.u, r.v, r.pw
    rox = _col(0.22 * r.n['yaw'])
    resz, resp, rey = _col(r.f['eye_size']), _col(r.f['eye_spacing']), _col(r.f['eye_height'])
    frame, t = r.f['glasses_colour'], 0.035
    name = GLASSES[g_id]
    rims, lens = [], []
    for side in (-1.0, 1.0):
      cx = side * resp + rox
      if name == 'square':
        d = _box_sdf(u, v, cx, rey, resz * 1.9, resz * 1.35, 0.04)
      else:
        d = _ellipse_sdf(u, v, cx, rey, resz * 1.75, resz * 1.5)
      rims.append(_cover(np.abs(d) - t, pw))
      lens.append(_cover(d, pw))
    if name == 'sunglasses':
      r.paint(np.maximum(*lens) * 0.92, frame * 0.25)
    inner = resp - resz * 1.7
    bridge = _cover(_capsule_sdf(u, v, rox - inner, rey - 0.02, rox + inner, rey - 0.02, t * 0.8), pw)
    r.paint(np.maximum(np.maximum(*rims), bridge), frame)
    r.done()
  w = f['face_width']
  boxes = {'beanie': (-1.15 * w, 1.15 * w, -1.43, -0.3),
           'cap': (-1.2 * w - 0.15, 1.2 * w + 0.15, -1.23, -0.3),
           'wide_brim': (-1.81 * w, 1.81 * w, -1.56, -0.44)}
  for name, box in boxes.items():
    r = c.region(f['hat'] == HATS.index(name), *box)
    if r is None:
      continue
    u, v, pw = r.u, r.v, r.pw
    rw, colour = _col(r.f['face_width']), r.f['hat_colour']
    if name == 'beanie':
      dome = np.minimum(_cover(_ellipse_sdf(u, v, 0.0, -0.18, rw * 1.14, 1.06), pw), _cover(v + 0.42, pw))
      r.paint(dome, colour)
      r.paint(np.minimum(dome, _cover(-(v + 0.58), pw)), colour * 0.7)
      r.paint(_cover(_ellipse_sdf(u, v, 0.0, -1.25, 0.17, 0.17), pw), colour * 0.6 + 0.4)
    elif name == 'cap':
      dome = np.minimum(_cover(_ellipse_sdf(u, v, 0.0, -0.2, rw * 1.12, 1.02), pw), _cover(v + 0.5, pw))
      r.paint(dome, colour)
      visor = _ellipse_sdf(u, v, 0.15 * _col(r.f['part_side']), -0.52, rw * 1.05, 0.13)
      r.paint(_cover(visor, pw), colour * 0.75)
    else:
      r.paint(_cover(_box_sdf(u, v, 0.0, -1.05, rw * 0.8, 0.5, 0.12), pw), colour)
      r.paint(_cover(_box_sdf(u, v, 0.0, -0.75, rw * 0.8, 0.07, 0.0), pw), colour * 0.5)
      r.paint(_cover(_ellipse_sdf(u, v, 0.0, -0.6, rw * 1.8, 0.15), pw), colour * 0.85)
    r.done()


def _light(c: _Canvas) -> np.ndarray:
  n = c.n
  ramp = (255 * _col(n['gain'])) * (1 + _col(n['light_x']) * c.x + _col(n['light_y']) * c.y)
  out = c.img
  out *= ramp[..., None]
  out *= n['tint'][:, None, None, :]
  out += 0.5
  np.clip(out, 0, 255, out=out)
  return out.astype(np.uint8)


def _render_chunk(ident: dict[str, np.ndarray], nuis: dict[str, np.ndarray], resolution: int) -> np.ndarray:
  c = _Canvas(ident, nuis, resolution)
  _draw_background(c)
  _draw_hair_back(c)
  _draw_head(c)
  _draw_beard(c)
  _draw_features(c)
  _draw_hair_front(c)
  _draw_accessories(c)
  return _light(c)


def _render(seed: int, code: int, ident: np.ndarray, image: np.ndarray, resolution: int) -> np.ndarray:
  """Images (ident[k], image[k]) of split `code`, rendered in chunks."""
  out = np.empty((len(ident), resolution, resolution, 3), np.uint8)
  chunk = max(1, _CHUNK_PIXELS // (resolution * resolution))
  for start in range(0, len(ident), chunk):
    sl = slice(start, start + chunk)
    f = _identity_arrays(seed, code, ident[sl])
    n = _image_arrays(seed, code, ident[sl], image[sl], (f['skin'], f['hair']))
    out[sl] = _render_chunk(f, n, resolution)
  return out


# ------------------------------------------------------------------------------------------------------
# Public rendering API.
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


def render_images(identities, image_indices, resolution: int, *, seed: int,
                  split: str = 'train') -> np.ndarray:
  """uint8 [N, R, R, 3]: image `image_indices[k]` of identity `identities[k]` of `split`.

  Each image is a pure function of (seed, split, identity, image index, resolution), so a pipeline may
  render any subset on demand.
  """
  _check_resolution(resolution)
  _check_seed(seed)
  code = _check_split(split)
  ident = np.asarray(identities).reshape(-1)
  image = np.asarray(image_indices).reshape(-1)
  if ident.shape != image.shape:
    raise ValueError(f'identities and image_indices must have the same length, got {ident.shape} and '
                     f'{image.shape}.')
  for name, arr in (('identities', ident), ('image_indices', image)):
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0):
      raise ValueError(f'{name} must be non-negative integers.')
  return _render(seed, code, ident.astype(np.int64), image.astype(np.int64), resolution)


def render_identities(num_identities: int, images_per_identity: int, resolution: int, *, seed: int,
                      split: str = 'train', first_image: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images [N, R, R, 3] and int32 labels [N] in 0..num_identities-1, grouped by identity in order.

  N = num_identities * images_per_identity; identity i's images are image indices first_image, ...,
  first_image + images_per_identity - 1. 'train' and 'test' draw disjoint identities for one seed.
  """
  _check_count('num_identities', num_identities)
  _check_count('images_per_identity', images_per_identity)
  if isinstance(first_image, bool) or not isinstance(first_image, (int, np.integer)) or first_image < 0:
    raise ValueError(f'first_image must be a non-negative integer, got {first_image!r}.')
  labels = np.repeat(np.arange(num_identities, dtype=np.int32), images_per_identity)
  image = np.tile(np.arange(first_image, first_image + images_per_identity), num_identities)
  return render_images(labels, image, resolution, seed=seed, split=split), labels


def render_agnostic(num_images: int, resolution: int, *, seed: int) -> np.ndarray:
  """uint8 images [num_images, R, R, 3] of fresh random identities, one image each."""
  _check_count('num_images', num_images)
  _check_resolution(resolution)
  _check_seed(seed)
  ident = np.arange(num_images, dtype=np.int64)
  return _render(seed, _SPLIT_CODES['agnostic'], ident, np.zeros_like(ident), resolution)


# ------------------------------------------------------------------------------------------------------
# Identity oracle.
# ------------------------------------------------------------------------------------------------------

_WORK = 32           # every image is resampled to this size before features are taken
_GRID = 12           # canonical sampling grid (G x G points) over the head
_GRID_EXTENT = 1.6   # half-width of the grid in units of the head radius estimate
_HIST_BINS = 4       # per channel, for the foreground colour histogram
# Foreground mask: a soft ramp of width _MASK_W starting _MASK_LO + _MASK_K * (background texture) away
# from the fitted background colour.
_MASK_LO, _MASK_K, _MASK_W = 0.04, 2.0, 0.1


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] linear resampling with a triangle filter widened when downsampling (antialiased)."""
  scale = n_in / n_out
  support = max(scale, 1.0)
  centres = (np.arange(n_out) + 0.5) * scale - 0.5
  taps = np.arange(n_in)[None, :]
  wts = np.maximum(0.0, 1 - np.abs(taps - centres[:, None]) / support)
  return (wts / wts.sum(1, keepdims=True)).astype(np.float32)


def _to_work(images: np.ndarray) -> np.ndarray:
  """float32 [N, WORK, WORK, 3] in [0, 1] from uint8 or float [0, 255] NHWC images of any size."""
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'images must be [N, H, W, 3] RGB, got shape {x.shape}.')
  if x.shape[0] == 0:
    raise ValueError('images must not be empty.')
  if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
    raise ValueError(f'images must be integer or float, got {x.dtype}.')
  if np.issubdtype(x.dtype, np.floating):
    if not np.all(np.isfinite(x)):
      raise ValueError('images contain non-finite values.')
    if x.min() < -1.0 or x.max() > 256.0:
      raise ValueError(f'float images must be in [0, 255], got range [{x.min():.3g}, {x.max():.3g}].')
  x = x.astype(np.float32) / 255.0
  h, w = x.shape[1:3]
  if (h, w) != (_WORK, _WORK):
    # Separable resampling as two large matrix products: columns, then rows.
    n = len(x)
    x = x.transpose(0, 1, 3, 2).reshape(-1, w) @ _resample_matrix(w, _WORK).T        # [N*H*C, WORK]
    x = x.reshape(n, h, 3 * _WORK).transpose(0, 2, 1).reshape(-1, h) @ _resample_matrix(h, _WORK).T
    x = x.reshape(n, 3, _WORK, _WORK).transpose(0, 3, 2, 1)                           # [N, o, p, C]
  return np.clip(x, 0, 1)


def _box3(x: np.ndarray) -> np.ndarray:
  """3x3 box blur with edge replication on [N, H, W, C]."""
  p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
  h, w = x.shape[1:3]
  return sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _bilinear(img: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
  """Sample img [N, H, W, C] at pixel coordinates xs, ys [N, P] (edge clamped) -> [N, P, C]."""
  n, h, w = img.shape[:3]
  xs = np.clip(xs, 0, w - 1)
  ys = np.clip(ys, 0, h - 1)
  x0 = np.minimum(np.floor(xs).astype(np.int64), w - 2)
  y0 = np.minimum(np.floor(ys).astype(np.int64), h - 2)
  fx, fy = (xs - x0)[..., None], (ys - y0)[..., None]
  b = np.arange(n)[:, None]
  top = img[b, y0, x0] * (1 - fx) + img[b, y0, x0 + 1] * fx
  bot = img[b, y0 + 1, x0] * (1 - fx) + img[b, y0 + 1, x0 + 1] * fx
  return top * (1 - fy) + bot * fy


def head_frame(images: np.ndarray) -> dict[str, np.ndarray]:
  """Where the head is, from pixels alone.

  Fits a planar colour background per image to its border pixels (robustly: three rounds keeping the
  60% best-fitting pixels, since hair and hats may reach the border), marks as foreground the pixels
  that depart from it by more than the background's own texture, and returns the mask's centroid
  (cx, cy) and equivalent-disc radius in work-resolution pixels, with the work-resolution images
  ('images', [N, 32, 32, 3] in [0, 1]), the soft 'mask' and the fitted 'background'.
  """
  x = _to_work(images)
  coords = np.arange(_WORK, dtype=np.float32)
  yy, xx = np.meshgrid(coords, coords, indexing='ij')
  border = np.zeros((_WORK, _WORK), bool)
  border[:2], border[-2:], border[:, :2], border[:, -2:] = True, True, True, True
  full = np.stack([np.ones_like(xx), xx / _WORK - 0.5, yy / _WORK - 0.5], -1)   # [H, W, 3]
  design = full[border]                                                         # [P, 3]
  values = x[:, border]                                                         # [N, P, 3]
  weights = np.ones(values.shape[:2], np.float32)
  for _ in range(3):
    weighted = np.swapaxes(weights[..., None] * design, 1, 2)                 # [N, 3, P]
    a = weighted @ design + 1e-4 * np.eye(3, dtype=np.float32)
    coef = np.linalg.solve(a, weighted @ values)                                # [N, 3, 3 channels]
    resid = np.linalg.norm(values - design @ coef, axis=-1)
    weights = (resid <= np.quantile(resid, 0.6, axis=1, keepdims=True)).astype(np.float32)
  bg = (full.reshape(-1, 3) @ coef).reshape(x.shape)
  diff = np.linalg.norm(x - bg, axis=-1)
  texture = np.sqrt((weights * resid ** 2).sum(1) / weights.sum(1))[:, None, None]
  mask = np.clip((diff - _MASK_LO - _MASK_K * texture) / _MASK_W, 0, 1)
  mass = mask.sum((1, 2)) + 1e-3
  return {
      'images': x, 'mask': mask, 'background': bg,
      'cx': (mask * xx).sum((1, 2)) / mass,
      'cy': (mask * yy).sum((1, 2)) / mass,
      'radius': np.sqrt(mass / np.pi),
  }


def _colour_histogram(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Mask-weighted joint RGB histogram with linear (soft) binning, L1-normalised, square-rooted
  (Hellinger) so frequent colours do not swamp rare ones. [N, bins^3]."""
  n, b = len(images), _HIST_BINS
  centres = np.linspace(0, 1, b, dtype=np.float32)
  # Triangle weights of each pixel's channel value to each bin centre: [N, P, 3, b], summing to 1.
  tri = np.maximum(0, 1 - np.abs(images.reshape(n, -1, 3, 1) - centres) * (b - 1))
  rg = (tri[:, :, 0, :, None] * tri[:, :, 1, None, :]).reshape(n, -1, b * b)
  rg *= mask.reshape(n, -1, 1)
  hist = (np.swapaxes(rg, 1, 2) @ tri[:, :, 2, :]).reshape(n, -1)             # [N, b^3]
  return np.sqrt(hist / (hist.sum(1, keepdims=True) + 1e-6)).astype(np.float32)


def identity_features(images: np.ndarray) -> np.ndarray:
  """Nuisance-tolerant appearance features [N, D] from pixels: the (lightly blurred) colours and the
  foreground mask sampled on a grid in the head-centred, size-normalised frame, the head size, and the
  foreground colour histogram (position invariant)."""
  fr = head_frame(images)
  g = np.linspace(-1, 1, _GRID, dtype=np.float32) * _GRID_EXTENT
  gy, gx = np.meshgrid(g, g, indexing='ij')
  r = fr['radius'][:, None]
  xs = fr['cx'][:, None] + r * gx.reshape(1, -1)
  ys = fr['cy'][:, None] + r * gy.reshape(1, -1)
  # Blur before sampling so each sample summarises its neighbourhood (tolerates residual misalignment).
  colours = _bilinear(_box3(fr['images']), xs, ys)                            # [N, P, 3]
  mask = _bilinear(_box3(fr['mask'][..., None]), xs, ys)[..., 0]              # [N, P]
  # At half resolution (2x2 means): four times cheaper, and colour amounts hardly change.
  pool = lambda z: z.reshape(len(z), _WORK // 2, 2, _WORK // 2, 2, -1).mean((2, 4))
  hist = _colour_histogram(pool(fr['images']), pool(fr['mask'][..., None])[..., 0])
  return np.concatenate([colours.reshape(len(xs), -1), mask, r / _WORK, hist], 1).astype(np.float32)


def _degrade(images: np.ndarray, seed: int) -> np.ndarray:
  """Mild blur, colour cast and noise, like samples of a small generative model (float [0, 255])."""
  rng = np.random.default_rng(seed)
  x = np.asarray(images, np.float32)
  k = rng.uniform(0, 1, (len(x), 1, 1, 1)).astype(np.float32)
  x = x * (1 - k) + _box3(x) * k
  x = x * rng.uniform(0.93, 1.07, (len(x), 1, 1, 3)) + rng.normal(0, 5, (len(x), 1, 1, 3))
  x = x + rng.normal(0, 4, x.shape)
  return np.clip(x, 0, 255).astype(np.float32)


_CALIBRATION_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _calibration_residuals(num_identities: int, per_identity: int, resolution: int) -> np.ndarray:
  """Within-identity feature residuals [N, D] of identities drawn apart from every train/test split,
  every other image mildly degraded so the metric also discounts generator-like blur and colour cast."""
  key = (num_identities, per_identity, resolution)
  if key not in _CALIBRATION_CACHE:
    labels = np.repeat(np.arange(num_identities), per_identity)
    image = np.tile(np.arange(per_identity), num_identities)
    imgs = _render(0, _SPLIT_CODES['calibration'], labels, image, resolution).astype(np.float32)
    odd = image % 2 == 1
    imgs[odd] = _degrade(imgs[odd], seed=resolution)
    feats = identity_features(imgs).reshape(num_identities, per_identity, -1)
    _CALIBRATION_CACHE[key] = (feats - feats.mean(1, keepdims=True)).reshape(len(labels), -1)
  return _CALIBRATION_CACHE[key]


class IdentityOracle:
  """Which synthetic identity an image shows, measured from its pixels (never from factors).

  `identity_features` are whitened by a within-identity covariance, pooled from the gallery's own
  spread (when it has several images per identity) and a fixed calibration set of other identities
  (half of them mildly degraded), shrunk towards a multiple of the identity; an image's distance to an
  identity is the Euclidean distance, in that whitened space scaled by 1/sqrt(D), to the mean of the
  identity's gallery features. Distances are thus of order 1 for the nuisance spread within an identity
  (about 0.7 for fresh images of a gallery identity with 4 gallery images each, 32 to 64 px) and larger
  between identities (about 1.1 to the nearest other identity, 1.6 to a random one). Classification is
  by nearest identity.
  """

  def __init__(self, gallery_images: np.ndarray, gallery_labels: np.ndarray, *,
               calibration_identities: int = 128, calibration_images: int = 4, shrinkage: float = 0.02):
    images = np.asarray(gallery_images)
    labels = np.asarray(gallery_labels)
    if images.ndim != 4:
      raise ValueError(f'gallery_images must be [N, H, W, 3], got shape {images.shape}.')
    if labels.ndim != 1 or len(labels) != len(images):
      raise ValueError(f'gallery_labels must be [N] matching gallery_images, got {labels.shape} for '
                       f'{len(images)} images.')
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'gallery_labels must be integers, got {labels.dtype}.')
    if not 0 < shrinkage < 1:
      raise ValueError(f'shrinkage must be in (0, 1), got {shrinkage}.')
    if calibration_identities and (calibration_identities < 2 or calibration_images < 2):
      raise ValueError('calibration needs at least 2 identities of at least 2 images each.')
    feats = identity_features(images)
    self.identities, inverse = np.unique(labels, return_inverse=True)
    if len(self.identities) < 2:
      raise ValueError('the gallery needs at least two identities.')
    counts = np.bincount(inverse)
    sums = np.zeros((len(self.identities), feats.shape[1]), np.float64)
    np.add.at(sums, inverse, feats)
    centroids = sums / counts[:, None]
    covs = []
    if (counts > 1).any():
      resid = (feats - centroids[inverse]).astype(np.float64)
      covs.append(resid.T @ resid / (len(labels) - len(self.identities)))
    if calibration_identities:
      res = int(np.clip(images.shape[1], MIN_RESOLUTION, 64))
      cal = _calibration_residuals(calibration_identities, calibration_images, res).astype(np.float64)
      covs.append(cal.T @ cal / (len(cal) - calibration_identities))
    if not covs:
      raise ValueError('with one gallery image per identity the metric needs calibration '
                       '(calibration_identities > 0).')
    cov = sum(covs) / len(covs)
    dim = len(cov)
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / dim * np.eye(dim)
    # cov = L L^T, so x @ inv(L)^T has unit covariance within an identity (a Cholesky factor is several
    # times cheaper than an eigendecomposition); / sqrt(D) makes its squared norm about 1.
    chol = np.linalg.cholesky(cov)
    self._whiten = (np.linalg.inv(chol).T / np.sqrt(dim)).astype(np.float32)
    self.centroids = (centroids @ self._whiten).astype(np.float32)
    self.gallery_counts = counts

  def embed(self, images: np.ndarray) -> np.ndarray:
    """Identity features [N, D], whitened: Euclidean distances between them are identity distances."""
    return identity_features(images) @ self._whiten

  def _label_positions(self, labels, n: int) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n:
      raise ValueError(f'labels must have one entry per image ({n}), got {labels.shape[0]}.')
    pos = np.clip(np.searchsorted(self.identities, labels), 0, len(self.identities) - 1)
    bad = self.identities[pos] != labels
    if bad.any():
      raise ValueError(f'labels not in the gallery: {sorted(set(labels[bad].tolist()))[:10]}.')
    return pos

  def all_distances(self, images: np.ndarray) -> np.ndarray:
    """[N, K] distance of each image to each gallery identity (columns ordered as self.identities)."""
    e = self.embed(images)
    c = self.centroids
    d2 = (e * e).sum(1, keepdims=True) - 2 * e @ c.T + (c * c).sum(1)[None]
    return np.sqrt(np.maximum(d2, 0))

  def distance(self, images: np.ndarray, labels) -> np.ndarray:
    """[N] distance of each image to its labelled identity's gallery mean."""
    d = self.all_distances(images)
    return d[np.arange(len(d)), self._label_positions(labels, len(d))]

  def evaluate(self, images: np.ndarray, labels) -> dict[str, float]:
    """accuracy: fraction whose nearest gallery identity is the labelled one; top5_accuracy; chance:
    1 / gallery identities; mean_distance: to the labelled identity; mean_other_distance: to the
    nearest other identity; num_images, num_identities."""
    d = self.all_distances(images)
    rows = np.arange(len(d))
    pos = self._label_positions(labels, len(d))
    own = d[rows, pos]
    rank = (d < own[:, None]).sum(1)
    others = d.copy()
    others[rows, pos] = np.inf
    return {
        'accuracy': float((rank == 0).mean()),
        'top5_accuracy': float((rank < 5).mean()),
        'chance': 1.0 / len(self.identities),
        'mean_distance': float(own.mean()),
        'mean_other_distance': float(others.min(1).mean()),
        'num_images': int(len(d)),
        'num_identities': int(len(self.identities)),
    }


# ------------------------------------------------------------------------------------------------------
# CLI: a grid to look at.
# ------------------------------------------------------------------------------------------------------


def make_grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
  """Tile images [rows * cols, R, R, 3] into one uint8 image, row-major, with a white border."""
  n, r = images.shape[:2]
  cols = n // rows
  out = np.full((rows * (r + pad) + pad, cols * (r + pad) + pad, 3), 255, np.uint8)
  for k in range(rows * cols):
    i, j = divmod(k, cols)
    out[pad + i * (r + pad):pad + i * (r + pad) + r, pad + j * (r + pad):pad + j * (r + pad) + r] = images[k]
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description='Write a grid of synthetic identities (rows) x images.')
  parser.add_argument('--out', required=True, help='output PNG path')
  parser.add_argument('--resolution', type=int, default=64)
  parser.add_argument('--identities', type=int, default=8)
  parser.add_argument('--images', type=int, default=8)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--split', default='train', choices=('train', 'test'))
  parser.add_argument('--agnostic', action='store_true', help='show identity-agnostic images instead')
  args = parser.parse_args(argv)
  from PIL import Image  # only the CLI needs PIL
  if args.agnostic:
    imgs = render_agnostic(args.identities * args.images, args.resolution, seed=args.seed)
  else:
    imgs, _ = render_identities(args.identities, args.images, args.resolution, seed=args.seed,
                                split=args.split)
  Image.fromarray(make_grid(imgs, args.identities)).save(args.out)
  print(f'wrote {args.out}: {args.identities} x {args.images} images at {args.resolution} px')


if __name__ == '__main__':
  main()
