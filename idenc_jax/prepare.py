"""`python -m idenc_jax.prepare`: raw images -> a prepared ArrayRecord dataset (see data/prepare.py).

Examples:
  python -m idenc_jax.prepare --input=/work/shared/data/celeba_id128 --layout=folders --resolution=64 \
      --output=/data/celeba_id64          # keeps the train/ and test/ split folders
  python -m idenc_jax.prepare --input=/data/CelebA --layout=celeba --resolution=128 --align \
      --output=/data/celeba128
  python -m idenc_jax.prepare --input=/data/ffhq --layout=unlabelled --resolution=128 --output=/data/ffhq128
  python -m idenc_jax.prepare --layout=tfds --tfds_name=celeb_a --tfds_split=train --resolution=64 \
      --output=/data/celeba_tfds64
"""

from absl import app
from absl import flags

from idenc_jax.data import prepare as prepare_lib

_INPUT = flags.DEFINE_string('input', None, 'Raw data folder (tfds: the TFDS data_dir, optional).')
_OUTPUT = flags.DEFINE_string('output', None, 'Prepared dataset folder to create.', required=True)
_LAYOUT = flags.DEFINE_enum('layout', 'folders', list(prepare_lib.LAYOUTS), 'Input layout.')
_RESOLUTION = flags.DEFINE_integer('resolution', 64, 'Output size (centre crop + Lanczos resize).')
_ALIGN = flags.DEFINE_bool('align', False, 'Detect and 5-point align faces with dlib; skip images '
                           'without a face.')
_MIN_IMAGES = flags.DEFINE_integer('min_images', 4, 'Drop identities with fewer usable images.')
_TEST_FRACTION = flags.DEFINE_float('test_fraction', None, 'Fraction of identities held out for test '
                                    '(labelled data without split folders; default 0.1).')
_TEST_DIRS = flags.DEFINE_string('test_dirs', None, 'Test identities: comma-separated folder names / '
                                 'identity numbers, or a file with one per line.')
_SPLIT_DIRS = flags.DEFINE_enum('split_dirs', 'auto', ['auto', 'true', 'false'],
                                'folders layout: treat train/ test/ val/ sub-folders as splits.')
_NUM_SHARDS = flags.DEFINE_integer('num_shards', 0, 'Shards per split (0: one per 10,000 images).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing output.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the identity-level train/test split.')
_IMAGE_FORMAT = flags.DEFINE_enum('image_format', 'png', ['png', 'jpeg'], 'Stored image encoding.')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', 0, 'Decoding threads (0: one per CPU).')
_IDENTITY_FILE = flags.DEFINE_string('identity_file', None, 'celeba layout: identity_CelebA.txt '
                                     '(default: inside --input).')
_TFDS_NAME = flags.DEFINE_string('tfds_name', None, 'tfds layout: dataset name.')
_TFDS_SPLIT = flags.DEFINE_string('tfds_split', 'train', 'tfds layout: split.')
_TFDS_IMAGE_KEY = flags.DEFINE_string('tfds_image_key', 'image', 'tfds layout: image feature.')
_TFDS_LABEL_KEY = flags.DEFINE_string('tfds_label_key', None, 'tfds layout: integer identity feature '
                                      '(unlabelled when not given).')
_TFDS_DOWNLOAD = flags.DEFINE_bool('tfds_download', False, 'tfds layout: download and prepare if absent.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  prepare_lib.prepare(
      _INPUT.value, _OUTPUT.value, layout=_LAYOUT.value, resolution=_RESOLUTION.value,
      align=_ALIGN.value, min_images=_MIN_IMAGES.value, test_fraction=_TEST_FRACTION.value,
      test_dirs=_TEST_DIRS.value, split_dirs=_SPLIT_DIRS.value, num_shards=_NUM_SHARDS.value,
      overwrite=_OVERWRITE.value, seed=_SEED.value, image_format=_IMAGE_FORMAT.value,
      num_workers=_NUM_WORKERS.value, identity_file=_IDENTITY_FILE.value, tfds_name=_TFDS_NAME.value,
      tfds_split=_TFDS_SPLIT.value, tfds_image_key=_TFDS_IMAGE_KEY.value,
      tfds_label_key=_TFDS_LABEL_KEY.value, tfds_download=_TFDS_DOWNLOAD.value)


if __name__ == '__main__':
  app.run(main)
