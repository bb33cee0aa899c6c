"""Bad input and faults, fed for real: a damaged checkpoint, 16-bit and other PNG modes, decompression bombs,
a changed config on a trained workdir, a full disk, Ctrl-C during training, prepare results with nothing in them
and killed prepares' leftovers, sample-mode output folders, ambiguous arrays and seeds. Each checks the message
a user sees, the exit status and that nothing was lost."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from idenc_jax.data import images as images_lib
from idenc_jax.data import layouts as layouts_lib
from idenc_jax.data import prepare as prepare_lib
from idenc_jax.personalize import references
from idenc_jax.personalize.personalizer import Personalizer
from idenc_jax.train import checkpoint as ckpt_lib
from idenc_jax.train import loop
from idenc_jax.train import resume

import train_testing as tt
from test_personalize import _config as personalize_config  # noqa: E402
from test_personalize import random_params, save_checkpoint  # noqa: E402


def _config():
  c = personalize_config()   # the shrunk tiny model of the personalization tests, 2 samples
  c.sample.num = 2
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir with a checkpoint of random (finite) parameters of the shrunk tiny model."""
  config = _config()
  workdir = str(tmp_path_factory.mktemp('trained'))
  save_checkpoint(config, random_params(config), workdir)
  return config, workdir


def _sample_args(workdir, refs, out, *extra):
  return ['--config=configs/base.py:tiny', f'--workdir={workdir}', '--mode=sample',
          '--config.model.channel_mult=(1,)', '--config.model.attn_resolutions=()',
          '--config.encoder.channel_mult=(1,)', '--config.encoder.attn_resolutions=()',
          '--config.sample.steps=2', '--config.sample.num=2', f'--config.sample.refs={refs}',
          f'--config.sample.out={out}', *extra]


def _one_fatal_line(result):
  """The process failed with one FATAL line on stderr and no traceback."""
  assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  fatal = [line for line in result.stderr.splitlines() if line.startswith('FATAL')]
  assert len(fatal) == 1, result.stderr[-2000:]
  return fatal[0]


# ---- Checkpoints: damaged bytes, non-finite values, a changed config, a full disk. --------------------------

def _flip_bytes(step_dir: str) -> list[str]:
  """Flips every byte in the middle third of each array data file of a checkpoint's state; returns them."""
  flipped = []
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) < 4096 or name.startswith('_') or name.endswith('.json'):
        continue
      data = bytearray(open(path, 'rb').read())
      lo, hi = len(data) // 3, 2 * len(data) // 3
      data[lo:hi] = bytes(b ^ 0xFF for b in data[lo:hi])
      open(path, 'wb').write(bytes(data))
      flipped.append(path)
  return flipped


def test_a_damaged_checkpoint_is_an_error_not_black_samples(tmp_path, trained):
  _, src = trained
  workdir = tmp_path / 'damaged'
  shutil.copytree(src, workdir)
  step_dir = os.path.join(ckpt_lib.checkpoint_dir(str(workdir)), '1')
  assert _flip_bytes(step_dir)
  refs = tmp_path / 'refs'
  refs.mkdir()
  Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(refs / 'a.png')
  out = tmp_path / 'out'
  line = _one_fatal_line(tt.run_main(_sample_args(workdir, refs, out)))
  assert str(step_dir) in line or 'checkpoint' in line.lower(), line
  assert not (out / 'embedding.npy').exists() and not list(out.glob('sample_*.png'))


def test_non_finite_parameters_embeddings_and_outputs_are_errors(trained):
  config, workdir = trained
  params = ckpt_lib.load_params(workdir)
  leaf = params['generator']['conv_out']['kernel']
  leaf[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match=r"conv_out'\]\['kernel'\] holds NaN or inf"):
    ckpt_lib.check_finite(params, 'params')
  p = Personalizer.from_workdir(config, workdir)
  z = np.zeros(config.model.embed_dim, np.float32)
  z[3] = np.nan
  with pytest.raises(ValueError, match=r'Embedding\(s\) \[0\] contain NaN or inf'):
    p.generate(z, 1, steps=2)
  with pytest.raises(ValueError, match='Not saving .* NaN or inf'):
    references.save_embedding('/nonexistent/never_written.npy', z)
  with pytest.raises(FloatingPointError, match='NaN or inf'):
    p.generate(np.full(config.model.embed_dim, 3e38, np.float32), 1, steps=2)
  for seed in (-1, 2 ** 32):
    with pytest.raises(ValueError, match=r'\[0, 2\*\*32\)'):
      p.generate(np.zeros(config.model.embed_dim, np.float32), 1, steps=2, seed=seed)


def test_a_damaged_newest_step_falls_back_to_the_previous_one_and_is_kept(tmp_path, caplog):
  workdir = str(tmp_path)
  config = tt.tiny_config(**{'train.num_steps': 4, 'train.checkpoint_every': 2})
  loop.train_and_evaluate(config, workdir)
  steps_dir = ckpt_lib.checkpoint_dir(workdir)
  assert sorted(os.listdir(steps_dir)) == ['2', '4']
  before = tt.read_state(workdir, 2)
  metadata = os.path.join(steps_dir, '4', 'state', '_METADATA')
  text = open(metadata).read()
  open(metadata, 'w').write(text[:40])                          # truncated: a bare JSONDecodeError before
  with caplog.at_level('WARNING'):
    params = ckpt_lib.load_params(workdir)                      # sampling and evaluation read step 2
  assert 'checkpoints/4 is damaged' in caplog.text and 'falling back to' in caplog.text
  tt.assert_trees_equal(params, before['ema_params'], 'ema ')
  assert os.path.exists(metadata)                               # reading never moves or deletes
  # Training resumes from step 2, sets step 4 aside (kept) and trains through step 4 again, to 6.
  loop.train_and_evaluate(tt.tiny_config(**{'train.num_steps': 6, 'train.checkpoint_every': 2}), workdir)
  assert sorted(os.listdir(steps_dir)) == ['2', '4', '6']
  kept = os.path.join(workdir, 'damaged_checkpoints', '4', 'state', '_METADATA')
  assert len(open(kept).read()) == 40                           # the damaged file, as it was
  assert ckpt_lib.checkpoint_step(workdir) == 6


def test_every_step_damaged_is_one_clear_error(tmp_path):
  workdir = str(tmp_path)
  loop.train_and_evaluate(tt.tiny_config(**{'train.num_steps': 2, 'train.checkpoint_every': 2}), workdir)
  metadata = os.path.join(ckpt_lib.checkpoint_dir(workdir), '2', 'state', '_METADATA')
  open(metadata, 'w').write('{')
  with pytest.raises(ValueError, match=r'No readable checkpoint under .*checkpoints/2 is damaged \(JSONDecodeError'):
    ckpt_lib.load_params(workdir)


def test_a_changed_config_keeps_config_json_and_names_what_differs(tmp_path):
  workdir = str(tmp_path)
  loop.train_and_evaluate(tt.tiny_config(**{'train.num_steps': 1, 'train.checkpoint_every': 1}), workdir)
  saved = open(os.path.join(workdir, 'config.json')).read()
  other = tt.tiny_config(**{'train.num_steps': 2, 'model.base_channels': 8})
  with pytest.raises(ValueError, match=r"another model: params\['generator'\].* "
                                       r'config fields changed since config.json: .*model.base_channels: 16 -> 8'):
    loop.train_and_evaluate(other, workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == saved
  assert ckpt_lib.checkpoint_step(workdir) == 1


def test_another_batch_layout_is_refused_on_resume(tmp_path):
  # The cpu default changed from the paper's half to a quarter: a workdir trained before keeps its batches.
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = tt.tiny_config()
  (workdir / 'config.json').write_text('{"seed": 0, "data": {"images_per_identity": 4}}')   # from before the field
  resume.check_same_batch_layout(config, str(workdir))                                       # 0.5 = the half
  config.data.agnostic_fraction = 0.25
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError,
                     match=r'trained with data.agnostic_fraction=0.5 .* pass --config.data.agnostic_fraction=0.5'):
    resume.check_same_batch_layout(config, str(workdir))
  (workdir / 'config.json').write_text(config.to_json_best_effort())
  resume.check_same_batch_layout(config, str(workdir))
  # So do the images per identity (the cpu default went from 4 to 3).
  config.data.images_per_identity = 2
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError,
                     match=r'trained with data.images_per_identity=4 .* pass --config.data.images_per_identity=4'):
    resume.check_same_batch_layout(config, str(workdir))


def _tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True)
  if result.returncode:
    pytest.skip(f'cannot mount a small tmpfs here ({result.stderr.decode().strip()[:100]})')


def test_a_failed_asynchronous_save_stops_the_run_at_once(tmp_path):
  mount = tmp_path / 'small_disk'
  _tmpfs(mount, '600k')   # config.json and the event file fit; a checkpoint (~1.5 MB) does not
  try:
    config = tt.tiny_config(**{'train.num_steps': 40, 'train.checkpoint_every': 2, 'train.log_every': 1})
    with pytest.raises(ckpt_lib.CheckpointSaveError, match='failed .*No space left on device.*is the disk full'):
      loop.train_and_evaluate(config, str(mount / 'run'))
    steps = tt.read_scalars(str(mount / 'run')).get('train/loss', {})
    assert 2 <= max(steps, default=0) <= 4, sorted(steps)   # not at the next checkpoint, let alone the end
  finally:
    subprocess.run(['umount', '-l', str(mount)], check=False)


def test_ctrl_c_during_training_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / 'run'
  args = [sys.executable, '-m', 'idenc_jax.main', '--config=configs/base.py:tiny', f'--workdir={workdir}',
          '--config.train.num_steps=100000', '--config.train.log_every=1', '--config.train.checkpoint_every=100000']
  log = open(tmp_path / 'log.txt', 'w')
  proc = subprocess.Popen(args, cwd=tt.REPO, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 300
    while 'step 3/' not in (tmp_path / 'log.txt').read_text():
      assert proc.poll() is None and time.time() < deadline, (tmp_path / 'log.txt').read_text()[-3000:]
      time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0
  finally:
    proc.kill()
    log.close()
  text = (tmp_path / 'log.txt').read_text()
  assert 'SIGINT received: saving a checkpoint and exiting' in text and 'Preempted at step' in text
  step = ckpt_lib.checkpoint_step(str(workdir))
  assert 3 <= step < 100000


# ---- Images: modes, bombs, the pixel limit. ---------------------------------------------------------------

def test_16_bit_and_other_modes_are_scaled_not_clipped(tmp_path):
  ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)   # 0 ... 65520
  path = tmp_path / 'grey16.png'
  Image.fromarray(ramp).save(path)
  assert Image.open(path).mode == 'I;16'
  rgb = images_lib.read_rgb(path)
  want = np.round(ramp / 257.0).astype(np.uint8)
  np.testing.assert_array_equal(rgb, np.repeat(want[..., None], 3, -1))
  assert rgb.mean() > 100 and (rgb < 250).mean() > 0.9   # not a white silhouette
  # 32-bit integer grey (16-bit samples), float grey in [0, 1], palette, LA and CMYK.
  cases = {'I': Image.fromarray(ramp.astype(np.int32)), 'F': Image.fromarray(ramp.astype(np.float32) / 65535),
           'P': Image.fromarray(np.uint8(want)).convert('P'), 'LA': Image.fromarray(want).convert('LA'),
           'CMYK': Image.fromarray(np.repeat(want[..., None], 3, -1)).convert('CMYK')}
  for mode, image in cases.items():
    assert image.mode == mode
    got = images_lib.rgb_array(image, mode).astype(int)
    assert np.abs(got - want[..., None]).max() <= 1, mode
  with pytest.raises(images_lib.ImageReadError, match='outside 0-65535'):
    images_lib.rgb_array(Image.fromarray(np.full((4, 4), -5, np.int32)), 'negative')
  # prepare reads the same way: its stored image is the scaled ramp (at its own resolution), not white.
  image, reason = layouts_lib.load_item(layouts_lib.Item('a', 'grey16.png', path))
  assert reason is None and np.abs(np.asarray(image).astype(int) - want[..., None]).max() <= 1


def test_big_images_are_refused_before_decoding_and_skipped_by_prepare(tmp_path):
  big = tmp_path / 'people' / 'alice'
  big.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(4):
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).save(big / f'{i}.png')
  Image.new('1', (9000, 8000)).save(big / 'large.png')          # 72 MP: over the default 50 MP limit
  Image.new('1', (15000, 13000)).save(big / 'bomb.png')         # 195 MP: Pillow's own bomb error
  for name in ('large.png', 'bomb.png'):
    with pytest.raises(images_lib.ImageReadError, match=f'{name}'):
      images_lib.read_rgb(big / name, 'reference image')
  with pytest.raises(images_lib.ImageReadError, match='over the limit of 50 MP .*max_image_pixels'):
    images_lib.read_rgb(big / 'large.png')
  index = prepare_lib.prepare(tmp_path / 'people', tmp_path / 'prepared', resolution=16, test_fraction=0,
                              log=lambda s: None)
  assert index['skipped']['images']['too_large'] == 2
  assert index['splits']['train']['images'] == 4
  assert sorted(e[0] for e in index['skipped']['examples']) == ['alice/bomb.png', 'alice/large.png']


# ---- prepare: empty results, killed runs' leftovers, the command line. -------------------------------------

def test_prepare_with_nothing_to_keep_is_an_error_and_writes_nothing(tmp_path):
  src = tmp_path / 'people'
  for who in ('a', 'b'):
    (src / who).mkdir(parents=True)
    for i in range(2):
      Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(src / who / f'{i}.png')
  with pytest.raises(ValueError, match='No identity .* has min_images=4 usable images .*lower --min_images'):
    prepare_lib.prepare(src, tmp_path / 'out', resolution=8, log=lambda s: None)
  assert not (tmp_path / 'out').exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.out.')]
  (src / 'notes').mkdir()
  (src / 'notes' / 'x.txt').write_text('no images')
  empty = tmp_path / 'texts'
  (empty / 'x').mkdir(parents=True)
  (empty / 'x' / 'a.txt').write_text('text')
  result = subprocess.run([sys.executable, '-m', 'idenc_jax.data.prepare', f'--input={empty}',
                           f'--output={tmp_path / "out2"}', '--resolution=8'], cwd=tt.REPO, capture_output=True,
                          text=True, timeout=300)
  line = _one_fatal_line(result)
  assert 'No usable image' in line and '1 not_an_image' in line, line


def test_prepare_removes_the_leftovers_of_killed_runs_only(tmp_path):
  src = tmp_path / 'people' / 'a'
  src.mkdir(parents=True)
  for i in range(4):
    Image.fromarray(np.full((16, 16, 3), 50 * i, np.uint8)).save(src / f'{i}.png')
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  stale = tmp_path / f'.out.partial-{dead.pid}'
  stale.mkdir()
  (stale / 'staging.array_record').write_bytes(b'x' * 1000)
  running = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
  live = tmp_path / f'.out.partial-{running.pid}'   # a live process's (another prepare): never touched
  live.mkdir()
  other = tmp_path / f'.other.partial-{dead.pid}'  # another output's: never touched
  other.mkdir()
  logs = []
  try:
    prepare_lib.prepare(tmp_path / 'people', tmp_path / 'out', resolution=8, test_fraction=0, log=logs.append)
  finally:
    running.kill()
  assert not stale.exists() and live.exists() and other.exists()
  assert any(f'process {dead.pid}' in line for line in logs)


# ---- Sample mode and the Python API: output folders, file names, arrays. ------------------------------------

def test_sample_mode_checks_its_output_folder_before_any_work(tmp_path, trained):
  _, workdir = trained
  refs = tmp_path / 'refs'
  refs.mkdir()
  Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(refs / 'a.png')
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'sample_000.png').write_bytes(b'earlier run')
  (out / 'mine.txt').write_text('a file of the user')
  line = _one_fatal_line(tt.run_main(_sample_args(workdir, refs, out)))
  assert 'already holds 1 outputs of an earlier run' in line and 'sample.overwrite=True' in line
  assert (out / 'sample_000.png').read_bytes() == b'earlier run'
  result = tt.run_main(_sample_args(workdir, refs, out, '--config.sample.overwrite=True'))
  assert result.returncode == 0, result.stderr[-2000:]
  assert sorted(p.name for p in out.iterdir()) == ['embedding.npy', 'embedding.npy.json', 'grid.png', 'mine.txt',
                                                  'sample_000.png', 'sample_001.png']
  # An upper-case .NPY is an embedding, not an image.
  os.rename(out / 'embedding.npy', tmp_path / 'ME.NPY')
  result = tt.run_main(_sample_args(workdir, tmp_path / 'ME.NPY', tmp_path / 'out_npy'))
  assert result.returncode == 0, result.stderr[-2000:]
  np.testing.assert_array_equal(np.load(tmp_path / 'out_npy' / 'embedding.npy'), np.load(tmp_path / 'ME.NPY'))
  # A read-only output folder is refused before the checkpoint is read.
  if os.geteuid() != 0:   # root writes anywhere
    ro = tmp_path / 'read_only'
    ro.mkdir()
    ro.chmod(0o500)
    assert 'Cannot write to the output folder' in _one_fatal_line(tt.run_main(_sample_args(workdir, refs, ro)))


def test_ambiguous_reference_arrays_are_refused():
  with pytest.raises(ValueError, match=r'shape \(64, 64, 5\) is ambiguous'):
    references.load_references(np.zeros((64, 64, 5), np.uint8), 16)
  with pytest.raises(ValueError, match='ambiguous'):
    references.load_references(np.zeros((3, 64, 64), np.uint8), 16)
  assert references.load_references(np.zeros((3, 20, 20, 1), np.uint8), 16).shape == (3, 16, 16, 3)
  assert references.load_references(np.zeros((20, 20, 4), np.uint8), 16).shape == (1, 16, 16, 3)


def test_cli_errors_are_one_line_unless_debugging(tmp_path):
  args = ['--config=configs/base.py:tiny', f'--workdir={tmp_path}', '--mode=sample',
          f'--config.sample.refs={tmp_path / "missing"}']
  line = _one_fatal_line(tt.run_main(args))
  assert line.startswith('FATAL FileNotFoundError: config.sample.refs not found') and 'IDENC_DEBUG=1' in line
  debug = tt.run_main(args, env=dict(os.environ, IDENC_DEBUG='1'))
  assert debug.returncode != 0 and 'Traceback' in debug.stderr
