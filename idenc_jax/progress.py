"""Progress bars (tqdm) for the long host-side loops: dataset preparation, evaluation, sampling, sweeps.

  for chunk in progress.bar(chunks, desc='sampling', unit='img', total=n): ...

Bars go to stderr with rate and ETA. They show when stderr is a terminal; IDENC_PROGRESS=1 shows them in
logs too (one line per update, at most every 10 s), IDENC_PROGRESS=0 hides them.

A loop inside `jax.lax.scan` (e.g. the fine-tuning steps) drives a bar from the device with
`jax.debug.callback(progress.advance, name)`: each call advances the bar opened with `progress.bar(...,
name=name)`, or does nothing when none is open, so the jitted function stays the same with or without a bar.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import tqdm

_OPEN: dict[str, tqdm.tqdm] = {}


def enabled() -> bool:
  """IDENC_PROGRESS=1 / 0 force the bars on / off; otherwise they show on a terminal only."""
  flag = os.environ.get('IDENC_PROGRESS', '').strip()
  if flag in ('0', '1'):
    return flag == '1'
  return sys.stderr.isatty()


class _Bar(tqdm.tqdm):
  """tqdm whose `with` block also registers it under a name for `advance`."""

  def __init__(self, *args, name: str | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    self._name = name
    if name is not None:
      _OPEN[name] = self

  def close(self):
    if self._name is not None and _OPEN.get(self._name) is self:
      del _OPEN[self._name]
    super().close()


def bar(iterable: Iterable | None = None, *, desc: str, unit: str = 'it', total: float | None = None,
        name: str | None = None, **kwargs: Any) -> _Bar:
  """A tqdm bar on stderr (disabled per `enabled()`); iterate it or call `.update(n)`, close it (or use it as
  a context manager). `name` registers it for `advance`."""
  tty = sys.stderr.isatty()
  return _Bar(iterable, desc=desc, unit=unit, total=total, name=name, file=sys.stderr, disable=not enabled(),
              dynamic_ncols=tty, mininterval=0.1 if tty else 10.0, leave=True, **kwargs)


def advance(name: str, n: int = 1) -> None:
  """Advances the bar opened under `name` by n (no-op when none is open). Safe as a jax.debug.callback."""
  b = _OPEN.get(str(name))
  if b is not None:
    b.update(int(n))


@contextlib.contextmanager
def task(desc: str, total: int, *, unit: str = 'it', name: str | None = None) -> Iterator[_Bar]:
  """`with progress.task('fine-tuning', steps, name='finetune') as b:` ... the bar closes on exit."""
  b = bar(desc=desc, unit=unit, total=total, name=name)
  try:
    yield b
  finally:
    b.close()
