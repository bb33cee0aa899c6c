"""`python -m idenc_jax.perf.summary`: parameters and forward FLOPs per image of a config's models.

Prints one JSON object: parameter counts (from abstract initialisation, nothing materialised),
forward GFLOP per image from XLA's cost analysis of the compiled forward pass, the analytic count
of `idenc_jax.perf.flops`, training GFLOP per image (3 x forward), and the published reference sizes of
the paper's 128px setup with our relative differences. Examples:

  python -m idenc_jax.perf.summary --config=configs/base.py
  python -m idenc_jax.perf.summary --config=configs/base.py:cpu
  python -m idenc_jax.perf.summary --config=configs/base.py --config.model.mlp_ratio=0   # DiffAE blocks

The reference figures use DiffAE's block structure (attention without the ViT MLP, i.e.
`model.mlp_ratio=0`) and count every tap of a padded convolution; `reference_convention` gives our
matrix FLOPs counted that way, which reproduce the generator's 138.7 GFLOP.
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from idenc_jax import cli
from idenc_jax import models
from idenc_jax.perf import flops

# Published sizes for the paper's setup (SPEC.md): DiffAE block structure at 128x128.
REFERENCE = {
    'generator_params': 143.6e6,
    'generator_gflops_per_image': 138.7,
    'encoder_params': 34.4e6,
    'encoder_gflops_per_image': 17.7,
    'training_gflops_per_image': 469.2,   # 3 x (138.7 + 17.7)
}


def count_params(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _sig(v: float, digits: int = 6) -> float:
  return float(f'{v:.{digits}g}')


def _rel(ours: float, ref: float) -> float:
  return _sig(ours / ref - 1.0, 4)


def summarize(config, *, batch: int = 1) -> dict:
  """Sizes of the generator and identity encoder of `config`; see the module docstring.

  Stage-2 configs are summarised as their stage-1 personalized model (without the condition
  encoder and cross-attention). `batch` is the batch the forward pass is compiled at; FLOPs are
  reported per image.
  """
  notes = []
  if config.stage == 2:
    config = config.copy_and_resolve_references()
    config.stage = 1
    notes.append('stage 2: the stage-1 model, without condition encoder and cross-attention')
  conditional = config.stage != 0
  r, d = config.model.resolution, config.model.embed_dim
  x = jax.ShapeDtypeStruct((batch, r, r, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  z = jax.ShapeDtypeStruct((batch, d), jnp.float32) if conditional else None
  gen, enc = models.build_generator(config), models.build_encoder(config)
  key = jax.random.key(0)
  gen_vars = jax.eval_shape(lambda x, t, z: gen.init(key, x, t, z), x, t, z)
  enc_vars = jax.eval_shape(lambda x: enc.init(key, x), x)
  gen_gflops = flops.xla_forward_flops(gen.apply, gen_vars, x, t, z) / batch / 1e9
  enc_gflops = flops.xla_forward_flops(enc.apply, enc_vars, x) / batch / 1e9
  gen_analytic = flops.generator_flops(config) / 1e9
  enc_analytic = flops.encoder_flops(config) / 1e9
  out = {
      'resolution': r,
      'stage': config.stage,
      'xla_backend': jax.default_backend(),
      'generator_params': count_params(gen_vars),
      'encoder_params': count_params(enc_vars),
      'generator_gflops_per_image': _sig(gen_gflops),
      'encoder_gflops_per_image': _sig(enc_gflops),
      'generator_gflops_analytic': _sig(gen_analytic),
      'encoder_gflops_analytic': _sig(enc_analytic),
      'analytic_vs_xla': {'generator': _rel(gen_analytic, gen_gflops),
                          'encoder': _rel(enc_analytic, enc_gflops)},
      'training_gflops_per_image': _sig(flops.training_flops_per_image(config) / 1e9),
      'reference_convention': {
          'generator_gflops_per_image': _sig(
              flops.generator_flops(config, elementwise=False, count_padding=True) / 1e9),
          'encoder_gflops_per_image': _sig(
              flops.encoder_flops(config, elementwise=False, count_padding=True) / 1e9),
      },
      'reference': dict(REFERENCE),
  }
  out['relative_difference'] = {k: _rel(out[k], v) for k, v in REFERENCE.items()}
  if notes:
    out['notes'] = notes
  return out


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags; defined at start-up, not at import, since `idenc_jax.main` and the other
  entry points define --config too and may be imported into the same process."""
  cli.define_config_flag(flag_values=flag_values)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  print(json.dumps(summarize(flags.FLAGS.config), indent=2))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
