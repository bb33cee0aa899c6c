"""idenc_jax: personalized diffusion with an identity encoder, in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split('#')[0].strip()
    for line in Path(__file__).with_name('requirements.txt').read_text().splitlines()
    if line.split('#')[0].strip()
]

setup(
    name='idenc_jax',
    version='0.1.0',
    description='Identity Encoder for Personalized Diffusion: training, sampling and evaluation in JAX/Flax.',
    packages=find_packages(include=['idenc_jax', 'idenc_jax.*', 'configs']),
    # The shipped pretrained model (Personalizer.from_pretrained()): weights, config and model card.
    package_data={'idenc_jax': ['pretrained/*/*']},
    python_requires='>=3.11',
    install_requires=requirements,
)
