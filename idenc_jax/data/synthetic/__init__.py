"""Synthetic identities: procedural face-like images, the embedded default dataset.

So that training runs on a fresh machine with no download. Each identity is a fixed set of appearance
factors and each image varies nuisance factors (factors.py); the renderer draws them as anti-aliased soft
shapes in a head-centred frame (canvas.py, render.py). Image j of identity i is the same pixels whatever else
is rendered, and 'train' and 'test' draw disjoint identities for one seed.

The pixel-based identity oracle that measures identity on these images is a metric, in
`idenc_jax.evaluate.metrics.oracle`.

View a grid: `python -m idenc_jax.data.synthetic --out=grid.png --resolution=64`.
"""

from idenc_jax.data.synthetic.factors import (BEARDS, GLASSES, HAIR_STYLES, HATS, MAX_RESOLUTION,
                                              MIN_RESOLUTION, identity_factors)
from idenc_jax.data.synthetic.render import render_agnostic, render_identities, render_images

__all__ = ['BEARDS', 'GLASSES', 'HAIR_STYLES', 'HATS', 'MAX_RESOLUTION', 'MIN_RESOLUTION', 'identity_factors',
           'render_agnostic', 'render_identities', 'render_images']
