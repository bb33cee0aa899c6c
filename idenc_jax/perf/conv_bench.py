"""`python -m idenc_jax.perf.conv_bench`: one 3x3 convolution's three pieces timed alone, XLA against PyTorch.

  python -m idenc_jax.perf.conv_bench --shapes=4x128x128x128,32x32x16x16 --options=default,ynnoff

A train step's convolutions are three computations each: the forward pass, the input gradient (dx) and the
kernel gradient (dw). This times each alone, in turns (one call of every piece per round, the median over
rounds), for the named XLA:CPU option sets (`perf.levers`' compiler options: `default` is XLA's own,
`ynnoff` turns YNNPACK's fusions off, `ynnconv` / `xnnconv` / `onednnconv` hand convolutions to a library)
and for PyTorch (`torch.nn.functional.conv2d` and `torch.nn.grad`, NCHW as PyTorch prefers), so a whole-step
gap can be traced to the piece that makes it. Before timing, every jax piece is checked against PyTorch's
(the same function: relative error printed); `tests/test_conv_bench.py` checks the pieces against numpy.
A shape is BxHxCinxCout (square maps, stride 1, 'SAME' padding). Prints a table and one JSON line.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from idenc_jax import cli
from idenc_jax.perf import levers, measure, torch_reference
from idenc_jax.train import step as step_lib

PIECES = ('fwd', 'dx', 'dw')


def parse_shape(text: str) -> tuple[int, int, int, int]:
  """'4x128x128x128' -> (B, H, Cin, Cout)."""
  parts = text.lower().split('x')
  if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f'a shape is BxHxCinxCout with positive whole numbers, e.g. 4x128x128x128; got {text!r}.')
  return tuple(int(p) for p in parts)


def option_config(name: str) -> ml_collections.ConfigDict:
  """A config holding a lever's `train.compiler_options` ('default': none), which the pieces compile with
  exactly as the train step would."""
  lever = {'train.compiler_options': ''} if name == 'default' else levers.LEVERS.get(name, {})
  if 'train.compiler_options' not in lever:
    names = ['default'] + sorted(k for k, v in levers.LEVERS.items() if 'train.compiler_options' in v)
    raise ValueError(f'unknown option set {name!r}; choose from {names}.')
  return ml_collections.ConfigDict({'train': {'compiler_options': lever['train.compiler_options']}})


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def jax_pieces(x, w, dy, options: ml_collections.ConfigDict) -> dict[str, Callable[[], Any]]:
  """The forward pass, dx and dw of one convolution, each compiled alone with `options` (`option_config`)."""
  linear = lambda x, w: jnp.vdot(_conv(x, w), dy)   # its gradients are exactly the two backward convolutions
  fns = {'fwd': (_conv, (x, w)), 'dx': (jax.grad(linear, 0), (x, w)), 'dw': (jax.grad(linear, 1), (x, w))}
  out = {}
  for piece, (fn, args) in fns.items():
    compiled = step_lib.compile_with_options(jax.jit(fn).lower(*args), options)
    out[piece] = (lambda c=compiled, a=args: c(*a))
  return out


def torch_pieces(x, w, dy, threads: int | None = None) -> dict[str, Callable[[], Any]]:
  """PyTorch's forward, dx and dw of the same convolution on NCHW copies of the same arrays."""
  torch = torch_reference.torch_with_threads(threads)
  xt = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
  wt = torch.from_numpy(np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1))))
  dyt = torch.from_numpy(np.ascontiguousarray(np.transpose(dy, (0, 3, 1, 2))))
  return {'fwd': lambda: torch.nn.functional.conv2d(xt, wt, padding=1),   # no tensor requires grad
          'dx': lambda: torch.nn.grad.conv2d_input(xt.shape, wt, dyt, padding=1),
          'dw': lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, dyt, padding=1)}


def torch_to_nhwc(piece: str, value) -> np.ndarray:
  """A PyTorch piece's output in the jax layout (NHWC activations, HWIO kernels)."""
  return np.transpose(value.numpy(), (2, 3, 1, 0) if piece == 'dw' else (0, 2, 3, 1))


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def bench_shape(shape: tuple[int, int, int, int], option_names: list[str], rounds: int, reference: str,
                threads: int | None = None) -> dict[str, Any]:
  """{'shape', 'ms': {'<options>_<piece>' or 'torch_<piece>': median ms}, 'max_rel_err_vs_torch'}."""
  b, h, cin, cout = shape
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, h, h, cin), np.float32)
  w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
  dy = rng.standard_normal((b, h, h, cout), np.float32)
  runs = {f'{name}_{piece}': fn for name in option_names
          for piece, fn in jax_pieces(jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy), option_config(name)).items()}
  record: dict[str, Any] = {'shape': list(shape)}
  if reference == 'torch':
    tp = torch_pieces(x, w, dy, threads)
    expected = {piece: torch_to_nhwc(piece, fn()) for piece, fn in tp.items()}
    record['max_rel_err_vs_torch'] = max(_max_rel(np.asarray(fn()), expected[key.rsplit('_', 1)[1]])
                                         for key, fn in runs.items())
    runs.update({f'torch_{piece}': fn for piece, fn in tp.items()})
  for fn in runs.values():   # warm-up (and compile-time allocations) outside the timed rounds
    jax.block_until_ready(fn())
  times = {key: [] for key in runs}
  for _ in range(rounds):   # in turns, so that a drifting machine slows every piece alike
    for key, fn in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[key].append(time.perf_counter() - t0)
  record['ms'] = {key: 1e3 * float(np.median(t)) for key, t in times.items()}
  return record


def format_table(records: list[dict[str, Any]], option_names: list[str], reference: str) -> str:
  sides = option_names + (['torch'] if reference else [])
  head = ['shape B x H x Cin x Cout'] + [f'{s} {p} ms' for s in sides for p in PIECES]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for r in records:
    cells = ['x'.join(map(str, r['shape']))] + [f'{r["ms"][f"{s}_{p}"]:.2f}' for s in sides for p in PIECES]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  where = {'flag_values': flag_values}
  flags.DEFINE_list('shapes', ['32x32x16x16', '32x16x32x32', '4x128x128x128', '4x64x256x256'],
                    'BxHxCinxCout of each convolution (the `cpu` model at batch 16 with guidance, the paper '
                    'model at batch 4)', **where)
  flags.DEFINE_list('options', ['default', 'ynnoff'], 'XLA option sets: default or a compiler-option lever',
                    **where)
  flags.DEFINE_integer('rounds', 10, 'timed rounds (one call of every piece each)', **where)
  flags.DEFINE_enum('reference', 'torch', ['', 'torch'], 'also time (and check against) PyTorch', **where)
  flags.DEFINE_integer('threads', 0, "PyTorch's threads (0: every core, as XLA:CPU uses)", **where)
  flags.DEFINE_string('json_out', '', 'also write the JSON record here', **where)


def run_from_flags(f: flags.FlagValues) -> dict[str, Any]:
  """Times the shapes of the parsed flags `f`; prints the table and the JSON line, returns the record."""
  shapes = [parse_shape(s) for s in f.shapes]
  for name in f.options:
    option_config(name)   # a misspelt option set fails before anything compiles
  records = []
  for shape in shapes:
    records.append(bench_shape(shape, f.options, f.rounds, f.reference, f.threads or None))
    print(f'[conv_bench] {records[-1]}', flush=True)
  result = {'host': measure.host_info(), 'rounds': f.rounds, 'statistic': 'median', 'records': records}
  measure.emit(result, format_table(records, f.options, f.reference), f.json_out)
  return result


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run_from_flags(flags.FLAGS)


def console_main() -> None:
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  console_main()
