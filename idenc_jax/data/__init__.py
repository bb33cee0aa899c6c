"""Data: the image conventions (images.py), the prepared-dataset format (records.py) and its preparation
(prepare.py, layouts.py), sources and the grain pipeline (sources.py, pipeline.py), synthetic identities
(synthetic/), face alignment (align.py), degradations for stage 2 (degrade.py) and the input-pipeline
benchmark (throughput.py).

Nothing is imported here, so that e.g. `idenc_jax.data.align` works without grain installed.
"""
