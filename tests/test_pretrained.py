"""The shipped weights and loading a model with the config it was trained with: from_pretrained on the shipped
folder (its samples recognised by the oracle, as its card states), on an exported folder and on a workdir;
config.json over the code's defaults; mismatches as clear errors."""

import json
import os

import jax
import numpy as np
import pytest

from configs import base
from idenc_jax.data import records, synthetic
from idenc_jax.evaluate.metrics import oracle as oracle_lib
from idenc_jax.personalize import pretrained
from idenc_jax.personalize.personalizer import Personalizer

from test_personalize import random_params, save_checkpoint, shrink  # noqa: E402


def test_the_shipped_weights_are_small_safe_and_described():
  files = sorted(os.listdir(pretrained.SHIPPED))
  assert files == ['MODEL_CARD.md', 'config.json', 'ema_params.msgpack']
  assert os.path.getsize(pretrained.SHIPPED / 'ema_params.msgpack') < 10 * 2 ** 20
  card = (pretrained.SHIPPED / 'MODEL_CARD.md').read_text()
  for fact in ('step 10,000', 'synthetic identities', '2-core', '0.574'):
    assert fact in card, fact


def test_shipped_model_generates_the_identity_of_unseen_references():
  """Held-out test identities (never trained on): 8 references each -> 4 samples with the shipped config's
  sampler (DDIM-25, guidance 5); the identity oracle, with a gallery of all 32 test identities, recognises
  far more than chance (1/32: about 1 of 32 samples; the card states 0.57)."""
  p = Personalizer.from_pretrained()
  c = p.config
  assert (c.model.resolution, c.train.num_steps, c.sample.guidance, c.sample.align) == (32, 10_000, 5.0, False)
  ids = c.data.synthetic_test_identities
  refs, _ = synthetic.render_identities(ids, 8, 32, seed=c.seed, split='test')
  gallery, gallery_labels = synthetic.render_identities(ids, 4, 32, seed=c.seed, split='test', first_image=8)
  chosen = np.arange(0, ids, 4)                                   # 8 identities
  zs = np.stack([p.embed(refs[8 * i:8 * i + 8]) for i in chosen])
  samples = p.generate_batch(zs, 4, sampler='ddim', steps=c.sample.steps)
  oracle = oracle_lib.IdentityOracle(gallery, gallery_labels)
  result = oracle.evaluate(samples.reshape(-1, 32, 32, 3), np.repeat(chosen, 4))
  assert result['chance'] == pytest.approx(1 / 32)
  assert result['accuracy'] >= 6 / 32, result     # P(>= 6 of 32 right | chance) < 1e-3


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  config = base.get_config('tiny')
  shrink(config)
  params = random_params(config)
  workdir = tmp_path_factory.mktemp('workdir')
  save_checkpoint(config, params, str(workdir))
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  return config, params, workdir


def test_workdir_and_exported_folder_load_with_their_own_config(trained, tmp_path):
  config, params, workdir = trained
  for p in (Personalizer.from_pretrained(str(workdir)), Personalizer.from_workdir(str(workdir))):
    assert p.config.to_dict() == config.to_dict()
  exported = pretrained.export(workdir, tmp_path / 'exported', '# card')
  p = Personalizer.from_pretrained(str(exported))
  for part in ('generator', 'encoder'):
    for a, b in zip(jax.tree.leaves(params[part]), jax.tree.leaves(p.params[part])):
      np.testing.assert_array_equal(a, np.asarray(b))
  z = p.embed(np.zeros((2, 16, 16, 3), np.uint8))
  np.testing.assert_array_equal(z, Personalizer(config, params).embed(np.zeros((2, 16, 16, 3), np.uint8)))


def test_config_json_over_defaults_and_clear_mismatches(trained, tmp_path):
  config, _, workdir = trained
  data = json.loads((workdir / 'config.json').read_text())
  del data['train']['lr_schedule']                  # a field added to the code after the run
  (tmp_path / 'old.json').write_text(json.dumps(data))
  old = pretrained.config_from_json(tmp_path / 'old.json')
  assert old.train.lr_schedule == 'constant' and old.model.channel_mult == (1,)
  data['model']['widht'] = 3
  (tmp_path / 'new.json').write_text(json.dumps(data))
  with pytest.raises(ValueError, match='config field model.widht is unknown'):
    pretrained.config_from_json(tmp_path / 'new.json')
  # A config.json that does not match the checkpoint names the first differing parameter.
  other = tmp_path / 'mismatch'
  other.mkdir()
  os.symlink(workdir / 'checkpoints', other / 'checkpoints')
  bigger = json.loads((workdir / 'config.json').read_text())
  bigger['model']['base_channels'] = 32
  (other / 'config.json').write_text(json.dumps(bigger))
  with pytest.raises(ValueError, match='does not match this config: generator'):
    Personalizer.from_pretrained(str(other))
  with pytest.raises(FileNotFoundError, match='neither a pretrained folder'):
    Personalizer.from_pretrained(str(tmp_path))


def test_references_are_aligned_when_the_training_faces_were(tmp_path):
  prepared = tmp_path / 'faces'
  prepared.mkdir()
  (prepared / 'index.json').write_text(json.dumps({'format': records.FORMAT, 'aligned': True}))
  config = base.get_config('tiny')
  config.data.identity_sources = str(prepared)
  assert pretrained.trained_on_aligned_faces(config)
  (tmp_path / 'config.json').write_text(config.to_json_best_effort())
  assert pretrained.config_from_json(tmp_path / 'config.json').sample.align is True
  config.data.identity_sources = 'synthetic'
  assert not pretrained.trained_on_aligned_faces(config)


def test_embedding_files_record_their_model_and_another_model_refuses_them(trained, tmp_path):
  config, params, _ = trained
  mine, other = Personalizer(config, params), Personalizer(config, random_params(config, seed=1))
  assert mine.fingerprint == Personalizer(config, params).fingerprint != other.fingerprint
  z = mine.embed(np.full((16, 16, 3), 100, np.uint8))
  path = str(tmp_path / 'me.npy')
  mine.save_embedding(path, z)
  assert json.loads(open(path + '.json').read()) == {'model': mine.fingerprint, 'embed_dim': config.model.embed_dim}
  np.testing.assert_array_equal(mine.load_embedding(path), z)
  with pytest.raises(ValueError, match='was made by another model .* embed the reference photos again'):
    other.load_embedding(path)
  os.remove(path + '.json')                        # a file without a record (older, or made by hand) is taken
  np.testing.assert_array_equal(other.load_embedding(path), z)
