"""Tests for idenc_jax.evaluate.inception: the flax port equals a PyTorch InceptionV3 with pytorch-fid's blocks.

The reference below is written in PyTorch following pytorch-fid's FID network (torchvision's InceptionV3 layout
with FIDInceptionA/C/E_1/E_2 blocks, resize with F.interpolate bilinear, input scaled to [-1, 1], 2048-d average
pool). It gets random weights and BatchNorm statistics, its state_dict goes through a temporary .pth file and our
loader, and both networks must give the same features.
"""

import numpy as np
import pytest

from idenc_jax.evaluate.metrics import inception

torch = pytest.importorskip('torch', reason='torch is needed to build the PyTorch reference and read .pth files')
F = torch.nn.functional
tnn = torch.nn


# ---- PyTorch reference --------------------------------------------------------------------------------------------

class TBasicConv(tnn.Module):

  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = tnn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg(x):
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class TInceptionA(tnn.Module):

  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = TBasicConv(cin, 64, kernel_size=1)
    self.branch5x5_1 = TBasicConv(cin, 48, kernel_size=1)
    self.branch5x5_2 = TBasicConv(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = TBasicConv(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = TBasicConv(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = TBasicConv(96, 96, kernel_size=3, padding=1)
    self.branch_pool = TBasicConv(cin, pool_features, kernel_size=1)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg(x))], 1)


class TInceptionB(tnn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = TBasicConv(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = TBasicConv(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = TBasicConv(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = TBasicConv(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    return torch.cat([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TInceptionC(tnn.Module):

  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = TBasicConv(cin, 192, kernel_size=1)
    self.branch7x7_1 = TBasicConv(cin, c7, kernel_size=1)
    self.branch7x7_2 = TBasicConv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = TBasicConv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = TBasicConv(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = TBasicConv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = TBasicConv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = TBasicConv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = TBasicConv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = TBasicConv(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f'branch7x7dbl_{i}')(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class TInceptionD(tnn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = TBasicConv(cin, 192, kernel_size=1)
    self.branch3x3_2 = TBasicConv(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = TBasicConv(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = TBasicConv(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = TBasicConv(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = TBasicConv(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f'branch7x7x3_{i}')(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TInceptionE(tnn.Module):

  def __init__(self, cin, use_max_pool):
    super().__init__()
    self.use_max_pool = use_max_pool
    self.branch1x1 = TBasicConv(cin, 320, kernel_size=1)
    self.branch3x3_1 = TBasicConv(cin, 384, kernel_size=1)
    self.branch3x3_2a = TBasicConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = TBasicConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = TBasicConv(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = TBasicConv(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = TBasicConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = TBasicConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = TBasicConv(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.use_max_pool else _avg(x)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TFIDInception(tnn.Module):

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = TBasicConv(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = TBasicConv(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = TBasicConv(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = TBasicConv(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = TBasicConv(80, 192, kernel_size=3)
    self.Mixed_5b = TInceptionA(192, 32)
    self.Mixed_5c = TInceptionA(256, 64)
    self.Mixed_5d = TInceptionA(288, 64)
    self.Mixed_6a = TInceptionB(288)
    self.Mixed_6b = TInceptionC(768, 128)
    self.Mixed_6c = TInceptionC(768, 160)
    self.Mixed_6d = TInceptionC(768, 160)
    self.Mixed_6e = TInceptionC(768, 192)
    self.Mixed_7a = TInceptionD(768)
    self.Mixed_7b = TInceptionE(1280, use_max_pool=False)
    self.Mixed_7c = TInceptionE(2048, use_max_pool=True)
    self.fc = tnn.Linear(2048, 1008)  # in the weight file, unused for FID

  def forward(self, x):  # x: NCHW in [0, 1]
    x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
      x = getattr(self, f'Mixed_{name}')(x)
    return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def _random_reference(seed):
  """The reference with random weights and random but well-scaled BatchNorm statistics."""
  torch.manual_seed(seed)
  net = TFIDInception()
  # Running statistics from one batch (momentum 1) keep activations O(1) through 48 layers; then perturb them.
  for m in net.modules():
    if isinstance(m, tnn.BatchNorm2d):
      m.momentum = 1.0
  with torch.no_grad():
    net.train()(torch.rand(2, 3, 96, 96))
    net.eval()
    for m in net.modules():
      if isinstance(m, tnn.BatchNorm2d):
        c = m.num_features
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.add_(0.1 * torch.randn(c))
        m.running_var.mul_(torch.empty(c).uniform_(0.7, 1.4))
  return net


# ---- Tests --------------------------------------------------------------------------------------------------------

def test_resize_matches_torch_bilinear():
  # Upsampling and downsampling: jax.image.resize(antialias=False) == F.interpolate(align_corners=False).
  import jax  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for h, w in ((37, 53), (340, 310)):
    x = rng.uniform(size=(1, h, w, 3)).astype(np.float32)
    ours = np.asarray(jax.image.resize(x, (1, 299, 299, 3), 'bilinear', antialias=False))
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode='bilinear',
                        align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def _exact_frechet(f1, f2):
  """Frechet distance of two small feature sets (n << 2048) in closed form: with centred features A [d, n1] and
  B [d, n2], tr sqrt(S1 S2) is the sum of the singular values of A^T B / sqrt((n1 - 1)(n2 - 1)), an n1 x n2
  problem, with no square root of a singular 2048 x 2048 matrix."""
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  a, b = (f1 - f1.mean(0)).T, (f2 - f2.mean(0)).T
  k1, k2 = len(f1) - 1, len(f2) - 1
  tr_sqrt = np.linalg.svd(a.T @ b, compute_uv=False).sum() / np.sqrt(k1 * k2)
  return float(np.sum((f1.mean(0) - f2.mean(0)) ** 2) + (a ** 2).sum() / k1 + (b ** 2).sum() / k2 - 2 * tr_sqrt)


def test_port_matches_pytorch_reference_in_padded_batches_and_fid_end_to_end(tmp_path):
  net = _random_reference(0)
  path = tmp_path / 'inception.pth'
  torch.save(net.state_dict(), path)
  assert inception.fid_available(path)
  variables = inception.load_pytorch_fid_weights(path)

  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (5, 64, 80, 3), dtype=np.uint8)
  others = rng.integers(0, 256, (4, 64, 80, 3), dtype=np.uint8) // 2      # darker: a different set
  with torch.no_grad():
    ref, ref_others = (net(torch.from_numpy(x.astype(np.float32) / 255.0).permute(0, 3, 1, 2)).numpy().astype(
        np.float64) for x in (images, others))
  # Chunks of 2: three batches, the last padded with zeros and cut back.
  ours = inception.InceptionFeatures(variables, batch_size=2)(images)
  assert ours.shape == (5, inception.FEATURE_DIM) and ours.dtype == np.float64
  assert np.abs(ref).mean() > 1e-2 and np.abs(ref - ref[::-1]).max() > 1e-3  # non-trivial, input-dependent
  np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
  # fid() from the images, against the closed form on the reference network's features.
  want = _exact_frechet(ref, ref_others)
  assert want > 1e-3
  assert inception.fid(images, others, variables, batch_size=2) == pytest.approx(want, rel=2e-3)
  # Float input in [-1, 1] reaches the network as the same [0, 1] picture.
  np.testing.assert_allclose(inception.to_unit_range(images.astype(np.float32) / 127.5 - 1.0),
                             images.astype(np.float32) / 255.0, atol=1e-6)


def test_exact_frechet_helper_agrees_with_the_library_on_full_rank_features():
  rng = np.random.default_rng(0)
  f1, f2 = rng.normal(size=(200, 6)), rng.normal(0.3, 1.5, size=(150, 6))
  assert _exact_frechet(f1, f2) == pytest.approx(inception.fid_from_features(f1, f2), rel=1e-9)


def test_missing_weights_and_bad_files(tmp_path):
  assert not inception.fid_available(None)
  with pytest.raises(FileNotFoundError, match=inception.WEIGHTS_NAME):
    inception.require_fid_weights(None)
  missing = tmp_path / 'nowhere.pth'
  with pytest.raises(FileNotFoundError, match='nowhere.pth'):
    inception.load_pytorch_fid_weights(missing)
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(b'not a torch file')
  with pytest.raises(ValueError, match='bad.pth'):
    inception.load_pytorch_fid_weights(bad)
  # A state_dict of another network names what is missing.
  small = tmp_path / 'small.pth'
  torch.save({'Conv2d_1a_3x3.conv.weight': torch.zeros(32, 3, 3, 3)}, small)
  with pytest.raises(ValueError, match='missing'):
    inception.load_pytorch_fid_weights(small)
  with pytest.raises(ValueError, match=r'\[-1, 1\]'):
    inception.to_unit_range(np.full((1, 8, 8, 3), 3.0, np.float32))
