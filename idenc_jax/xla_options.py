"""XLA compiler options named in a config, as 'name=value;name=value' text.

Two fields: `config.train.compiler_options` (the train step and fine-tuning, which run backward passes) and
`config.sample.compiler_options` (every inference call: the encoder, the samplers, the restorer's condition
encoder). They are apart because the best settings can differ: a backward pass has kernel-gradient
convolutions, which on XLA:CPU run several times slower in YNNPACK than in XLA's own form, a forward pass has
none (docs/performance.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

_PLATFORM_PREFIXES = {'cpu': 'xla_cpu_', 'gpu': 'xla_gpu_', 'tpu': 'xla_tpu_'}
PARTS = ('train', 'sample')


def field_name(part: str) -> str:
  if part not in PARTS:
    raise ValueError(f'compiler options belong to one of {PARTS}, not {part!r}.')
  return f'config.{part}.compiler_options'


def parse(text: str, field: str, platform: str | None = None) -> dict[str, Any]:
  """'name=value;name=value' -> {name: value}. 'true' / 'false' become booleans and numbers numbers; anything
  else stays text (enum names). Options of another platform's compiler (xla_cpu_* on a GPU, xla_gpu_* on a
  CPU...) are left out, so one config serves every backend; `platform` defaults to jax's default backend."""
  platform = platform or jax.default_backend()
  foreign = tuple(prefix for name, prefix in _PLATFORM_PREFIXES.items() if name != platform)
  out: dict[str, Any] = {}
  for item in filter(None, (p.strip() for p in text.split(';'))):
    name, sep, value = item.partition('=')
    if not sep or not name.strip():
      raise ValueError(f'{field} entry {item!r} is not name=value.')
    out[name.strip()] = _value(value.strip())
  return {name: value for name, value in out.items() if not name.startswith(foreign)}


def _value(text: str) -> Any:
  if text.lower() in ('true', 'false'):
    return text.lower() == 'true'
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def from_config(config, part: str, extra: dict[str, Any] | None = None,
                platform: str | None = None) -> dict[str, Any] | None:
  """`config.<part>.compiler_options` parsed, with `extra` (a caller's options) over them; None when empty
  (jax's and `Lowered.compile`'s "XLA's defaults")."""
  options = parse(config[part].compiler_options, field_name(part), platform)
  return {**options, **(extra or {})} or None


def compile_lowered(lowered, config, part: str, extra: dict[str, Any] | None = None):
  """`lowered.compile` with `from_config(config, part, extra)`; an option XLA rejects (a misspelt name, a value
  of the wrong kind) is a one-line ValueError naming the field, not XLA's runtime error."""
  options = from_config(config, part, extra)
  try:
    return lowered.compile(options)
  except jax.errors.JaxRuntimeError as e:
    message = str(e).split('\n')[0]
    if options and message.startswith('INVALID_ARGUMENT') and 'option' in message:
      raise ValueError(f'{field_name(part)} / compiler options {sorted(options)}: XLA says {message}') from e
    raise


# Options that change how XLA places and copies buffers, not a computed value: a run continued with or without
# them is the run trained straight through (`experiments.timed_run`'s --extend check).
VALUE_NEUTRAL = ('xla_cpu_copy_insertion_use_region_analysis',)


def same_values(a: str, b: str, field: str) -> bool:
  """Whether two option texts compile the same arithmetic: equal once VALUE_NEUTRAL options are left out.
  As everywhere here, options of another platform's compiler are left out too (a CPU run continued on a GPU
  compares their GPU options only)."""
  def strip(text):
    return {k: v for k, v in parse(text, field).items() if k not in VALUE_NEUTRAL}
  return strip(a) == strip(b)


_CHECKED: set[tuple] = set()


def checked(config, part: str) -> dict[str, Any] | None:
  """`from_config(config, part)`, after XLA has accepted the options once in this process (a one-operation
  function compiled with them), so that a misspelt option fails where the config is read, naming its field,
  and not inside the first `jax.jit` call that carries it."""
  options = from_config(config, part)
  key = tuple(sorted((options or {}).items()))
  if options and key not in _CHECKED:
    compile_lowered(jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)), config, part)
    _CHECKED.add(key)
  return options
