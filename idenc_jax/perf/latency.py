"""`python -m idenc_jax.perf.latency`: the personalization latency a user feels, against PyTorch.

  python -m idenc_jax.perf.latency --config=configs/base.py:cpu --images=8 --steps=25 --reference=torch

Times the whole path of the Python API, uint8 reference photos -> `Personalizer.embed` -> `Personalizer.generate`
(DDIM with the config's identity guidance and start timestep) -> uint8 images: the first call (compilation
included: what the first personalization of a session costs) and warm calls (the median of --repeats), with
the embedding and the generation timed apart. With --reference=torch the same path runs in PyTorch on the
same models (`perf.torch_model`, our weights copied in), in turns with ours: the encoder on the references,
their mean, then `torch_ddim` (the same DDIM steps, guidance as one call on the doubled batch, the same
clipping), so the ratio compares like with like (`tests/test_latency.py` checks that both produce the same
images). Parameters are random (`perf.fixtures`: the cost of a step does not depend on them) unless
--workdir names a trained run. --variants times several variants of the config in the same turns (levers of
`perf.levers`, e.g. the sampling compiler options: `--variants=sampleynnon,sampleynnreduce,sampleynnoff`);
the first is reported as `jax`, all of them under `variants` with their speed-up over the first. Prints a
table and, as its last line, one JSON object.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags

from idenc_jax import cli
from idenc_jax.data import images as images_lib
from idenc_jax.diffusion import guidance as guidance_lib, samplers, schedules
from idenc_jax.perf import fixtures, levers, measure, torch_model, torch_reference
from idenc_jax.personalize.personalizer import Personalizer, load_workdir_params


def ddim_tables(config, steps: int) -> dict[str, np.ndarray]:
  """The deterministic DDIM sampler's per-step numbers, as `samplers.ddim_sample` computes them (eta = 0):
  timesteps ts, x0 = r x - rm1 eps, x_next = a_next x0 + d eps."""
  schedule = schedules.from_config(config)
  start_t = samplers.check_start_t(config.diffusion.sample_start_t, schedule.timesteps)
  ts = samplers.timestep_subsequence(schedule, steps, 'uniform', start_t)
  _, _, ab_next, om_next = samplers.respaced(schedule, ts)
  return {'ts': np.asarray(ts), 'r': np.asarray(schedule.sqrt_recip_alphas_cumprod)[ts],
          'rm1': np.asarray(schedule.sqrt_recipm1_alphas_cumprod)[ts], 'a_next': np.sqrt(np.asarray(ab_next)),
          'd': np.sqrt(np.maximum(np.asarray(om_next), 0.0))}


def torch_ddim(generator, tables: dict[str, np.ndarray], z, x_T, guidance: float):
  """`generate.generate` with the ddim sampler (eta = 0, clipped x0) in PyTorch: z [D], x_T [N, 3, R, R] ->
  images [N, 3, R, R] in [-1, 1]. Guidance w != 1 is one generator call per step on [x; x], the second half
  without identity, as `diffusion.guidance`."""
  torch = torch_reference._torch()
  w = guidance_lib.check_guidance(guidance)
  n = x_T.shape[0]
  x = x_T
  zb = z[None].expand(n if w == 1.0 else 2 * n, -1)
  null = None if w == 1.0 else torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
  with torch.no_grad():
    for t, r, rm1, a_next, d in zip(*(tables[k].tolist() for k in ('ts', 'r', 'rm1', 'a_next', 'd'))):
      if w == 1.0:
        eps = generator(x, torch.full((n,), t), zb)
      else:
        out = generator(torch.cat([x, x]), torch.full((2 * n,), t), zb, null)
        eps = out[n:] + w * (out[:n] - out[n:])
      x0 = (r * x - rm1 * eps).clamp(-1.0, 1.0)
      eps = (r * x - x0) / rm1
      x = a_next * x0 + d * eps
  return x.clamp(-1.0, 1.0)


class TorchPersonalizer:
  """The PyTorch twin of `Personalizer.embed` + `generate` (ddim): uint8 references -> uint8 images."""

  def __init__(self, config, params: dict, threads: int | None = None):
    torch_reference.check_supported(config)
    torch = torch_reference.torch_with_threads(threads)
    self.torch, self.config = torch, config
    self.models = torch_model.build(config)
    torch_model.load_flax_params(self.models, params)
    self.models.eval()

  def embed(self, refs: np.ndarray):
    x = self.torch.from_numpy(np.ascontiguousarray(images_lib.to_float(refs).transpose(0, 3, 1, 2)))
    with self.torch.no_grad():
      return self.models.encoder(x).mean(0)

  def generate(self, z, num: int, *, sampler: str = 'ddim', steps: int = 25, seed: int = 0) -> np.ndarray:
    if sampler != 'ddim':
      raise ValueError(f'The PyTorch twin samples with ddim only, got {sampler!r}.')
    r = self.config.model.resolution
    x_T = self.torch.randn(num, 3, r, r, generator=self.torch.Generator().manual_seed(seed))
    out = torch_ddim(self.models.generator, ddim_tables(self.config, steps), z, x_T, self.config.sample.guidance)
    return images_lib.to_uint8(out.numpy().transpose(0, 2, 3, 1))


def _timed(fn) -> tuple[Any, float]:
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def measure_latency(config, *, images: int = 8, steps: int = 25, references: int = 4, repeats: int = 3,
                    reference: str = '', params: dict | None = None, variants: Sequence[str] = ('',),
                    log=lambda s: None) -> dict[str, Any]:
  """Warm and first-call latency of embed + generate for ours (and PyTorch's with reference='torch'); each
  of `variants` (levers; '' or 'config': the config as given) is one of ours, all timed in the same turns."""
  if images < 1 or steps < 1 or references < 1 or repeats < 1:
    raise ValueError(f'images, steps, references and repeats must be >= 1; got {images}, {steps}, '
                     f'{references}, {repeats}.')
  if params is None:
    params = fixtures.model_params(config, config.seed)
  r = config.model.resolution
  refs = np.random.default_rng(0).integers(0, 256, (references, r, r, 3), dtype=np.uint8)
  variants = list(dict.fromkeys('' if v == 'config' else v for v in (variants or ('',))))
  names = {v: (v or 'config') for v in variants}
  sides: dict[str, Any] = {names[v]: Personalizer(levers.variant_config(config, v), params) for v in variants}
  programs: dict[str, str] = {}
  for name, side in sides.items():   # two variants of one compiled program would time it twice
    if side.program_key in programs:
      raise ValueError(f'variants {programs[side.program_key]!r} and {name!r} compile the same sampling programs '
                       '(they differ only in fields sampling does not read); time one of them.')
    programs[side.program_key] = name
  if reference == 'torch':
    sides['torch'] = TorchPersonalizer(config, params)
  times: dict[str, dict[str, list[float]]] = {k: {'embed': [], 'generate': []} for k in sides}
  first: dict[str, dict[str, float]] = {}

  def once(name, side):
    z, te = _timed(lambda: side.embed(refs))
    out, tg = _timed(lambda: side.generate(z, images, sampler='ddim', steps=steps, seed=0))
    if out.shape != (images, r, r, 3):
      raise RuntimeError(f'{name} returned images of shape {out.shape}, not {(images, r, r, 3)}')
    return te, tg

  for name, side in sides.items():   # first calls: ours compiles here
    te, tg = once(name, side)
    first[name] = {'embed_s': te, 'generate_s': tg}
    log(f'{name}: first call {te + tg:.2f} s')
  for i in range(repeats):           # then in turns, so both sides see the same machine
    for name, side in sides.items():
      te, tg = once(name, side)
      times[name]['embed'].append(te)
      times[name]['generate'].append(tg)
    log(f'round {i + 1}/{repeats} done')

  guidance = guidance_lib.check_guidance(config.sample.guidance)
  record: dict[str, Any] = {
      'host': measure.host_info(), 'resolution': r, 'images': images, 'steps': steps, 'references': references,
      'guidance': guidance, 'model_calls_per_step_batch': images * (1 if guidance == 1.0 else 2),
      'repeats': repeats, 'statistic': 'median', 'jax_version': jax.__version__}
  stats = {}
  for name in sides:
    e, g = np.median(times[name]['embed']), np.median(times[name]['generate'])
    stats[name] = {'embed_ms': 1e3 * float(e), 'generate_ms': 1e3 * float(g), 'total_ms': 1e3 * float(e + g),
                   'step_ms': 1e3 * float(g) / steps,
                   'first_call_s': first[name]['embed_s'] + first[name]['generate_s']}
  first_name = names[variants[0]]
  record['jax'] = {**stats[first_name], 'variant': first_name}
  if len(variants) > 1:
    record['variants'] = {
        names[v]: {**stats[names[v]], 'speedup': stats[first_name]['total_ms'] / stats[names[v]]['total_ms']}
        for v in variants}
  if 'torch' in sides:
    record['torch'] = {**stats['torch'], 'framework': f'torch {sides["torch"].torch.__version__}',
                       'threads': sides['torch'].torch.get_num_threads()}
    record['vs_torch'] = record['torch']['total_ms'] / record['jax']['total_ms']
    for s in record.get('variants', {}).values():
      s['vs_torch'] = record['torch']['total_ms'] / s['total_ms']
  return record


def format_table(record: dict[str, Any]) -> str:
  lines = ['| | embed ms | generate ms | total ms | per step ms | first call s | vs PyTorch |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  rows = ({f'jax {k}': v for k, v in record['variants'].items()} if 'variants' in record
          else {'jax': {**record['jax'], 'vs_torch': record.get('vs_torch')}})
  if 'torch' in record:
    rows['torch'] = {**record['torch'], 'vs_torch': 1.0}
  for name, s in rows.items():
    ratio = '' if s.get('vs_torch') is None else f'{s["vs_torch"]:.2f}'
    lines.append(f'| {name} | {s["embed_ms"]:.1f} | {s["generate_ms"]:.1f} | {s["total_ms"]:.1f} | '
                 f'{s["step_ms"]:.1f} | {s["first_call_s"]:.1f} | {ratio} |')
  if 'vs_torch' in record:
    lines.append(f'ours ({record["jax"]["variant"]}) at {record["vs_torch"]:.2f}x the speed of the PyTorch reference')
  return '\n'.join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  where = {'flag_values': flag_values}
  cli.define_config_flag(default='configs/base.py:cpu', required=False, **where)
  flags.DEFINE_integer('images', 8, 'images generated', **where)
  flags.DEFINE_integer('steps', 25, 'DDIM steps', **where)
  flags.DEFINE_integer('references', 4, 'reference photos embedded', **where)
  flags.DEFINE_integer('repeats', 3, 'warm calls timed per side (median reported)', **where)
  flags.DEFINE_enum('reference', '', ['', 'torch'], 'also time the PyTorch twin, in turns with ours', **where)
  flags.DEFINE_string('workdir', '', "a trained run's workdir (its EMA parameters); default random ones",
                      **where)
  flags.DEFINE_list('variants', ['config'], "variants of the config timed in turns (levers of perf.levers, e.g. "
                    "'config,sampleynnon'; 'config': the config as given, the default)", **where)
  flags.DEFINE_string('json_out', '', 'also write the JSON record here', **where)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  config = f.config
  params = load_workdir_params(f.workdir, 'train it first') if f.workdir else None
  record = measure_latency(config, images=f.images, steps=f.steps, references=f.references, repeats=f.repeats,
                           reference=f.reference, params=params,
                           variants=[v.strip() for v in f.variants], log=lambda s: print(f'[latency] {s}', flush=True))
  measure.emit(record, format_table(record), f.json_out)


def console_main() -> None:
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  console_main()
