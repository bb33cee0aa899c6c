"""The project's configs (`configs/base.py`), installed with the package so that `--config=configs/base.py`
and `from configs.base import get_config` work from a checkout and after `pip install .` alike."""
