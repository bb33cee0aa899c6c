"""Trained models without their training setup: the shipped weights, exported ones and workdirs, each with the
config it was trained with.

A pretrained folder holds `ema_params.msgpack` (the EMA generator and encoder parameters, flax.serialization's
msgpack: arrays only, nothing executable), `config.json` (the run's resolved config) and `MODEL_CARD.md`. The
package ships one: the `cpu` model trained on the embedded synthetic identities (`SHIPPED`).

The config comes from the config.json the run or the card wrote, over the defaults of configs/base.py (a field
added to the code since keeps its default; a field the code does not know is an error). Reference alignment
follows the training data: a model trained on a dataset prepared with `--align` aligns its references.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization
from ml_collections import config_dict

from configs import base
from idenc_jax.data import records
from idenc_jax.train import checkpoint as ckpt_lib

SHIPPED = Path(__file__).resolve().parents[1] / 'pretrained' / 'cpu_synthetic'
PARAMS_FILE = 'ema_params.msgpack'
CONFIG_FILE = 'config.json'


def config_from_json(path: str | os.PathLike) -> config_dict.ConfigDict:
  """A run's config.json over the configs/base.py defaults; ValueError naming a field the code does not know."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: the config a model was trained with is needed to rebuild it.')
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from e
  config = base.get_config()

  def merge(node, values: dict, prefix: str):
    for key, value in values.items():
      if key not in node:
        raise ValueError(f'{path}: config field {prefix}{key} is unknown to this version of idenc_jax.')
      if isinstance(node[key], config_dict.ConfigDict):
        merge(node[key], value, f'{prefix}{key}.')
      else:
        node[key] = tuple(value) if isinstance(node[key], tuple) and isinstance(value, list) else value
  merge(config, data, '')
  config.sample.align = config.sample.align or trained_on_aligned_faces(config)
  return config


def trained_on_aligned_faces(config) -> bool:
  """Whether a prepared identity dataset of config.data.identity_sources was aligned (its index.json says);
  False for the synthetic identities and for datasets not on this machine."""
  for source in (s.strip() for s in config.data.identity_sources.split(',')):
    if source and source != 'synthetic' and (Path(source) / records.INDEX_FILE).is_file():
      if records.read_index(source).get('aligned'):
        return True
  return False


def save_params(path: str | os.PathLike, params: dict[str, Any]) -> None:
  """Writes a parameter tree ({'generator', 'encoder'}) as msgpack, float32."""
  tree = {part: jax.tree.map(lambda a: np.asarray(a, np.float32), params[part]) for part in ('generator', 'encoder')}
  Path(path).write_bytes(serialization.msgpack_serialize(tree))


def load_params(path: str | os.PathLike) -> dict[str, Any]:
  """Reads save_params' file, checking the values are finite."""
  try:
    params = serialization.msgpack_restore(Path(path).read_bytes())
  except Exception as e:  # pylint: disable=broad-except  (msgpack raises several kinds)
    raise ValueError(f'{path} is not a parameter file written by save_params ({type(e).__name__}).') from e
  ckpt_lib.check_finite(params, f'{path} ')
  return params


def load(path: str | os.PathLike | None = None) -> tuple[config_dict.ConfigDict, dict[str, Any]]:
  """(config, EMA parameters) of a pretrained folder, or of a training workdir (its newest readable checkpoint
  and config.json); None: the shipped weights."""
  path = Path(SHIPPED if path is None else path)
  if (path / PARAMS_FILE).is_file():
    return config_from_json(path / CONFIG_FILE), load_params(path / PARAMS_FILE)
  if (path / 'checkpoints').is_dir():
    if not (path / CONFIG_FILE).is_file():
      raise FileNotFoundError(f'{path} has checkpoints but no {CONFIG_FILE}: pass the config it was trained with, '
                              'Personalizer.from_workdir(config, workdir).')
    return config_from_json(path / CONFIG_FILE), ckpt_lib.load_params(str(path), ema=True)
  raise FileNotFoundError(f'{path} is neither a pretrained folder ({PARAMS_FILE}, {CONFIG_FILE}) nor a training '
                          'workdir (checkpoints/, config.json).')


def export(workdir: str | os.PathLike, out_dir: str | os.PathLike, card: str) -> Path:
  """A workdir's newest EMA parameters and config.json -> a pretrained folder with `card` as MODEL_CARD.md."""
  _, params = load(workdir)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  save_params(out / PARAMS_FILE, params)
  (out / CONFIG_FILE).write_text((Path(workdir) / CONFIG_FILE).read_text())
  (out / 'MODEL_CARD.md').write_text(card)
  return out
