"""The one way every command line of idenc_jax gets its config: absl flags with ml_collections.

  from idenc_jax import cli
  _CONFIG = cli.define_config_flag()
  ...
  if __name__ == '__main__':
    cli.run(main)

`--config=configs/base.py[:variant]` names the config file; `--config.section.field=value` overrides a
field. The path is read relative to the working directory, and a `configs/...` path that is not there
is taken from the installed `configs` package, so the same command works from a checkout and after
`pip install .`. A misspelt override is a one-line error (fields are locked). `apply_overrides` applies
the same `section.field=value` rule to a config in code (the benchmark's levers, the curve's variants).
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

from absl import app, flags
from ml_collections import config_flags

CONFIG_PACKAGE = 'configs'
_CONFIG_FLAGS = {'config'}   # names of the flags define_config_flag made


def installed_configs_dir() -> Path | None:
  """The folder of the importable `configs` package (the checkout's or the installed copy)."""
  spec = importlib.util.find_spec(CONFIG_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  return Path(list(spec.submodule_search_locations)[0])


def resolve_config_path(spec: str) -> str:
  """`configs/base.py:cpu` -> an existing file path with the same `:variant`; other specs unchanged."""
  path, sep, variant = spec.partition(':')
  if os.path.isfile(path) or not path.replace('\\', '/').startswith(CONFIG_PACKAGE + '/'):
    return spec
  folder = installed_configs_dir()
  if folder is None:
    return spec
  candidate = folder / path[len(CONFIG_PACKAGE) + 1:]
  return f'{candidate}{sep}{variant}' if candidate.is_file() else spec


def define_config_flag(name: str = 'config', default: str | None = None, required: bool = True,
                       flag_values: flags.FlagValues = flags.FLAGS):
  """The `--config` flag: a config file (configs/base.py[:variant]) with locked fields."""
  _CONFIG_FLAGS.add(name)
  holder = config_flags.DEFINE_config_file(name, default, 'Config file: configs/base.py[:variant].',
                                           flag_values=flag_values, lock_config=True)
  if required and default is None:
    flags.mark_flag_as_required(name, flag_values)
  return holder


def load_config_file(spec: str):
  """`path[:variant]` -> the ConfigDict its get_config returns (as the --config flag loads it)."""
  path, _, variant = resolve_config_path(spec).partition(':')
  module_spec = importlib.util.spec_from_file_location(f'_idenc_config_{Path(path).stem}', path)
  if module_spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f'config file not found: {path}')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def _rewrite_config_paths(argv: list[str]) -> list[str]:
  names = tuple(f'--{name}=' for name in _CONFIG_FLAGS)
  return [a.split('=', 1)[0] + '=' + resolve_config_path(a.split('=', 1)[1]) if a.startswith(names) else a
          for a in argv]


def unknown_overrides(argv: list[str]) -> list[str]:
  """The `--config.a.b=...` overrides of argv that name no field of the selected config."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return []
  config = load_config_file(spec)
  unknown = []
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    node = config
    for part in arg[len('--config.'):].split('=', 1)[0].split('.'):
      if not hasattr(node, 'keys') or part not in node:
        unknown.append(arg)
        break
      node = node[part]
  return unknown


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with config paths resolved and a one-line message for a misspelt override."""
  argv = _rewrite_config_paths(list(argv))
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    try:
      unknown = unknown_overrides(argv)
    except Exception:  # noqa: BLE001  (the message below still helps)
      unknown = []
    what = (f'no such config field: {", ".join(unknown)}' if unknown else
            f'a --config.* override names no field of the config ({e})')
    sys.stderr.write(f'FATAL Flags parsing error: {what}. Config fields are locked; check the spelling '
                     'against configs/base.py.\n')
    sys.exit(1)


DEBUG_ENV = 'IDENC_DEBUG'


def is_user_error(e: BaseException) -> bool:
  """Errors that bad input causes (a missing or unreadable file, a wrong value, a full disk, a non-finite
  result) and that our code raises with a message that says what to do: shown as one line. Anything else is
  a bug and keeps its traceback."""
  if isinstance(e, (ValueError, OSError, FloatingPointError)):
    return True
  return isinstance(e, RuntimeError) and type(e).__module__.startswith('idenc_jax')


def _drop_late_asyncio_callbacks(unraisable, default):
  """An unraisable-exception hook that drops one known harmless report: when an orbax restore fails (a damaged
  checkpoint), its other reads still in flight in tensorstore's threads finish after orbax closed their asyncio
  loop, and each prints "RuntimeError: Event loop is closed". The restore's own error is what the user needs;
  anything else goes to `default`, the hook in place before."""
  exc = unraisable.exc_value
  if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
    logging.debug('dropped a late asyncio callback after a closed loop (an aborted checkpoint read)')
    return
  default(unraisable)


def one_line_errors(main):
  """main(argv), with a user error printed as one line `FATAL <Type>: <message>` and exit status 1 (the full
  traceback with IDENC_DEBUG=1)."""
  def wrapped(argv):
    if not os.environ.get(DEBUG_ENV):
      sys.unraisablehook = functools.partial(_drop_late_asyncio_callbacks, default=sys.unraisablehook)
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      if os.environ.get(DEBUG_ENV) or not is_user_error(e):
        raise
      message = ' '.join(str(e).split('\n')[0].split())[:600] or repr(e)
      sys.stderr.write(f'FATAL {type(e).__name__}: {message}  ({DEBUG_ENV}=1 shows the traceback)\n')
      # os._exit, not sys.exit: interpreter shutdown would wait on (and hear from) orbax's asyncio threads.
      # Nothing is left to save here (the loop closed its writers already).
      logging.shutdown()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(1)
  return wrapped


def enable_compilation_cache(path: str, min_compile_seconds: float = 1.0) -> str | None:
  """Turns on jax's persistent compilation cache in `path` (config.compilation_cache_dir; '' leaves it off)
  for programs that take at least `min_compile_seconds` to compile. Returns the folder used. A cache the
  environment names (JAX_COMPILATION_CACHE_DIR, as the test suite sets) takes precedence."""
  if not path:
    return None
  import jax   # lazy: the flag parsing above runs without jax
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return jax.config.jax_compilation_cache_dir
  folder = os.path.abspath(os.path.expandvars(os.path.expanduser(path)))
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:   # a read-only home: run without the cache rather than not at all
    logging.warning('Compilation cache %s unavailable (%s); compiling without it.', folder, e)
    return None
  jax.config.update('jax_compilation_cache_dir', folder)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_seconds)
  return folder


def run(main) -> None:
  """absl.app.run(main) with `parse_flags`, user errors as one line (`one_line_errors`)."""
  app.run(one_line_errors(main), flags_parser=parse_flags)


def parse_value(text: Any) -> Any:
  """A Python literal in text ('3', '1e-4', 'True', '(4, 2)'), else the text itself ('bfloat16')."""
  if not isinstance(text, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config, overrides: dict[str, Any]):
  """A locked copy of `config` with each dotted field of `overrides` set (text values via `parse_value`).

  The config's own type rules apply (an int widens to a float field; text does not turn into a
  boolean). An unknown field or a value of the wrong type is a ValueError that names the field.
  """
  out = copy.deepcopy(config)
  out.lock()
  for key, value in overrides.items():
    try:
      out.update_from_flattened_dict({key: parse_value(value)})
    except (KeyError, AttributeError) as e:
      hint = str(e.args[0] if e.args else e).splitlines()[-1]   # ml_collections' 'Did you mean ...?'
      hint = f'; {hint}' if 'Did you mean' in hint else ''
      raise ValueError(f'unknown config field {key!r}{hint}') from None
    except TypeError as e:
      raise ValueError(f'bad value {value!r} for config field {key!r}: {e}') from None
  return out
