"""Custom operations behind the model levers: convolution kernel gradients as matmuls, the fused group
norm with its own VJP, and attention (XLA einsum or jax.nn.dot_product_attention). Same functions, other
schedules."""
