"""Personalization: reference photos -> identity embedding -> new images (Personalizer) or restored ones
(Restorer, stage 2); the sample mode's files (sample_mode) and the fine-tuning baseline (finetune)."""

from idenc_jax.personalize.personalizer import Personalizer
from idenc_jax.personalize.references import load_embedding, load_references, save_embedding
from idenc_jax.personalize.restorer import Restorer

__all__ = ['Personalizer', 'Restorer', 'load_embedding', 'load_references', 'save_embedding']
