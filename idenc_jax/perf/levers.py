"""Variants of a config: performance levers joined by '+', e.g. 'bf16+remat+b256'.

A lever names config fields and their values: fp32 | bf16 (model.dtype), remat / noremat (model.remat),
fused / xla (model.attention), mmgrad / mmgradwide (model.conv_grad='matmul' / 'matmul_wide'),
gnfused / gnflax (model.group_norm),
mmsums / reducesums (model.channel_sums: per-channel sums over maps as matmuls / XLA's reductions),
mmsmall / xlasmall (model.small_conv: 3x3 convolutions on maps of at most 4x4 as one matmul / XLA's own),
flat / perarray (train.flat_update: the optimizer, EMA and guard on one flat vector or array by array),
ynnconv / xnnconv / onednnconv (XLA:CPU's YNNPACK / XNNPACK / oneDNN convolutions, train.compiler_options),
ynnoff / ynnon (no YNNPACK fusions at all, the paper configs' earlier setting / XLA:CPU's own defaults, which
hand the kernel-gradient convolutions to YNNPACK), ynnreduce / ynnnoconv (YNNPACK for reductions only, the paper
and `cpu` configs' setting / for reductions and matmuls), sampleynnon / sampleynnoff / sampleynnreduce (the same for
sample.compiler_options, the model's inference calls: `perf.latency --variants`). An option lever sets the whole
option text, as these settings were measured: it leaves out the configs' copy-insertion option
(`configs.base.NO_STATE_COPIES`), which changes no value but saves the train state's copies;
b<N> (train.batch_size), prefetch<N> (data.prefetch), or any `section.field=value`. A field that no
lever of a variant names keeps the config's value, so a variant says only what it changes.

A variant's config is a locked copy of the given one with the levers applied, so the config of the
command line is never changed and a misspelt field is an error, not a new field.
"""

from __future__ import annotations

from typing import Any

from idenc_jax import cli

LEVERS = {
    'fp32': {'model.dtype': 'float32'},
    'bf16': {'model.dtype': 'bfloat16'},
    'remat': {'model.remat': True},
    'noremat': {'model.remat': False},
    'fused': {'model.attention': 'fused'},
    'xla': {'model.attention': 'xla'},
    'mmgrad': {'model.conv_grad': 'matmul'},
    'mmgradwide': {'model.conv_grad': 'matmul_wide'},
    'gnfused': {'model.group_norm': 'fused'},
    'gnflax': {'model.group_norm': 'flax'},
    'mmsums': {'model.channel_sums': 'matmul'},
    'reducesums': {'model.channel_sums': 'reduce'},
    'mmsmall': {'model.small_conv': 'matmul'},
    'xlasmall': {'model.small_conv': 'xla'},
    'flat': {'train.flat_update': True},
    'perarray': {'train.flat_update': False},
    # XLA:CPU's library fusions for convolutions (train.compiler_options; a variant takes one of them). In jaxlib
    # 0.10.2 only YNNPACK's takes them: with oneDNN's or XNNPACK's fusion type set the convolutions stay where
    # XLA's defaults put them (HLO checked, docs/performance.md), and as a lever replaces the whole option text,
    # xnnconv and onednnconv time XLA's default options.
    **{f'{lib}conv': {'train.compiler_options': f'xla_cpu_experimental_{lib}_fusion_type='
                                                'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'}
       for lib in ('ynn', 'xnn', 'onednn')},
    # An empty fusion type turns YNNPACK off: every convolution stays XLA's own (Eigen).
    'ynnoff': {'train.compiler_options': 'xla_cpu_experimental_ynn_fusion_type='},
    'ynnon': {'train.compiler_options': ''},
    # XLA's default YNNPACK fusions are dots, reductions and convolutions of 32+ channels; these keep the
    # first two (or reductions alone) and leave every convolution to XLA's own (Eigen).
    'ynnnoconv': {'train.compiler_options': 'xla_cpu_experimental_ynn_fusion_type='
                                            'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'},
    'ynnreduce': {'train.compiler_options': 'xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE'},
    # The same settings for the inference calls (sample.compiler_options: encoder, samplers), which have no
    # kernel gradients: XLA's defaults, YNNPACK off, reductions only.
    'sampleynnon': {'sample.compiler_options': ''},
    'sampleynnoff': {'sample.compiler_options': 'xla_cpu_experimental_ynn_fusion_type='},
    'sampleynnreduce': {'sample.compiler_options': 'xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE'},
}


def variant_overrides(variant: str) -> dict[str, Any]:
  """'bf16+remat+b256' -> {'model.dtype': 'bfloat16', 'model.remat': True, 'train.batch_size': 256}.

  A free-form `section.field=value` keeps its value as text; `cli.apply_overrides` parses it.
  """
  out = {}
  for lever in filter(None, (p.strip() for p in variant.split('+'))):
    if lever in LEVERS:
      out.update(LEVERS[lever])
    elif lever[0] == 'b' and lever[1:].isdigit():
      out['train.batch_size'] = int(lever[1:])
    elif lever.startswith('prefetch') and lever[8:].isdigit():
      out['data.prefetch'] = int(lever[8:])
    elif '=' in lever:
      key, value = lever.split('=', 1)
      out[key] = value
    else:
      raise ValueError(f'unknown lever {lever!r} in variant {variant!r}; levers: {sorted(LEVERS)}, '
                       'b<N>, prefetch<N> or section.field=value')
  return out


def variant_config(config, variant: str):
  """A locked copy of `config` with the levers of `variant` applied ('' : an unchanged copy)."""
  return cli.apply_overrides(config, variant_overrides(variant))
