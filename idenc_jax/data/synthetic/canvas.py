"""Synthetic identities, the rasteriser: signed distances, coverage and a canvas in the head's own frame.

Shapes are described in head-centred coordinates (u, v) so that every nuisance transform (shift, scale,
rotation) is applied once, by the canvas, and the drawing code stays in face units.
"""

from __future__ import annotations

import numpy as np

# Pixels of margin around each shape's window (anti-aliasing reaches half a pixel past the outline).
_WINDOW_PAD = 2


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

