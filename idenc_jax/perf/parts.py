"""`python -m idenc_jax.perf.parts`: the networks and their residual blocks timed alone, jax against PyTorch.

  python -m idenc_jax.perf.parts --config=configs/base.py --config.model.mlp_ratio=0 --config.train.batch_size=4 \
      --parts=generator,encoder,encoder.down_0_0,generator.up_0_0

A whole-step ratio says how far apart the two frameworks are, not where. This times the forward and backward
pass of `sum(out^2)` (gradients of every parameter, and of the generator's identity embedding or of a block's
input; a generator block's timestep and identity vectors are held fixed) for each named part, at the train
step's batch (`train.batch_size` images), on both sides with the same weights (PyTorch's `perf.torch_model`
with ours copied in), in turns (one call of every part per round, the median over rounds). A part is
`generator`, `encoder`, or `generator.<block>` / `encoder.<block>` for one residual block (its flax name, e.g.
`encoder.down_0_0`; its input shape is the one it sees in the network). Before timing, each part's output and
input gradient are compared with PyTorch's; a part that differs by more than MAX_REL_ERR stops the run.
Random weights and inputs: the cost of a pass does not depend on them. Compiled with the config's
`train.compiler_options`, as the train step is. Prints a table and one JSON line.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

from absl import app, flags
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np

from idenc_jax import cli, models
from idenc_jax.models import layers
from idenc_jax.perf import fixtures, levers, measure, torch_model, torch_reference
from idenc_jax.train import step as step_lib

NETWORKS = ('generator', 'encoder')
MAX_REL_ERR = 1e-4   # float32, two frameworks summing in different orders: about 1e-6 at the paper's sizes


def _torch_blocks(tm, network: str) -> dict[str, Any]:
  """{flax name: PyTorch ResBlock} of one network."""
  prefix = {'generator': 'generator.blocks.', 'encoder': 'encoder.trunk.'}[network]
  return {name[len(prefix):]: m for name, m in tm.named_modules()
          if name.startswith(prefix) and '.' not in name[len(prefix):] and type(m).__name__ == 'ResBlock'}


def block_input_shapes(config, tm, network: str, batch: int) -> dict[str, tuple[int, ...]]:
  """{block name: its NCHW input shape at `batch` images}, recorded by hooks on one PyTorch forward pass."""
  torch = torch_reference.torch_with_threads(None)
  r, shapes = config.model.resolution, {}

  def record(name):
    def hook(module, args, out):   # returns None: a hook's return value would replace the block's output
      shapes.setdefault(name, tuple(args[0].shape))
    return hook

  hooks = [m.register_forward_hook(record(n)) for n, m in _torch_blocks(tm, network).items()]
  with torch.no_grad():
    x = torch.zeros(1, 3, r, r)
    if network == 'generator':
      tm.generator(x, torch.zeros(1, dtype=torch.long), torch.zeros(1, config.model.embed_dim))
    else:
      tm.encoder(x)
  for h in hooks:
    h.remove()
  return {n: (batch,) + s[1:] for n, s in shapes.items()}


def check_part_names(names: list[str], known_blocks: dict[str, list[str]]) -> None:
  """A misspelt part is a one-line error naming the choices, before anything compiles."""
  for name in names:
    network, _, block = name.partition('.')
    if network not in NETWORKS or (block and block not in known_blocks[network]):
      choices = list(NETWORKS) + [f'{n}.{b}' for n in NETWORKS for b in known_blocks[n]]
      raise ValueError(f'unknown part {name!r}; choose from {", ".join(choices)}.')


def _jax_block(config, network: str, out_channels: int, resample: str) -> layers.ResBlock:
  """A ResBlock with the network's own model levers (group norm, sums, small convolutions, kernel gradients)."""
  net = models.build_generator(config) if network == 'generator' else models.build_encoder(config)
  return layers.ResBlock(out_channels, net.num_groups, 0.0, resample, net.dtype, True, conv_grad=net.conv_grad,
                         group_norm=net.group_norm, small_conv=net.small_conv, channel_sums=net.channel_sums)


def build_parts(config, names: list[str], seed: int = 0) -> dict[str, dict[str, Any]]:
  """{part: {'jax', 'torch': the timed calls; 'jax_out', 'torch_out': the outputs (NHWC numpy); for parts with a
  differentiable input (the generator's embedding, a block's input), 'jax_input_grad', 'torch_input_grad'}}."""
  torch = torch_reference.torch_with_threads(None)
  params = fixtures.model_params(config, seed)
  tm = torch_model.build(config)
  torch_model.load_flax_params(tm, params)
  tm.train()
  known = {n: sorted(_torch_blocks(tm, n)) for n in NETWORKS}
  check_part_names(names, known)
  rng = np.random.default_rng(seed)
  b, r = config.train.batch_size, config.model.resolution
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))
  nhwc = lambda t: np.transpose(t.detach().numpy(), (0, 2, 3, 1))
  x = rng.standard_normal((b, r, r, 3)).astype(np.float32)
  xt = nchw(x)
  shapes = {n: block_input_shapes(config, tm, n, b) for n in NETWORKS if any(p.startswith(f'{n}.') for p in names)}
  parts = {}
  for name in names:
    network, _, block = name.partition('.')
    if not block and network == 'generator':
      gen = models.build_generator(config)
      t = rng.integers(0, config.diffusion.timesteps, b).astype(np.int32)
      z = rng.standard_normal((b, config.model.embed_dim)).astype(np.float32)
      fwd = lambda p, z, gen=gen, t=t: gen.apply({'params': p}, x, t, z, train=True,
                                                rngs={'dropout': jax.random.key(0)})
      jax_args = (params['generator'], z)
      tt, zt = torch.from_numpy(t).long(), torch.from_numpy(z).requires_grad_(True)
      module, torch_fwd, torch_in = tm.generator, (lambda m=tm.generator, tt=tt, zt=zt: m(xt, tt, zt)), [zt]
    elif not block:
      enc = models.build_encoder(config)
      fwd = lambda p, enc=enc: enc.apply({'params': p}, x)
      jax_args = (params['encoder'],)
      module, torch_fwd, torch_in = tm.encoder, (lambda m=tm.encoder: m(xt)), []
    else:
      module = _torch_blocks(tm, network)[block]
      shape = shapes[network][block]
      h = rng.standard_normal((shape[0], shape[2], shape[3], shape[1])).astype(np.float32)
      jb = _jax_block(config, network, module.conv_0.out_channels, module.resample)
      p = params['generator'][block] if network == 'generator' else params['encoder']['trunk'][block]
      extra = {}
      if module.emb_proj is not None:
        extra['emb'] = rng.standard_normal((b, module.emb_proj.in_features)).astype(np.float32)
      if module.cond_proj is not None:
        extra['cond'] = rng.standard_normal((b, module.cond_proj.in_features)).astype(np.float32)
      fwd = lambda p, h, jb=jb, extra=extra: jb.apply({'params': p}, h, **extra)
      jax_args = (p, h)
      ht = nchw(h).requires_grad_(True)
      extra_t = {k: torch.from_numpy(v) for k, v in extra.items()}
      torch_fwd, torch_in = (lambda m=module, ht=ht, e=extra_t: m(ht, **e)), [ht]
    jax_args = jax.device_put(jax_args)   # on the device once, not converted again at every timed call
    loss = lambda *a, fwd=fwd: jnp.sum(fwd(*a) ** 2)
    grad = step_lib.compile_with_options(
        jax.jit(jax.grad(loss, tuple(range(len(jax_args))))).lower(*jax_args), config)

    def torch_step(module=module, torch_fwd=torch_fwd, torch_in=torch_in):
      module.zero_grad(set_to_none=True)
      for t_ in torch_in:
        t_.grad = None
      (torch_fwd() ** 2).sum().backward()

    def torch_out(torch_fwd=torch_fwd):
      with torch.no_grad():
        out = torch_fwd()
      return nhwc(out) if out.ndim == 4 else out.numpy()

    def torch_input_grad(torch_step=torch_step, torch_in=torch_in):
      torch_step()
      g = torch_in[0].grad
      return nhwc(g) if g.ndim == 4 else g.numpy()

    parts[name] = {'jax': lambda grad=grad, a=jax_args: jax.block_until_ready(grad(*a)), 'torch': torch_step,
                   'jax_out': lambda fwd=fwd, a=jax_args: np.asarray(jax.jit(fwd)(*a)), 'torch_out': torch_out}
    if torch_in:   # the gradient of the embedding / block input, the second of the jax gradients
      parts[name].update(jax_input_grad=lambda grad=grad, a=jax_args: np.asarray(grad(*a)[1]),
                         torch_input_grad=torch_input_grad)
  return parts


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def bench(config, names: list[str], rounds: int) -> dict[str, Any]:
  """{'parts': [{'part', 'jax_ms', 'torch_ms', 'torch_over_jax', 'max_rel_err_vs_torch'}], ...}."""
  parts = build_parts(config, names)
  errors = {}
  for n, p in parts.items():
    errors[n] = _max_rel(p['jax_out'](), p['torch_out']())
    if 'jax_input_grad' in p:
      errors[n] = max(errors[n], _max_rel(p['jax_input_grad'](), p['torch_input_grad']()))
    if not errors[n] <= MAX_REL_ERR:
      raise ValueError(f'part {n}: jax and PyTorch differ by {errors[n]:.2e} (relative, output or input gradient), '
                       f'more than {MAX_REL_ERR:g}: not the same function, so not timed.')
  runs: dict[str, Callable[[], Any]] = {f'{side}:{n}': p[side] for n, p in parts.items() for side in ('jax', 'torch')}
  for fn in runs.values():   # compile-time and first-call allocations outside the timed rounds
    fn()
  times = {k: [] for k in runs}
  for i in range(rounds):
    for k, fn in runs.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
    print(f'[parts] round {i + 1}/{rounds} done', file=sys.stderr, flush=True)
  med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
  records = [{'part': n, 'jax_ms': med[f'jax:{n}'], 'torch_ms': med[f'torch:{n}'],
              'torch_over_jax': med[f'torch:{n}'] / med[f'jax:{n}'],
              'max_rel_err_vs_torch': errors[n]}   # the output's and, where there is one, the input gradient's
             for n in names]
  return {'host': measure.host_info(), 'batch_size': config.train.batch_size, 'rounds': rounds,
          'statistic': 'median', 'compiler_options': config.train.compiler_options, 'parts': records}


def format_table(result: dict[str, Any]) -> str:
  lines = ['| part (forward + backward) | jax ms | PyTorch ms | PyTorch / jax | max rel. error |',
           '| --- | --- | --- | --- | --- |']
  for r in result['parts']:
    lines.append(f"| {r['part']} | {r['jax_ms']:.1f} | {r['torch_ms']:.1f} | {r['torch_over_jax']:.2f} | "
                 f"{r['max_rel_err_vs_torch']:.1e} |")
  return '\n'.join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  where = {'flag_values': flag_values}
  cli.define_config_flag(default='configs/base.py', required=False, flag_values=flag_values)
  flags.DEFINE_list('parts', ['generator', 'encoder'], 'parts to time: generator, encoder, or '
                    'generator.<block> / encoder.<block> (a residual block by its flax name)', **where)
  flags.DEFINE_string('variant', '', "levers as in the benchmark, e.g. 'ynnoff'", **where)
  flags.DEFINE_integer('rounds', 5, 'timed rounds (one call of every part on each side per round)', **where)
  flags.DEFINE_string('json_out', '', 'also write the JSON record here', **where)


def run_from_flags(f: flags.FlagValues) -> dict[str, Any]:
  try:   # a misspelt lever or field fails before anything is built
    config = levers.variant_config(f.config, f.variant)
  except ValueError as e:
    sys.exit(f'FATAL {e}')
  result = bench(config, list(f.parts), f.rounds)
  result.update(config=config_flags.get_config_filename(f['config']), variant=f.variant,
                overrides=[a for a in sys.argv[1:] if a.startswith('--config.')],
                allocator='tcmalloc' if 'tcmalloc' in os.environ.get('LD_PRELOAD', '') else 'default')
  measure.emit(result, format_table(result), f.json_out)
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
