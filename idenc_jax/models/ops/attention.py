"""Multi-head dot-product attention: XLA einsum softmax, or `model.attention='fused'`
(jax.nn.dot_product_attention, cuDNN flash attention where it exists)."""

import math

import jax
import jax.numpy as jnp


def fused_attention_backend(dtype, head_dim: int) -> str | None:
  """The implementation `jax.nn.dot_product_attention` gets for model.attention='fused'.

  cuDNN's fused (flash) attention on GPUs for 16-bit inputs with head_dim <= 128, a multiple of 8;
  elsewhere None, the library's own XLA composition (no fused kernel exists there).
  """
  on_gpu = jax.default_backend() in ('gpu', 'cuda')
  if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0:
    return 'cudnn'
  return None


def dot_product_attention(q, k, v, impl: str):
  """Multi-head attention on [B, L, H, D] tensors; softmax in float32."""
  if impl == 'fused':
    return jax.nn.dot_product_attention(q, k, v, implementation=fused_attention_backend(q.dtype, q.shape[-1]))
  if impl != 'xla':
    raise ValueError(f"model.attention must be 'xla' or 'fused', got {impl!r}")
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)
