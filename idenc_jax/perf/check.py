"""Correctness on a device: each variant's fixed-batch loss and gradient norm against the CPU's float32
values, and a few real train steps that must stay finite (`python -m idenc_jax.perf.benchmark --check`).

The CPU reference runs in a subprocess with JAX_PLATFORMS=cpu beside the device's own computations (a
process sees either the accelerator or the CPU as its default device). Parameters and batches come
from numpy and threefry, so both sides compute the same function of the same inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from idenc_jax.perf import fixtures, levers, measure
from idenc_jax.train import state as state_lib
from idenc_jax.train import step as step_lib

CHECK_TOLERANCES = {'float32': (1e-4, 1e-3), 'bfloat16': (2e-2, 5e-2)}   # relative: (loss, grad norm)
REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARK = (sys.executable, '-m', 'idenc_jax.perf.benchmark')


def subprocess_env(**extra: str) -> dict[str, str]:
  """The environment of a benchmark subprocess: this one's, with the repository on PYTHONPATH (so that
  `-m idenc_jax.perf.benchmark` and the configs import from any working directory), plus `extra`."""
  path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')]))
  return dict(os.environ, PYTHONPATH=path, **extra)


def reference_values(config, compiler_options: dict | None = None) -> dict[str, float]:
  """`fixed_batch_loss` in float32 at the highest matmul/conv precision (no TF32 on GPUs)."""
  previous = getattr(jax.config, 'jax_default_matmul_precision', None)
  jax.config.update('jax_default_matmul_precision', 'highest')
  try:
    return fixtures.fixed_batch_loss(config, compiler_options=compiler_options)
  finally:
    jax.config.update('jax_default_matmul_precision', previous)


def cpu_reference_process(config_spec: str, overrides: Sequence[str], out_path: str,
                          fast_compile: bool = False) -> subprocess.Popen:
  """Starts the float32 reference of `--config=config_spec` with the `--config.*` arguments `overrides`
  on the CPU in a subprocess (it runs beside the device); it writes its values to out_path."""
  cmd = [*BENCHMARK, f'--config={config_spec}', *overrides, '--reference_loss', f'--json_out={out_path}']
  cmd += ['--fast_compile'] * fast_compile
  env = subprocess_env(JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_steps_finite(config, steps: int = 3, compiler_options: dict | None = None) -> dict[str, Any]:
  """`steps` train steps from a real initialisation on synthetic batches: losses and the step counter."""
  state = jax.jit(lambda k: state_lib.create_train_state(config, k))(jax.random.key(config.seed))
  optimizer = state_lib.make_optimizer(config, state.params)
  batch = fixtures.synthetic_batch(config)
  step = jax.jit(step_lib.make_train_step(config, optimizer), donate_argnums=(0,)).lower(
      state, batch).compile(compiler_options)
  losses_seen = []
  for i in range(steps):
    state, metrics = step(state, fixtures.synthetic_batch(config, seed=i))
    losses_seen.append(float(metrics['loss']))
  finite = bool(np.all(np.isfinite(losses_seen))) and int(state.step) == steps
  return {'losses': losses_seen, 'final_step': int(state.step), 'pass': finite}


def run_check(config, config_spec: str, overrides: Sequence[str], variants: Sequence[str], steps: int = 3,
              log: Callable[[str], None] = lambda s: None, fast_compile: bool = False) -> dict[str, Any]:
  """The device's fixed-batch loss and gradient norm per variant of `config` against the CPU's float32
  values (within the variant dtype's CHECK_TOLERANCES), plus `steps` finite train steps of the first.

  config_spec and overrides (`--config.*` arguments) give `config` again in the reference subprocess.
  """
  configs = {v: levers.variant_config(config, v) for v in variants}   # a misspelt lever fails here
  with tempfile.TemporaryDirectory() as tmp:
    ref_path = os.path.join(tmp, 'reference.json')
    proc = cpu_reference_process(config_spec, overrides, ref_path, fast_compile)
    options = measure.FAST_COMPILE if fast_compile else None
    result: dict[str, Any] = {'device': measure.device_name(), 'host': measure.host_info(),
                              'config': config_spec, 'overrides': list(overrides), 'variants': {}}
    for index, (v, variant) in enumerate(configs.items()):
      rec: dict[str, Any] = {}
      log(f'check {v}: started')
      try:
        rec.update(reference_values(variant, options) if variant.model.dtype == 'float32'
                   else fixtures.fixed_batch_loss(variant, compiler_options=options))
        if index == 0:
          rec['train_steps'] = train_steps_finite(variant, steps, options)
      except Exception as e:  # pylint: disable=broad-except  (report, go on with the next variant)
        rec['error'] = f'{type(e).__name__}: {e}'
      result['variants'][v] = rec
      log(f'check {v}: {rec}')
    _, stderr = proc.communicate(timeout=600)
    if proc.returncode or not os.path.exists(ref_path):
      raise RuntimeError(f'the CPU reference failed (exit {proc.returncode}): {stderr[-2000:]}')
    with open(ref_path) as f:
      ref = json.load(f)
  result['cpu_reference'] = ref
  ok = True
  for v, rec in result['variants'].items():
    if 'error' in rec:
      ok = rec['pass'] = False
      continue
    tol_loss, tol_grad = CHECK_TOLERANCES[configs[v].model.dtype]
    rec['loss_rel_err'] = abs(rec['loss'] - ref['loss']) / abs(ref['loss'])
    rec['grad_norm_rel_err'] = abs(rec['grad_norm'] - ref['grad_norm']) / abs(ref['grad_norm'])
    rec['tolerance'] = [tol_loss, tol_grad]
    rec['pass'] = (rec['loss_rel_err'] <= tol_loss and rec['grad_norm_rel_err'] <= tol_grad
                   and rec.get('train_steps', {'pass': True})['pass'])
    ok = ok and rec['pass']
  result['pass'] = ok
  return result


def format_check(result: dict) -> str:
  """The check's result as a few lines: one per variant with its errors against the CPU and pass/FAIL."""
  ref = result['cpu_reference']
  lines = [f'correctness on {result["device"]} ({result["config"]}); CPU float32 loss {ref["loss"]:.6f}, '
           f'grad norm {ref["grad_norm"]:.6f}']
  for v, rec in result['variants'].items():
    if 'error' in rec:
      lines.append(f'  {v:<14} FAILED: {rec["error"][:100]}')
      continue
    steps = rec.get('train_steps')
    stepped = f', steps {["%.4f" % x for x in steps["losses"]]}' if steps else ''
    lines.append(f'  {v:<14} loss {rec["loss"]:.6f} (rel err {rec["loss_rel_err"]:.1e}), grad norm rel err '
                 f'{rec["grad_norm_rel_err"]:.1e}, tol {rec["tolerance"]}{stepped}: '
                 f'{"pass" if rec["pass"] else "FAIL"}')
  return '\n'.join(lines)
