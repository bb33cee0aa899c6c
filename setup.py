"""idenc_jax: personalized diffusion with an identity encoder, in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup



def _requirements(name: str) -> list[str]:
  return [line.split('#')[0].strip() for line in Path(__file__).with_name(name).read_text().splitlines()
          if line.split('#')[0].strip()]


# The commands `pip install` puts on the PATH (each also runs as `python -m ...`).
CONSOLE_SCRIPTS = [
    'idenc-train = idenc_jax.main:train_command',
    'idenc-sample = idenc_jax.main:sample_command',
    'idenc-eval = idenc_jax.main:eval_command',
    'idenc-prepare = idenc_jax.data.prepare:console_main',
    'idenc-curve = idenc_jax.experiments.curve:console_main',
    'idenc-benchmark = idenc_jax.perf.benchmark:console_main',
    'idenc-demo = idenc_jax.demo:console_main',
]

setup(
    name='idenc_jax',
    version='0.1.0',
    description='Identity Encoder for Personalized Diffusion: training, sampling and evaluation in JAX/Flax.',
    packages=find_packages(include=['idenc_jax', 'idenc_jax.*', 'configs']),
    # The shipped pretrained model (Personalizer.from_pretrained()): weights, config and model card.
    package_data={'idenc_jax': ['pretrained/*/*']},
    license='MIT',
    python_requires='>=3.11',
    install_requires=_requirements('requirements.txt'),
    extras_require={
        'test': _requirements('requirements-test.txt'),   # pip install -e '.[test]'
        'demo': ['gradio>=5,<7'],                          # the web demo (python -m idenc_jax.demo)
        'eval': ['torch'],                                 # FID: reads pytorch-fid's InceptionV3 weights
        'cuda': ['jax[cuda12]'],                           # NVIDIA GPUs
        'tpu': ['jax[tpu]'],                               # Cloud TPU VMs
    },
    entry_points={'console_scripts': CONSOLE_SCRIPTS},
)
