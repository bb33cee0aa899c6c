"""Progress bars: the sampling bar is advanced from inside the compiled sampler (`jax.debug.callback`) once per
step, whatever the chunking; bars show with rate and ETA when asked (IDENC_PROGRESS=1) and never change a result."""

import numpy as np

from configs import base
from idenc_jax import progress
from idenc_jax.data import prepare
from idenc_jax.evaluate import protocol
from idenc_jax.personalize.personalizer import Personalizer

from test_personalize import random_params, shrink  # noqa: E402
from test_prepare import tree  # noqa: F401,E402  (the fixture)


def _personalizer():
  c = base.get_config('tiny')
  shrink(c)
  return Personalizer(c, random_params(c))


def test_sampling_bar_counts_each_step_of_each_chunk(monkeypatch, capsys):
  p = _personalizer()
  zs = np.random.default_rng(0).standard_normal((3, p.embed_dim)).astype(np.float32)
  monkeypatch.setenv('IDENC_PROGRESS', '0')
  quiet = protocol.generate_for_eval(p, zs, 2, sampler='ddim', steps=4, seed=0, max_images_per_call=4)
  assert capsys.readouterr().err == ''
  monkeypatch.setenv('IDENC_PROGRESS', '1')
  shown = protocol.generate_for_eval(p, zs, 2, sampler='ddim', steps=4, seed=0, max_images_per_call=4, desc='eval')
  err = capsys.readouterr().err
  np.testing.assert_array_equal(quiet, shown)
  # 3 identities in chunks of 2 -> 2 compiled calls of 4 steps: 8 ticks from the device, the bar's total.
  assert 'eval: 6 images, ddim 4 steps, w=1' in err
  assert '8/8' in err and 'step/s' in err, err


def test_advance_without_a_bar_is_harmless_and_bars_unregister(monkeypatch):
  monkeypatch.setenv('IDENC_PROGRESS', '1')
  progress.advance('nothing open')
  with progress.task('x', 3, name='t') as b:
    progress.advance('t', 2)
    assert b.n == 2
  progress.advance('t')   # closed: no error, nothing advanced
  assert b.n == 2


def test_prepare_shows_a_bar_with_rate_and_eta(tree, tmp_path, monkeypatch, capsys):  # noqa: F811
  monkeypatch.setenv('IDENC_PROGRESS', '1')
  prepare.prepare(tree[0], tmp_path / 'out', resolution=16, min_images=2)
  err = capsys.readouterr().err
  assert 'preparing' in err and 'img/s' in err and '<' in err, err   # tqdm's "elapsed<remaining"
