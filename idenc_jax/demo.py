"""A web demo of personalization on localhost (Gradio): reference photos in, new images of the person out.

  python -m idenc_jax.demo                       # the shipped weights (idenc_jax/pretrained/cpu_synthetic)
  python -m idenc_jax.demo --workdir=runs/cpu    # a training workdir or an exported model folder
  idenc-demo --port=7860

Tab "Generate": upload 1-10 reference photos (or pick one of the model's synthetic test identities: the
shipped model knows drawings, not photos), choose sampler, steps, identity guidance (models trained with
`loss.null_identity_prob > 0`), seed and count; see the grid and download the images and the embedding
(`embedding.npy` with its model record, which `--mode=sample --config.sample.refs=embedding.npy` takes).
Tab "Restore" (stage-2 models): upload a low-resolution or masked photo and references.

Each button is also an API endpoint (`/generate`, `/restore`) that `gradio_client.Client` calls, which is
how the tests drive it. Errors in the input (no references, an unreadable image) show as one-line messages.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any

import numpy as np
from absl import app, flags
from PIL import Image

from idenc_jax import cli
from idenc_jax.data import pipeline
from idenc_jax.diffusion import samplers
from idenc_jax.personalize import pretrained as pretrained_lib
from idenc_jax.personalize.personalizer import Personalizer
from idenc_jax.personalize.restorer import Restorer

MAX_REFERENCES = 10
MAX_IMAGES = 32
NO_IDENTITY = '(my photos)'


def _test_identities(config, limit: int = 32) -> dict[str, np.ndarray]:
  """The model's synthetic test identities (references to try it with), or none for real-face data."""
  if [s.strip() for s in config.data.identity_sources.split(',')] != ['synthetic']:
    return {}
  refs = config.eval.num_references
  out = {}
  for label, images in pipeline.make_eval_identities(config, 'test').items():
    if len(out) >= limit:
      break
    out[f'test identity {label}'] = images[:refs]
  return out


class DemoModel:
  """What the page's buttons run: the model, its test identities, and files written for download."""

  def __init__(self, config, params: dict, out_dir: str | None = None):
    self.config = config
    self.restorer = Restorer(config, params) if config.stage == 2 else None
    self.personalizer = self.restorer.personalizer if self.restorer else Personalizer(config, params)
    self.guided = config.loss.null_identity_prob > 0
    self.identities = _test_identities(config)
    self.out_dir = out_dir or tempfile.mkdtemp(prefix='idenc_demo_')
    self._calls = 0

  def references(self, files: list[Any] | None, identity: str | None) -> np.ndarray | list[str]:
    """Uploaded reference files (paths), or a test identity's references."""
    paths = [f if isinstance(f, str) else getattr(f, 'name', f) for f in (files or [])]
    if paths:
      if len(paths) > MAX_REFERENCES:
        raise ValueError(f'Upload at most {MAX_REFERENCES} reference photos, got {len(paths)}.')
      return paths
    if identity and identity != NO_IDENTITY:
      if identity not in self.identities:
        raise ValueError(f'Unknown test identity {identity!r}.')
      return self.identities[identity]
    raise ValueError('Upload 1-10 reference photos or pick a test identity.')

  def _new_dir(self) -> str:
    self._calls += 1
    d = os.path.join(self.out_dir, f'{self._calls:04d}')
    os.makedirs(d, exist_ok=True)
    return d

  def generate(self, files, identity, sampler: str, steps: int, guidance: float, seed: int,
               count: int) -> tuple[list[str], list[str], list[str]]:
    """-> (the references as the model saw them, the samples, the samples + embedding.npy for download)."""
    count, steps, seed = int(count), int(steps), int(seed)
    if not 1 <= count <= MAX_IMAGES:
      raise ValueError(f'Number of images must be 1-{MAX_IMAGES}, got {count}.')
    p = self.personalizer
    refs = self.references(files, identity)
    # Read (and aligned, where the model's training faces were) once: shown as the encoder sees them and
    # embedded as they are (test identities are already aligned).
    seen_images = p.preprocess(refs, align=None if isinstance(refs, list) else False)
    z = p.embed(seen_images, align=False)
    steps_arg = None if sampler == 'ddpm' and steps > p.start_t else steps
    with p.sampling_bar(f'demo: {count} images', 1, sampler, steps_arg):
      images = p.generate(z, count, sampler=sampler, steps=steps_arg, seed=seed,
                          guidance=float(guidance) if self.guided else 1.0)
    out = self._new_dir()
    seen = self._save(out, 'reference', seen_images)
    paths = self._save(out, 'sample', images)
    emb = os.path.join(out, 'embedding.npy')
    p.save_embedding(emb, z)
    return seen, paths, paths + [emb]

  @staticmethod
  def _save(out: str, prefix: str, images: np.ndarray) -> list[str]:
    paths = []
    for i, img in enumerate(images):
      paths.append(os.path.join(out, f'{prefix}_{i:03d}.png'))
      Image.fromarray(img).save(paths[-1])
    return paths

  def restore(self, degraded, files, identity, steps: int, seed: int, count: int) -> tuple[list[str], list[str]]:
    """A stage-2 model restores the uploaded low-res or masked photo as the references' identity."""
    if self.restorer is None:
      raise ValueError('This model is not a stage-2 (restoration) model.')
    if degraded is None:
      raise ValueError('Upload the low-resolution or masked photo to restore.')
    p = self.personalizer
    refs = self.references(files, identity)
    z = p.embed(refs, align=None if isinstance(refs, list) else False)
    cond = self.restorer.condition_from_input(np.asarray(Image.open(degraded).convert('RGB')))[None]
    restored = self.restorer.restore(z, cond, num=int(count), sampler='ddim', steps=int(steps), seed=int(seed))[0]
    paths = self._save(self._new_dir(), 'restored', restored)
    return paths, list(paths)


def build_demo(model: DemoModel):
  """The Gradio page (not launched)."""
  import gradio as gr   # lazy: only the demo needs it (pip install '.[demo]')

  def safe(fn):
    @functools.wraps(fn)   # keeps fn's parameter names: the API endpoint's argument names
    def run(*args):
      try:
        return fn(*args)
      except (ValueError, OSError, FloatingPointError) as e:   # bad input: a one-line message on the page
        raise gr.Error(str(e).splitlines()[0]) from e
    return run

  c = model.config
  choices = [NO_IDENTITY] + list(model.identities)
  with gr.Blocks(title='idenc_jax: personalized generation') as page:
    gr.Markdown(f'## idenc_jax: identity encoder for personalized diffusion\n'
                f'{c.model.resolution} px model, {"stage 2 (" + c.stage2.task + ")" if model.restorer else "stage 1"}; '
                f'model {model.personalizer.fingerprint}. Upload photos of one person, or pick a test identity.')
    with gr.Tab('Generate'):
      with gr.Row():
        with gr.Column():
          files = gr.File(label=f'Reference photos (1-{MAX_REFERENCES})', file_count='multiple', file_types=['image'])
          identity = gr.Dropdown(choices, value=choices[1] if len(choices) > 1 else NO_IDENTITY,
                                 label='...or a test identity (used when no photo is uploaded)')
          sampler = gr.Radio(list(samplers.SAMPLERS), value='ddim', label='Sampler')
          steps = gr.Slider(5, 100, value=c.sample.steps, step=1, label='Steps')
          guidance = gr.Slider(1, 10, value=c.sample.guidance if model.guided else 1.0, step=0.5,
                               label='Identity guidance w' + ('' if model.guided else ' (this model has none)'),
                               interactive=model.guided)
          seed = gr.Number(0, precision=0, label='Seed')
          count = gr.Slider(1, MAX_IMAGES, value=8, step=1, label='Images')
          go = gr.Button('Generate', variant='primary')
        with gr.Column():
          seen = gr.Gallery(label='References (as the encoder sees them)', columns=8, height=140)
          grid = gr.Gallery(label='Samples', columns=4, height='auto')
          download = gr.File(label='Download (images and embedding.npy)', file_count='multiple')
      go.click(safe(model.generate), [files, identity, sampler, steps, guidance, seed, count],
               [seen, grid, download], api_name='generate')
    if model.restorer is not None:
      with gr.Tab('Restore'):
        with gr.Row():
          with gr.Column():
            degraded = gr.Image(type='filepath', label='Low-resolution or masked photo')
            r_files = gr.File(label='Reference photos', file_count='multiple', file_types=['image'])
            r_identity = gr.Dropdown(choices, value=choices[1] if len(choices) > 1 else NO_IDENTITY,
                                     label='...or a test identity')
            r_steps = gr.Slider(5, 100, value=c.sample.steps, step=1, label='Steps')
            r_seed = gr.Number(0, precision=0, label='Seed')
            r_count = gr.Slider(1, 8, value=4, step=1, label='Restorations')
            r_go = gr.Button('Restore', variant='primary')
          with gr.Column():
            r_grid = gr.Gallery(label='Restored', columns=4)
            r_download = gr.File(label='Download', file_count='multiple')
        r_go.click(safe(model.restore), [degraded, r_files, r_identity, r_steps, r_seed, r_count],
                   [r_grid, r_download], api_name='restore')
  return page


def load_model(path: str | None) -> DemoModel:
  """The shipped weights (None), an exported model folder or a training workdir."""
  config, params = pretrained_lib.load(path)
  return DemoModel(config, params)


def console_main() -> None:
  """`python -m idenc_jax.demo` and the `idenc-demo` command."""
  # Defined here, not on import: other commands define --workdir too, and a test imports them all at once.
  workdir = flags.DEFINE_string('workdir', None, 'A training workdir or exported model folder (default: the '
                                'shipped weights).')
  host = flags.DEFINE_string('host', '127.0.0.1', 'Address to serve on (localhost by default).')
  port = flags.DEFINE_integer('port', 7860, 'Port to serve on.')

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')   # nothing leaves the machine
    page = build_demo(load_model(workdir.value))
    page.queue().launch(server_name=host.value, server_port=port.value, share=False, show_error=True)
  app.run(cli.one_line_errors(main))


if __name__ == '__main__':
  console_main()
