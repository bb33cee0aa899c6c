"""The web demo end to end on the shipped weights, through Gradio's own client: a server on localhost, reference
files uploaded, the returned images and embedding checked against the Python API's (same seed, bit for bit),
and bad input answered with a one-line message."""

import os
import socket

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip('gradio_client')   # the [demo] extra; requirements-test.txt installs it

from idenc_jax import demo  # noqa: E402
from idenc_jax.data import synthetic  # noqa: E402
from idenc_jax.personalize import references  # noqa: E402


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def served():
  os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
  model = demo.load_model(None)
  page = demo.build_demo(model)
  port = _free_port()
  page.queue().launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True, quiet=True)
  try:
    yield model, gradio_client.Client(f'http://127.0.0.1:{port}/', verbose=False)
  finally:
    page.close()


def _read(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert('RGB'))


def test_generate_from_uploaded_photos_equals_the_python_api(served, tmp_path):
  model, client = served
  c, p = model.config, model.personalizer
  refs, _ = synthetic.render_identities(3, 4, 32, seed=c.seed, split='test')
  refs = refs[8:12]                                     # the 4 references of test identity 2
  files = []
  for i, r in enumerate(refs):
    files.append(str(tmp_path / f'ref_{i}.png'))
    Image.fromarray(r).save(files[-1])
  seen, grid, download = client.predict([gradio_client.handle_file(f) for f in files], demo.NO_IDENTITY, 'ddim', 10,
                                  5.0, 3, 4, api_name='/generate')
  got = np.stack([_read(item['image']) for item in grid])
  np.testing.assert_array_equal(np.stack([_read(item['image']) for item in seen]), refs)
  z = p.embed(refs)
  want = p.generate(z, 4, sampler='ddim', steps=10, seed=3, guidance=5.0)
  assert got.shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(got, want)
  names = sorted(os.path.basename(d) for d in download)
  assert names == ['embedding.npy'] + [f'sample_{i:03d}.png' for i in range(4)]
  emb = next(d for d in download if d.endswith('embedding.npy'))
  np.testing.assert_allclose(np.load(emb), z, rtol=0, atol=0)
  # The downloaded embedding carries its model record only when its sidecar travels; the demo wrote one.
  assert os.path.exists(references.model_record_path(os.path.join(model.out_dir, '0001', 'embedding.npy')))


def test_test_identity_and_bad_input(served, tmp_path):
  model, client = served
  name = next(iter(model.identities))
  seen, grid, _ = client.predict(None, name, 'dpmpp', 5, 5.0, 0, 2, api_name='/generate')
  assert len(grid) == 2 and _read(grid[0]['image']).shape == (32, 32, 3)
  np.testing.assert_array_equal(np.stack([_read(item['image']) for item in seen]), model.identities[name])
  with pytest.raises(Exception, match='Upload 1-10 reference photos or pick a test identity'):
    client.predict(None, demo.NO_IDENTITY, 'ddim', 10, 5.0, 0, 2, api_name='/generate')
  broken = tmp_path / 'broken.png'
  broken.write_bytes(b'\x89PNG\r\n\x1a\n not an image')
  with pytest.raises(Exception, match='broken.png'):
    client.predict([gradio_client.handle_file(str(broken))], demo.NO_IDENTITY, 'ddim', 10, 5.0, 0, 2,
                   api_name='/generate')
