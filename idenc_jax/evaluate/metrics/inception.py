"""InceptionV3 as used for FID (the pytorch-fid network), in flax linen, loading pytorch-fid's weight file.

The network follows pytorch-fid's FID variant of InceptionV3: its FIDInceptionA/C/E_1 blocks average-pool with
count_include_pad=False, FIDInceptionE_2 max-pools in its pool branch, BatchNorm eps is 1e-3, inputs in [0, 1]
are resized to 299x299 bilinearly (half-pixel centres, no antialiasing, like torch's
`F.interpolate(mode='bilinear', align_corners=False)`) and mapped to [-1, 1]; the output is the 2048-d global
average of Mixed_7c ("pool3"). Layer names equal the torch state_dict names, so the weight file maps onto the
flax variables one to one.

No weights can be downloaded here: the user supplies pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
(a torch state_dict). Reading it needs torch (any CPU build); the network itself is pure JAX.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idenc_jax.evaluate.metrics import frechet

FEATURE_DIM = 2048
INPUT_SIZE = 299
WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'

Pad = tuple[tuple[int, int], tuple[int, int]]


def _pad(ph: int, pw: int) -> Pad:
  return ((ph, ph), (pw, pw))


# ---- Network ----------------------------------------------------------------------------------------------------

class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""
  features: int
  kernel: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Pad = ((0, 0), (0, 0))

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, self.strides, self.padding, use_bias=False, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  return nn.avg_pool(x, (3, 3), (1, 1), _pad(1, 1), count_include_pad=False)


class InceptionA(nn.Module):
  """Mixed_5b/c/d (FIDInceptionA)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name='branch1x1')(x)
    b5 = BasicConv(48, (1, 1), name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=_pad(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=_pad(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=_pad(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), (2, 2), name='branch3x3')(x)
    bd = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=_pad(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), (2, 2), name='branch3x3dbl_3')(bd)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b/c/d/e (FIDInceptionC): factorised 7x7 convolutions."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name='branch1x1')(x)
    b7 = BasicConv(c7, (1, 1), name='branch7x7_1')(x)
    b7 = BasicConv(c7, (1, 7), padding=_pad(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=_pad(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv(c7, (1, 1), name='branch7x7dbl_1')(x)
    bd = BasicConv(c7, (7, 1), padding=_pad(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv(c7, (1, 7), padding=_pad(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv(c7, (7, 1), padding=_pad(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, (1, 7), padding=_pad(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), (2, 2), name='branch3x3_2')(b3)
    b7 = BasicConv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=_pad(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=_pad(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), (2, 2), name='branch7x7x3_4')(b7)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1: average pool without padding counts) and Mixed_7c (FIDInceptionE_2: max pool)."""
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name='branch1x1')(x)
    b3 = BasicConv(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=_pad(0, 1), name='branch3x3_2a')(b3),
        BasicConv(384, (3, 1), padding=_pad(1, 0), name='branch3x3_2b')(b3)], axis=-1)
    bd = BasicConv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv(384, (3, 3), padding=_pad(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=_pad(0, 1), name='branch3x3dbl_3a')(bd),
        BasicConv(384, (3, 1), padding=_pad(1, 0), name='branch3x3dbl_3b')(bd)], axis=-1)
    # The TF graph behind the FID weights max-pools in the last block; pytorch-fid reproduces that quirk.
    pooled = nn.max_pool(x, (3, 3), (1, 1), _pad(1, 1)) if self.max_pool else _avg_pool_3x3(x)
    bp = BasicConv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Images [N, H, W, 3] float in [0, 1] -> pool3 features [N, 2048] float32."""
  resize_input: bool = True

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'expected images of shape [N, H, W, 3], got {x.shape}')
    x = x.astype(jnp.float32)
    if self.resize_input:
      x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), 'bilinear', antialias=False)
    x = 2.0 * x - 1.0
    x = BasicConv(32, (3, 3), (2, 2), name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=_pad(1, 1), name='Conv2d_2b_3x3')(x)
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = BasicConv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(max_pool=False, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    return x.mean(axis=(1, 2))


# ---- Weights ----------------------------------------------------------------------------------------------------

def fid_unavailable_reason(weights_path: str | os.PathLike | None) -> str | None:
  """Why FID cannot be computed with `weights_path` (None when it can)."""
  if weights_path is None or str(weights_path) == '':
    return (f'FID needs the pytorch-fid InceptionV3 weight file ({WEIGHTS_NAME}); none was given '
            '(set config.eval.inception_weights)')
  if not os.path.isfile(weights_path):
    return f'FID weight file not found: {weights_path} (expected pytorch-fid\'s {WEIGHTS_NAME})'
  try:
    import torch  # noqa: F401  lazy: torch is optional; only its presence is checked
  except ImportError:
    return f'reading the FID weight file {weights_path} needs torch (a CPU build is enough): pip install torch'
  return None


def fid_available(weights_path: str | os.PathLike | None) -> bool:
  """Whether FID can be computed: the weight file exists and torch can read it."""
  return fid_unavailable_reason(weights_path) is None


def require_fid_weights(weights_path: str | os.PathLike | None) -> str:
  """Returns the path, or raises FileNotFoundError / ImportError saying which file or package is missing."""
  reason = fid_unavailable_reason(weights_path)
  if reason is None:
    return str(weights_path)
  if 'needs torch' in reason:
    raise ImportError(reason)
  raise FileNotFoundError(reason)


_BN_NAMES = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
             'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
  """torch state_dict of pytorch-fid's InceptionV3 (numpy or torch tensors) -> flax variables.

  The classifier (`fc.*`), `num_batches_tracked` and any auxiliary head are dropped; every other tensor must
  match a variable of `FIDInceptionV3` in name and shape, and every variable must be present.
  """
  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for key, value in state_dict.items():
    parts = key.split('.')
    if parts[0] in ('fc', 'AuxLogits') or parts[-1] == 'num_batches_tracked':
      continue
    value = np.asarray(value.detach().cpu().numpy() if hasattr(value, 'detach') else value, np.float32)
    *path, layer, leaf = parts
    if layer == 'conv' and leaf == 'weight':
      collection, name = 'params', 'kernel'
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif layer == 'bn' and leaf in _BN_NAMES:
      collection, name = _BN_NAMES[leaf]
    else:
      raise ValueError(f'unexpected entry {key!r} in the InceptionV3 state_dict')
    node = variables[collection]
    for p in [*path, layer]:
      node = node.setdefault(p, {})
    node[name] = value

  expected = jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3))))
  flat_expected = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  flat_got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(variables)}
  missing = sorted(set(flat_expected) - set(flat_got))
  extra = sorted(set(flat_got) - set(flat_expected))
  if missing or extra:
    raise ValueError(f'InceptionV3 state_dict does not match the network: missing {missing[:5]}'
                     f'{"..." if len(missing) > 5 else ""}, unexpected {extra[:5]}{"..." if len(extra) > 5 else ""}')
  wrong = [(k, flat_got[k], s) for k, s in flat_expected.items() if flat_got[k] != s]
  if wrong:
    raise ValueError(f'InceptionV3 state_dict shapes differ from the network (name, file, expected): {wrong[:5]}')
  return jax.tree.map(jnp.asarray, variables)


def load_pytorch_fid_weights(path: str | os.PathLike) -> dict[str, Any]:
  """Reads pytorch-fid's weight file (a torch state_dict) into flax variables {'params', 'batch_stats'}."""
  path = require_fid_weights(path)
  import torch  # lazy: torch is optional (only to read the .pth weights)
  try:
    state_dict = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises several unrelated types for a bad file
    raise ValueError(f'could not read {path} as a torch state_dict: {e}') from e
  if not isinstance(state_dict, dict):
    raise ValueError(f'{path} holds a {type(state_dict).__name__}, not a state_dict')
  return convert_state_dict(state_dict)


# ---- Features and FID -------------------------------------------------------------------------------------------

def to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] or float [-1, 1] images [N, H, W, 3] -> float32 [0, 1], the network's input range."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'expected images of shape [N, H, W, 3], got {images.shape}')
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'expected uint8 or float images, got dtype {images.dtype}')
  if images.size and (images.min() < -1.0 - 1e-3 or images.max() > 1.0 + 1e-3):
    raise ValueError(f'float images must be in [-1, 1], got values in [{images.min()}, {images.max()}]')
  return ((np.clip(images, -1.0, 1.0) + 1.0) / 2.0).astype(np.float32)


class InceptionFeatures:
  """Computes pool3 features of images with the FID InceptionV3, in fixed-size jitted batches."""

  def __init__(self, variables_or_path: dict[str, Any] | str | os.PathLike, batch_size: int = 50):
    if batch_size <= 0:
      raise ValueError(f'batch_size must be positive, got {batch_size}')
    if isinstance(variables_or_path, dict):
      self.variables = variables_or_path
    else:
      self.variables = load_pytorch_fid_weights(variables_or_path)
    self.batch_size = batch_size
    self._apply = jax.jit(FIDInceptionV3().apply)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] or float in [-1, 1] -> features [N, 2048] float64."""
    x = to_unit_range(images)
    n = x.shape[0]
    out = []
    for start in range(0, n, self.batch_size):
      batch = x[start:start + self.batch_size]
      pad = self.batch_size - batch.shape[0] if n > self.batch_size else 0  # one compiled shape for all batches
      if pad:
        batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
      out.append(np.asarray(self._apply(self.variables, batch), np.float64)[:batch.shape[0] - pad])
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID: Frechet distance between Gaussians fitted to two sets of pool3 features."""
  return frechet.frechet_distance_from_features(features1, features2)


def fid(images1: np.ndarray, images2: np.ndarray, weights: dict[str, Any] | str | os.PathLike,
        batch_size: int = 50) -> float:
  """FID between two image sets (uint8 or float in [-1, 1], any size) with the given weight file or variables."""
  net = InceptionFeatures(weights, batch_size)
  return fid_from_features(net(images1), net(images2))

