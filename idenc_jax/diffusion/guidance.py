"""Classifier-free guidance on the identity embedding (Ho & Salimans 2022).

A generator trained to also predict noise without identity (`config.loss.null_identity_prob`) gives two
predictions at every step: eps(x, t, z) and eps(x, t, None). Guidance with weight w samples with

    eps_w = eps(x, t, None) + w * (eps(x, t, z) - eps(x, t, None)),

w = 1 the plain conditional model, w = 0 the unconditional one, w > 1 a sharper identity at some cost in
diversity. For Gaussian data with conditional mean mu_c and unconditional mean mu_u (same variance), eps_w
is exactly the optimal predictor of the Gaussian with mean mu_u + w (mu_c - mu_u), which the tests use.
Both predictions come from one batched model call ([x; x] with the second half marked unconditional), so
a step costs one call on twice the batch rather than two calls.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# model_fn(x, t, null) -> eps; null is None (every sample conditional) or a [B] bool (True: unconditional).
GuidableFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


def check_guidance(guidance) -> float:
  """guidance as a float; a clear error for anything but a finite number >= 0."""
  if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.number)) or not (
      np.isfinite(guidance) and guidance >= 0):
    raise ValueError(f'guidance must be a finite number >= 0 (1: no guidance), got {guidance!r}.')
  return float(guidance)


def combine(eps_cond: jax.Array, eps_uncond: jax.Array, guidance: float) -> jax.Array:
  """eps_u + w (eps_c - eps_u)."""
  return eps_uncond + guidance * (eps_cond - eps_uncond)


def guided_eps_fn(model_fn: GuidableFn, guidance: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The samplers' eps_fn(x, t) for guidance weight w (a Python number, fixed at trace time).

  w = 1 calls model_fn(x, t, None) once on the batch as it is, bit for bit the unguided sampler; any other w
  calls it once on [x; x] with the second half unconditional and combines the two halves.
  """
  w = check_guidance(guidance)
  if w == 1.0:
    return lambda x, t: model_fn(x, t, None)

  def eps_fn(x, t):
    b = x.shape[0]
    null = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
    eps = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), null)
    return combine(eps[:b], eps[b:], w)
  return eps_fn


def parse_guidance_sweep(spec: str) -> list[float]:
  """'1,2,3,5' -> [1.0, 2.0, 3.0, 5.0] (config.eval.guidance_sweep)."""
  out = []
  for item in [s.strip() for s in (spec or '').split(',') if s.strip()]:
    try:
      out.append(check_guidance(float(item)))
    except ValueError:
      raise ValueError(f'config.eval.guidance_sweep entry {item!r} is not a number >= 0; '
                       "write e.g. '1,2,3,5'.") from None
  return out
