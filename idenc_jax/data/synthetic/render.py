"""Synthetic identities, the drawing: face layers composited back to front, lighting, and the public API.

Every image is a pure function of (seed, split, identity, image index, resolution), so a pipeline may
render any subset on demand; rendering goes in chunks so the working arrays stay cache friendly.
"""

from __future__ import annotations

import numpy as np

from idenc_jax.data.synthetic.canvas import (_box_sdf, _Canvas, _capsule_sdf, _col, _const, _cover,
                                             _ellipse_sdf, _face_sdf, _Region)
from idenc_jax.data.synthetic.factors import (_SPLIT_CODES, BEARDS, GLASSES, HAIR_STYLES, HATS,
                                              _check_count, _check_resolution, _check_seed,
                                              _check_split, _identity_arrays, _image_arrays)

# Pixels per chunk: keeps the working arrays a few MiB so they stay cache friendly.
_CHUNK_PIXELS = 1 << 18


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

