"""Where `prepare` builds a dataset: a hidden staging folder beside the output, swapped into place when complete,
so the output only ever appears whole; and the removal of the staging folders that killed runs left behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # alive, another user's
    return True
  return True


def remove_stale(output: Path, log: Callable[[str], None]) -> None:
  """Removes the staging (`.NAME.partial-PID`) and swap (`.NAME.old-PID`) folders that a killed prepare of the
  same output left behind; those of a live process stay."""
  for path in output.parent.glob(f'.{output.name}.*-*'):
    kind, _, pid = path.name[len(output.name) + 2:].rpartition('-')
    if kind in ('partial', 'old') and pid.isdigit() and not _pid_alive(int(pid)):
      shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
      log(f'Removed {path.name}, left by an interrupted prepare (process {pid}).')


def new_staging_dir(output: Path, log: Callable[[str], None]) -> Path:
  """A fresh, empty `.NAME.partial-PID` folder beside `output` (created with its parent), stale ones removed."""
  output.parent.mkdir(parents=True, exist_ok=True)
  remove_stale(output, log)
  tmp = output.parent / f'.{output.name}.partial-{os.getpid()}'
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir()
  return tmp


def swap_into_place(tmp: Path, output: Path, overwrite: bool) -> None:
  """Renames the complete staging folder to `output`, replacing an existing one only with `overwrite`."""
  if not output.exists():
    os.rename(tmp, output)
    return
  if not overwrite:
    raise FileExistsError(f'{output} appeared while preparing; not overwriting it.')
  trash = output.parent / f'.{output.name}.old-{os.getpid()}'
  os.rename(output, trash)
  os.rename(tmp, output)
  shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
