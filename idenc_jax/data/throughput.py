"""`python -m idenc_jax.data.throughput`: input pipeline throughput in images/s.

Builds the training iterator (both half-batches, decoding, flips) over a prepared dataset or the synthetic
identities, skips a warm-up (worker start-up), then times batches. Example:
  python -m idenc_jax.data.prepare --input=../shared/data/celeba_id128 --resolution=128 \
      --output=/tmp/cid128
  python -m idenc_jax.data.throughput --data=/tmp/cid128 --workers=0,1,2
"""

import time

from absl import app
from absl import flags

from configs.base import get_config
from idenc_jax.data import batch_layout
from idenc_jax.data import pipeline
from idenc_jax.data import sources as sources_lib

_DATA = flags.DEFINE_string('data', 'synthetic', '"synthetic" or prepared dataset dir(s), comma-separated.')
_AGNOSTIC = flags.DEFINE_string('agnostic', 'same', 'Agnostic source: "same", "synthetic" or a prepared '
                                'dir (with --data=synthetic, "same" means synthetic).')
_WORKERS = flags.DEFINE_list('workers', ['0'], 'Worker process counts to measure, e.g. 0,1,2.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 128, 'Global batch size B (all of it on this host).')
_RESOLUTION = flags.DEFINE_integer('resolution', 128, 'Image resolution.')
_STEPS = flags.DEFINE_integer('steps', 40, 'Timed batches.')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Untimed batches first.')
_READ_THREADS = flags.DEFINE_integer('read_threads', 2, 'Batch-building threads per process.')
_SYNTHETIC_IDENTITIES = flags.DEFINE_integer('synthetic_identities', 64, 'Synthetic train identities.')
_SYNTHETIC_IMAGES = flags.DEFINE_integer('synthetic_images', 8, 'Synthetic images per identity.')


def measure(config, sources, steps: int, warmup: int, read_threads: int) -> float:
  """Images per second of the iterator over `steps` batches after `warmup` ones."""
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1, sources=sources,
                                    read_threads=read_threads)
  try:
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(steps):
      next(it)
    elapsed = time.perf_counter() - start
  finally:
    it.close()
  return steps * config.train.batch_size / elapsed


def main(argv):
  del argv
  config = get_config('paper')
  config.model.resolution = _RESOLUTION.value
  config.train.batch_size = _BATCH_SIZE.value
  config.data.identity_sources = _DATA.value
  agnostic = _AGNOSTIC.value
  if _DATA.value == 'synthetic' and agnostic == 'same':
    agnostic = 'synthetic'
  config.data.agnostic_source = agnostic
  config.data.synthetic_train_identities = _SYNTHETIC_IDENTITIES.value
  config.data.synthetic_images_per_identity = _SYNTHETIC_IMAGES.value
  config.data.synthetic_agnostic_images = _SYNTHETIC_IDENTITIES.value * _SYNTHETIC_IMAGES.value
  start = time.perf_counter()
  sources = sources_lib.load_sources(config, 'train')
  print(f'sources: {[s.name for s in sources.identity]} + agnostic {sources.agnostic.name}, '
        f'{sources.num_identities} identities; loaded in {time.perf_counter() - start:.1f}s')
  b_ag = batch_layout.agnostic_size(config)
  print(f'B={config.train.batch_size} ({config.train.batch_size - b_ag} identity + '
        f'{b_ag} agnostic) at {config.model.resolution}px, '
        f'{_READ_THREADS.value} read thread(s) per process')
  for workers in (int(w) for w in _WORKERS.value):
    config.data.num_workers = workers
    rate = measure(config, sources, _STEPS.value, _WARMUP.value, _READ_THREADS.value)
    print(f'workers={workers}: {rate:,.0f} images/s ({rate / config.train.batch_size:.1f} batches/s)',
          flush=True)


if __name__ == '__main__':
  app.run(main)
