"""`python -m idenc_jax.data.synthetic --out=grid.png`: a grid of synthetic identities (rows) x images.

For looking at the data; the flags are defined here, not in the package, so that importing the renderer
never registers them in another program's flag set.
"""

from absl import app
from absl import flags
from PIL import Image

from idenc_jax.data import images as images_lib
from idenc_jax.data import synthetic

_OUT = flags.DEFINE_string('out', None, 'Output PNG path.', required=True)
_RESOLUTION = flags.DEFINE_integer('resolution', 64, 'Image size.')
_IDENTITIES = flags.DEFINE_integer('identities', 8, 'Identities (grid rows).')
_IMAGES = flags.DEFINE_integer('images', 8, 'Images per identity (grid columns).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the identities.')
_SPLIT = flags.DEFINE_enum('split', 'train', ['train', 'test'], 'Identity split.')
_AGNOSTIC = flags.DEFINE_bool('agnostic', False, 'Show identity-agnostic images instead.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  n, m, res = _IDENTITIES.value, _IMAGES.value, _RESOLUTION.value
  if _AGNOSTIC.value:
    imgs = synthetic.render_agnostic(n * m, res, seed=_SEED.value)
  else:
    imgs, _ = synthetic.render_identities(n, m, res, seed=_SEED.value, split=_SPLIT.value)
  Image.fromarray(images_lib.tile(imgs, m, gap=2, border=2)).save(_OUT.value)
  print(f'wrote {_OUT.value}: {n} x {m} images at {res} px')


if __name__ == '__main__':
  app.run(main)
