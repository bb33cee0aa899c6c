"""config.sample.compiler_options: the XLA options every inference call compiles with (the encoder and the
samplers of `Personalizer`, training's sample grids, the benchmark's sampling step), checked where the config
is read; the images do not depend on the setting beyond rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from idenc_jax import cli, models, xla_options
from idenc_jax.diffusion import generate as generate_lib, schedules
from idenc_jax.perf import fixtures, levers
from idenc_jax.personalize.personalizer import Personalizer
from idenc_jax.train import step as step_lib
from idenc_jax.train.loop import SampleGrid

REDUCE = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}
SETTINGS = ('sampleynnon', 'sampleynnreduce', 'sampleynnoff')


@pytest.fixture(scope='module')
def tiny():
  config = base.get_config('tiny')
  return config, fixtures.model_params(config, 0)


def _library_fusions(jitted, *args) -> int:
  """YNNPACK library fusions in the executable `jitted` compiles for `args` (with the options it was given)."""
  return _count(jitted.lower(*args).compile())


def _count(compiled) -> int:
  # The fusion kind in each library fusion's backend config (the HLO text also names Python frames).
  return compiled.as_text().count('"__ynn_fusion"')


def test_every_config_samples_with_ynnpack_for_reductions_only_and_the_levers_change_that_alone():
  paper, cpu = (cli.load_config_file(f'configs/base.py:{v}') for v in ('paper', 'cpu'))
  assert xla_options.from_config(paper, 'sample') == REDUCE
  assert xla_options.from_config(cpu, 'sample') == REDUCE
  assert xla_options.from_config(paper, 'sample', platform='gpu') is None     # an XLA:CPU option, left out
  assert xla_options.from_config(levers.variant_config(paper, 'sampleynnon'), 'sample') is None
  assert xla_options.from_config(levers.variant_config(paper, 'sampleynnoff'), 'sample') == {
      'xla_cpu_experimental_ynn_fusion_type': ''}
  for lever in SETTINGS:   # the train step's options stay the config's
    assert step_lib.compiler_options(levers.variant_config(cpu, lever)) == step_lib.compiler_options(cpu)


def test_every_inference_call_compiles_with_the_sample_options(tiny):
  config, params = tiny
  r = config.model.resolution
  z, rng = jnp.zeros((1, config.model.embed_dim)), jax.random.split(jax.random.key(0), 1)
  refs = jnp.zeros((1, 2, r, r, 3))
  counts = {}
  for lever in SETTINGS:
    c = levers.variant_config(config, lever)
    p = Personalizer(c, params)
    grid = generate_lib.make_identity_sampler(
        models.build_generator(c), models.build_encoder(c), schedules.from_config(c), num=2, sampler='ddim',
        num_steps=2, compiler_options=xla_options.checked(c, 'sample'))
    step, _, _ = fixtures.compile_sample_step(c, params['generator'], 2)
    counts[lever] = {
        'encoder': _library_fusions(p._encode, p.params['encoder'], refs[0]),
        'sampler': _library_fusions(p._generate_fn(2, 'ddim', 2, 0.0, False, None, 1.0), p.params['generator'], z, rng,
                                None, None),
        'grid sampler': _library_fusions(grid, p.params['generator'], p.params['encoder'], refs, rng[0]),
        'benchmark step': _count(step)}
  for call in counts['sampleynnoff']:
    assert counts['sampleynnoff'][call] == 0, call
    if counts['sampleynnon'][call] == 0:   # XLA's own defaults stopped using YNNPACK here
      assert jax.__version_info__ >= (0, 11), call
      continue
    # Reductions only: fewer fusions than XLA's default (which adds the matmuls and wide convolutions).
    assert 0 < counts['sampleynnreduce'][call] < counts['sampleynnon'][call], (call, counts)


def test_training_sample_grids_take_the_sample_options(tiny):
  config, params = tiny
  args = (params['generator'], params['encoder'])
  fusions = {}
  for lever in ('sampleynnoff', 'sampleynnreduce'):
    grid = SampleGrid(cli.apply_overrides(levers.variant_config(config, lever), {'train.sample_every': 1}))
    refs = jnp.zeros(grid.references.shape, jnp.float32)
    fusions[lever] = _library_fusions(grid.fn, *args, refs, grid.rng)
  assert fusions['sampleynnoff'] == 0 and fusions['sampleynnreduce'] > 0


def test_the_images_do_not_depend_on_the_setting_beyond_rounding(tiny):
  config, params = tiny
  refs = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  out = {}
  for lever in SETTINGS:
    p = Personalizer(levers.variant_config(config, lever), params)
    z = p.embed(refs)
    out[lever] = (z, p.generate(z, 3, sampler='ddim', steps=3, seed=1), p.generate(z, 2, sampler='dpmpp', steps=3))
  for lever in SETTINGS[1:]:
    np.testing.assert_allclose(out[lever][0], out['sampleynnon'][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(out[lever][1:], out['sampleynnon'][1:]):
      assert got.dtype == np.uint8 and got.shape == want.shape
      assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, lever   # one uint8 level of rounding


def test_a_malformed_or_misspelt_sample_option_is_refused_where_the_config_is_read(tiny):
  config, params = tiny
  for text, said in (('xla_cpu_no_such_option=true', 'config.sample.compiler_options.*No such compile option'),
                     ('xla_cpu_use_onednn', 'config.sample.compiler_options entry .* is not name=value')):
    with pytest.raises(ValueError, match=said):
      Personalizer(cli.apply_overrides(config, {'sample.compiler_options': text}), params)
