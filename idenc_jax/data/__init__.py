"""Data: preparation (prepare.py), sources (sources.py), the grain pipeline (pipeline.py), synthetic
identities (synthetic.py), face alignment (align.py) and the pipeline benchmark (benchmark.py).

Nothing is imported here, so that e.g. `idenc_jax.data.align` works without grain installed.
"""
