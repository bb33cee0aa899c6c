"""Stage 2 (condition encoder + cross-attention on a frozen stage-1 model): identity at step 0, frozen
parameters bit-identical after training (EMA included), new parameters trained, leave-one-out identity
embeddings against a numpy loop, and the input pipeline's condition arrays against numpy."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs.base import get_config
from idenc_jax import models
from idenc_jax.data import batch_layout
from idenc_jax.train import losses
from idenc_jax.data import degrade
from idenc_jax.data import pipeline
from idenc_jax.data import sources as sources_lib
from idenc_jax.train import state as state_lib
from idenc_jax.train import step as step_lib
from idenc_jax.personalize import restorer as restorer_lib
from idenc_jax.personalize import sample_mode

R = 8


def _config(task='sr', stage=2):
  """A micro model (8 px, one level): XLA:CPU compile time grows with the number of blocks."""
  c = get_config(f'tiny,{task}')
  c.stage = stage
  m = c.model
  m.resolution, m.base_channels, m.channel_mult, m.num_res_blocks = R, 8, (1,), 1
  m.attn_resolutions, m.num_heads, m.num_groups, m.embed_dim, m.mlp_ratio = (), 2, 4, 16, 2
  e = c.encoder
  e.base_channels, e.channel_mult, e.num_res_blocks, e.attn_resolutions, e.num_heads = 8, (1,), 1, (), 2
  s2 = c.stage2
  s2.cross_attn_resolutions, s2.token_dim, s2.token_resolution, s2.sr_factor = (8,), 16, 8, 2
  c.train.batch_size, c.data.images_per_identity = 8, 2
  c.train.warmup_steps, c.train.learning_rate, c.train.ema_decay = 1, 1e-2, 0.9
  c.diffusion.timesteps = 100
  return c


# Tiny models compile far longer than they run: skip LLVM's expensive passes (same results, a quicker build).
_FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)


def _strip_stage2(params):
  """The stage-1 part of a stage-2 parameter tree (no condition encoder, no cross-attention)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items()
                                       if k[0] != 'cond_encoder' and not any(p.endswith('_xattn') for p in k)})


def _perturb(params, seed=0, scale=0.05):
  """Stage-1 parameters away from their (partly zero) init, so outputs and gradients are non-trivial."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: np.asarray(p + scale * rng.normal(size=p.shape), np.float32), params)


@pytest.fixture(scope='module')
def setup():
  """(config, stage-1 params, stage-2 params initialised from them). One compiled init serves both: the
  stage-1 model is the stage-2 tree without its new parts, moved away from init."""
  config = _config('inpaint')
  init = _compile(lambda r: state_lib.init_params(config, r), jax.random.key(0))
  stage1 = _perturb(_strip_stage2(jax.device_get(init(jax.random.key(1)))))
  fresh = jax.device_get(init(jax.random.key(2)))
  return config, stage1, state_lib.params_from_earlier_stage(config, fresh, stage1)


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  n_ag = batch_layout.agnostic_size(config)
  n = config.train.batch_size - n_ag
  m = config.data.images_per_identity
  deg = degrade.Degradation.from_config(config)
  id_images = rng.integers(0, 256, (n, R, R, 3), dtype=np.uint8)
  ag_images = rng.integers(0, 256, (n_ag, R, R, 3), dtype=np.uint8)
  return {
      'id_images': id_images, 'agnostic_images': ag_images,
      'id_labels': np.repeat(np.arange(n // m), m).astype(np.int32),
      'id_groups': np.repeat(np.arange(n // m), m).astype(np.int32),
      'id_condition': deg(id_images, deg.draw(rng, n)),
      'agnostic_condition': deg(ag_images, deg.draw(rng, n_ag)),
  }


def test_step0_model_is_the_stage1_model(setup):
  config, stage1, params = setup
  c1 = _config('inpaint', stage=1)
  # Every stage-1 array was copied; only condition encoder and cross-attention are new.
  flat1 = traverse_util.flatten_dict(stage1, sep='/')
  flat2 = traverse_util.flatten_dict(params, sep='/')
  new = sorted(k for k in flat2 if k not in flat1)
  assert new and all(k.startswith('cond_encoder/') or '_xattn/' in k for k in new)
  assert any(k.startswith('generator/') for k in new)
  for k, v in flat1.items():
    np.testing.assert_array_equal(flat2[k], v)

  gen1, gen2 = models.build_generator(c1), models.build_generator(config)
  cond_enc = models.build_condition_encoder(config)

  def both(gen1_params, params, x, t, z, cond):
    tokens = cond_enc.apply({'params': params['cond_encoder']}, cond)
    return (gen1.apply({'params': gen1_params}, x, t, z),
            gen2.apply({'params': params['generator']}, x, t, z, tokens), tokens)

  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, R, R, 3)).astype(np.float32)
  t = rng.integers(0, 100, 4).astype(np.int32)
  z = rng.normal(size=(4, 16)).astype(np.float32)
  cond = _batch(config)['id_condition']
  both = _compile(both, stage1['generator'], params, x, t, z, cond)
  out1, out2, tokens = both(stage1['generator'], params, x, t, z, cond)
  assert tokens.shape == (4, 8 * 8, 16)   # token_resolution^2 tokens
  assert float(jnp.std(out1)) > 1e-2      # a non-trivial function
  np.testing.assert_allclose(out2, out1, rtol=0, atol=1e-6)
  # The comparison has teeth: once a cross-attention output projection is non-zero, the output moves.
  gen = traverse_util.flatten_dict(params['generator'], sep='/')
  gen = {k: v + 0.1 if k.startswith('up_0_0_xattn/out/') else v for k, v in gen.items()}
  moved = dict(params, generator=traverse_util.unflatten_dict(gen, sep='/'))
  _, out3, _ = both(stage1['generator'], moved, x, t, z, cond)
  assert float(jnp.max(jnp.abs(out3 - out1))) > 1e-3


def _bits(x):
  return np.asarray(x).view(np.uint32)


def test_training_changes_only_the_new_parameters(setup):
  config, _, params = setup
  state = state_lib.create_train_state(config, jax.random.key(4), params=params)
  before = jax.device_get(state)
  optimizer = state_lib.make_optimizer(config, state.params)
  step = _compile(step_lib.make_train_step(config, optimizer), state, _batch(config))
  losses_seen = []
  for s in range(4):   # step 0 has learning rate 0 (warm-up); the zero output projections need one step
    state, metrics = step(state, _batch(config, seed=s))
    assert metrics['finite'] == 1 and 'diff_agnostic' not in metrics
    losses_seen.append(float(metrics['loss']))
  assert int(state.step) == 4
  mask = traverse_util.flatten_dict(state_lib.trainable_mask(config, params), sep='/')
  for tree in ('params', 'ema_params'):
    old = traverse_util.flatten_dict(getattr(before, tree), sep='/')
    new = traverse_util.flatten_dict(jax.device_get(getattr(state, tree)), sep='/')
    frozen = [k for k in old if not mask[k]]
    trained = [k for k in old if mask[k]]
    assert len(frozen) > 30 and len(trained) > 20
    assert all(k.startswith('cond_encoder/') or '_xattn/' in k for k in trained)
    for k in frozen:   # bit for bit, EMA included
      np.testing.assert_array_equal(_bits(new[k]), _bits(old[k]), err_msg=f'{tree}/{k} changed')
    unchanged = [k for k in trained if np.array_equal(new[k], old[k])]
    assert not unchanged, f'{tree}: trainable parameters did not move: {unchanged}'
  assert all(np.isfinite(losses_seen))


def test_leave_one_out_embeddings_match_numpy():
  rng = np.random.default_rng(0)
  groups = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
  z = rng.normal(size=(10, 5)).astype(np.float32)
  out = np.asarray(losses.leave_one_out_embeddings(jnp.asarray(z), jnp.asarray(groups), 4))
  for k in range(10):
    others = [j for j in range(10) if groups[j] == groups[k] and j != k]
    ref = z[others].mean(axis=0) if others else z[k]
    np.testing.assert_allclose(out[k], ref, atol=1e-6)


def test_cross_attention_position_codes():
  from idenc_jax.models import layers
  codes = np.asarray(layers.position_codes_2d(4, 2, 10, 2.0))
  assert codes.shape == (8, 10)
  f = np.pi * np.geomspace(1.0, 2.0, 2)
  for i in range(4):
    for j in range(2):
      u, v = (i + 0.5) / 4, (j + 0.5) / 2
      ref = np.stack([np.sin(u * f), np.cos(u * f), np.sin(v * f), np.cos(v * f)], axis=-1).reshape(-1)
      np.testing.assert_allclose(codes[i * 2 + j], np.concatenate([ref, [0, 0]]), atol=1e-6)
  # Same frame at every grid size: the centre of a 2x2 block of an 8x8 map is where a 4x4 map's pixel sits,
  # and the mean code of the block is close to the coarse pixel's code for the low frequencies.
  fine = np.asarray(layers.position_codes_2d(8, 8, 8, 4.0)).reshape(8, 8, 8)
  coarse = np.asarray(layers.position_codes_2d(4, 4, 8, 4.0)).reshape(4, 4, 8)
  np.testing.assert_allclose(fine.reshape(4, 2, 4, 2, 8).mean(axis=(1, 3))[..., :4], coarse[..., :4], atol=0.05)


def test_token_resolution_selects_encoder_levels():
  c = get_config('sr')
  assert models.condition_encoder_levels(c) == 4   # 128, 64, 32, 16
  c.stage2.token_resolution = 0
  assert models.condition_encoder_levels(c) == 7
  c.stage2.token_resolution = 12
  with pytest.raises(ValueError, match='token_resolution=12'):
    models.condition_encoder_levels(c)


# ---------------------------------------------------------------------------------------------------------
# The input pipeline's stage-2 conditions.
# ---------------------------------------------------------------------------------------------------------
def _sources(r=16):
  rng = np.random.default_rng(0)
  counts = [5, 4, 6, 4, 5, 7]
  images = rng.integers(0, 256, (sum(counts), r, r, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(len(counts)), counts)
  ident = sources_lib.IdentitySource.from_arrays(images, labels, name='ids')
  ident.label_offset = 0
  agnostic = sources_lib.ArraySource(rng.integers(0, 256, (40, r, r, 3), dtype=np.uint8), 'agnostic')
  return sources_lib.Sources([ident], np.ones(1), agnostic, r)


def _pipeline_config(task, stage=2):
  c = get_config(f'tiny,{task}')
  c.stage = stage
  c.model.resolution = 16
  c.train.batch_size, c.data.images_per_identity = 16, 2
  c.stage2.sr_factor = 4
  return c


def _batches(config, process_index=0, process_count=1, n=2):
  it = pipeline.make_train_iterator(config, process_index=process_index, process_count=process_count,
                                    sources=_sources(), read_threads=0)
  return [next(it) for _ in range(n)]


def test_pipeline_sr_condition_is_block_means_of_the_target():
  (b,) = _batches(_pipeline_config('sr'), n=1)
  for half, images in (('id_condition', b['id_images']), ('agnostic_condition', b['agnostic_images'])):
    cond = b[half]
    assert cond.shape == images.shape and cond.dtype == np.float32
    x = images.astype(np.float64) / 127.5 - 1
    means = x.reshape(len(x), 4, 4, 4, 4, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(cond, np.repeat(np.repeat(means, 4, axis=1), 4, axis=2), atol=1e-6)


def test_pipeline_inpaint_condition_and_process_invariance():
  config = _pipeline_config('inpaint')
  single = _batches(config)
  side = degrade.mask_side(16, config.stage2.mask_fraction)
  for b in single:
    for half, images in (('id_condition', b['id_images']), ('agnostic_condition', b['agnostic_images'])):
      cond = b[half]
      assert cond.shape == images.shape[:3] + (4,)
      hole = cond[..., 3] == 1
      assert set(np.unique(cond[..., 3])) <= {0.0, 1.0}
      np.testing.assert_array_equal(hole.sum(axis=(1, 2)), side * side)
      rows, cols = hole.any(axis=2), hole.any(axis=1)   # a square: side full rows and side full columns
      np.testing.assert_array_equal(rows.sum(axis=1), side)
      np.testing.assert_array_equal(cols.sum(axis=1), side)
      x = images.astype(np.float32) / 127.5 - 1
      np.testing.assert_array_equal(np.where(hole[..., None], 0.0, x), cond[..., :3])
  # Two processes' batches, concatenated in process order, are the single-process batch.
  parts = [_batches(config, p, 2) for p in range(2)]
  for s, b in enumerate(single):
    for key in ('id_condition', 'agnostic_condition', 'id_images'):
      np.testing.assert_array_equal(np.concatenate([parts[0][s][key], parts[1][s][key]]), b[key])
  # Stage 2 shows the images stage 1 shows for the same seed (the degradations use a stream of their own).
  stage1 = _batches(_pipeline_config('inpaint', stage=1))
  for a, b in zip(stage1, single):
    assert 'id_condition' not in a
    np.testing.assert_array_equal(a['id_images'], b['id_images'])
    np.testing.assert_array_equal(a['agnostic_images'], b['agnostic_images'])


# ---------------------------------------------------------------------------------------------------------
# Restoration inputs (idenc_jax/personalize/restorer.py) and metrics (idenc_jax/evaluate/restoration.py).
# ---------------------------------------------------------------------------------------------------------
def test_restorer_reads_degraded_inputs(setup, tmp_path):
  from PIL import Image
  config, _, params = setup
  restorer = restorer_lib.Restorer(config, params)   # inpainting, 8 px
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (R, R, 3), dtype=np.uint8)
  hole = np.zeros((R, R), bool)
  hole[2:7, 1:6] = True
  expected = degrade.inpaint_condition(rgb[None], hole[None])[0]
  # RGBA with the hole in alpha, from a file.
  rgba = np.concatenate([rgb, np.where(hole, 0, 255).astype(np.uint8)[..., None]], axis=-1)
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'masked.png')
  np.testing.assert_array_equal(restorer.condition_from_input(str(tmp_path / 'masked.png')), expected)
  # RGB plus a separate mask file (white = missing).
  Image.fromarray((hole * 255).astype(np.uint8)).save(tmp_path / 'mask.png')
  np.testing.assert_array_equal(restorer.condition_from_input(rgb, str(tmp_path / 'mask.png')), expected)
  with pytest.raises(ValueError, match='needs its hole'):
    restorer.condition_from_input(rgb)
  with pytest.raises(ValueError, match='must be 8x8'):
    restorer.condition_from_input(np.zeros((R + 1, R + 1, 4), np.uint8))
  with pytest.raises(FileNotFoundError, match='nothere.png'):
    restorer.condition_from_input(str(tmp_path / 'nothere.png'))
  # Clean images are degraded as the training pipeline does; the shown input is the grey-hole image.
  clean = rng.integers(0, 256, (3, R, R, 3), dtype=np.uint8)
  cond = restorer.degrade(clean, seed=5)
  deg = degrade.Degradation.from_config(config)
  np.testing.assert_array_equal(cond, deg(clean, deg.draw(np.random.default_rng(5), 3)))
  shown = restorer.show(cond)
  assert shown.dtype == np.uint8 and shown.shape == clean.shape
  assert (shown[cond[..., 3] > 0] == 128).all()
  with pytest.raises(ValueError, match='stage-2 config'):
    restorer_lib.Restorer(_config('inpaint', stage=1), params)


def test_restoration_pixel_metrics_and_baselines():
  from idenc_jax.evaluate import restoration
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  b = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  holes = np.zeros((2, 4, 4), bool)
  holes[:, 1:3, 1:3] = True
  m = restoration.pixel_metrics(a, b, holes)
  d = (a.astype(float) - b.astype(float)) / 127.5
  np.testing.assert_allclose(m['pixel_mse'], np.mean(d ** 2))
  np.testing.assert_allclose(m['psnr'], 10 * np.log10(4 / np.mean(d ** 2)))
  np.testing.assert_allclose(m['hole_mse'], np.mean(d[:, 1:3, 1:3] ** 2))
  # SR baseline: PIL's bicubic resize of the low-resolution image, recovered from the nearest condition.
  from PIL import Image
  deg = degrade.Degradation('sr', 16, sr_factor=4)
  clean = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  base = restoration.baseline_images(deg, deg(clean))
  low = degrade.downsample_area(clean, 4)
  for n in range(2):
    for c in range(3):
      ref = np.asarray(Image.fromarray(low[n, :, :, c], mode='F').resize((16, 16), Image.Resampling.BICUBIC))
      ref = np.clip(np.round((np.clip(ref, -1, 1) + 1) * 127.5), 0, 255)
      assert np.abs(base[n, :, :, c].astype(int) - ref).max() <= 1
  # Inpainting baseline: the masked image itself.
  inp = degrade.Degradation('inpaint', 16)
  cond = inp(clean, inp.draw(np.random.default_rng(1), 2))
  base = restoration.baseline_images(inp, cond)
  hole = cond[..., 3] > 0
  np.testing.assert_array_equal(base[~hole], clean[~hole])
  assert (base[hole] == 128).all()


def test_projection_restores_what_the_input_fixes(setup):
  config, _, params = setup
  rng = np.random.default_rng(7)
  clean = rng.integers(0, 256, (3, R, R, 3), dtype=np.uint8)
  images = rng.integers(0, 256, (3, 2, R, R, 3), dtype=np.uint8)   # [N, num, ...] "samples"
  inp = restorer_lib.Restorer(config, params, check=False)
  cond = inp.degrade(clean, seed=1)
  out = inp.project(images, cond)
  known = cond[:, None, ..., 3] < 0.5
  np.testing.assert_array_equal(np.where(known[..., None], clean[:, None], images), out)
  sr = restorer_lib.Restorer(_config('sr'), params, check=False)   # factor 2
  cond = sr.degrade(clean)
  out = sr.project(images, cond).astype(np.float64) / 127.5 - 1
  means = out.reshape(3, 2, R // 2, 2, R // 2, 2, 3).mean(axis=(3, 5))
  low = clean.astype(np.float64).reshape(3, R // 2, 2, R // 2, 2, 3).mean(axis=(2, 4)) / 127.5 - 1
  # Block means equal the low-res pixels up to uint8 rounding, except where clipping to [-1, 1] bites.
  unclipped = (out > -1).all(axis=-1) & (out < 1).all(axis=-1)
  ok = unclipped.reshape(3, 2, R // 2, 2, R // 2, 2).all(axis=(3, 5))
  assert ok.mean() > 0.3
  np.testing.assert_allclose(means[ok], np.broadcast_to(low[:, None], means.shape)[ok], atol=0.5 / 127.5 + 1e-9)
  # High frequencies (deviations from the block means) are the samples'.
  x = images.astype(np.float64) / 127.5 - 1
  dev = lambda a: a - np.repeat(np.repeat(a.reshape(3, 2, R // 2, 2, R // 2, 2, 3).mean(axis=(3, 5)), 2, 2), 2, 3)
  okp = np.repeat(np.repeat(ok, 2, 2), 2, 3)
  np.testing.assert_allclose(dev(out)[okp], dev(x)[okp], atol=1 / 127.5 + 1e-9)


def test_restorer_samples_with_and_without_data_consistency(setup):
  """Restoration sampling end to end: same seed, same images; with consistency the known pixels are the
  input's (up to uint8 rounding), without it they are the model's own."""
  config, _, params = setup
  restorer = restorer_lib.Restorer(config, params)   # inpainting, 8 px
  rng = np.random.default_rng(3)
  clean = rng.integers(0, 256, (2, R, R, 3), dtype=np.uint8)
  cond = restorer.degrade(clean, seed=2)
  zs = rng.normal(size=(2, config.model.embed_dim)).astype(np.float32)
  kw = dict(num=2, sampler='ddim', steps=3, seed=4)
  free = restorer.restore_batch(zs, cond, **kw)
  dc = restorer.restore_batch(zs, cond, consistent=True, **kw)
  assert free.shape == dc.shape == (2, 2, R, R, 3) and dc.dtype == np.uint8
  np.testing.assert_array_equal(dc, restorer.restore_batch(zs, cond, consistent=True, **kw))
  known = np.broadcast_to((cond[..., 3] < 0.5)[:, None], dc.shape[:-1])
  want = np.broadcast_to(clean[:, None], dc.shape)
  assert np.abs(dc[known].astype(int) - want[known]).max() <= 1
  assert np.abs(free[known].astype(int) - want[known]).max() > 10


def test_sample_mode_restores_a_photo_consistently(setup, tmp_path):
  """`--mode=sample` on a stage-2 config: restored PNGs, the input, the grid and the embedding are written;
  with the stage-2 default (data-consistent sampling) the known pixels of every restoration are the input's."""
  from PIL import Image
  from test_personalize import save_checkpoint   # pylint: disable=import-outside-toplevel
  config, _, params = setup
  workdir = str(tmp_path / 'stage2')
  save_checkpoint(config, params, workdir)
  c = config.copy_and_resolve_references()
  assert c.sample.consistent
  rng = np.random.default_rng(11)
  os.makedirs(tmp_path / 'refs')
  for i in range(2):
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / 'refs' / f'{i}.png')
  Image.fromarray(rng.integers(0, 256, (R, R, 3), dtype=np.uint8)).save(tmp_path / 'clean.png')
  c.sample.refs, c.sample.condition = str(tmp_path / 'refs'), str(tmp_path / 'clean.png')
  c.sample.condition_is_clean = True
  c.sample.num, c.sample.steps, c.sample.out = 2, 3, str(tmp_path / 'out')
  paths = sample_mode.restore_from_config(c, workdir)
  assert len(paths['restored']) == 2 and all(os.path.exists(p) for p in paths['restored'])
  for key in ('input', 'grid', 'embedding'):
    assert os.path.exists(paths[key]), key
  shown = np.asarray(Image.open(paths['input']))
  known = (shown != 128).any(axis=-1)   # the hole is grey; known pixels that happen to be grey are left out
  assert known.sum() > R * R // 3
  for p in paths['restored']:
    out = np.asarray(Image.open(p)).astype(int)
    assert np.abs(out[known] - shown[known]).max() <= 1
  c.sample.condition = None
  with pytest.raises(ValueError, match='config.sample.condition is not set'):
    sample_mode.restore_from_config(c, workdir)
