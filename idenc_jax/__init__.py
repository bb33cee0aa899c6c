"""idenc_jax: personalized image generation with an identity encoder and a diffusion U-Net, in JAX/Flax."""
