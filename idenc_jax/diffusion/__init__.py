"""Diffusion maths: noise schedules, the forward process and samplers (no model code here)."""

from idenc_jax.diffusion.samplers import SAMPLERS
from idenc_jax.diffusion.samplers import SPACINGS
from idenc_jax.diffusion.samplers import ddim_sample
from idenc_jax.diffusion.samplers import ddpm_sample
from idenc_jax.diffusion.samplers import dpmpp_2m_sample
from idenc_jax.diffusion.samplers import sample
from idenc_jax.diffusion.samplers import timestep_subsequence
from idenc_jax.diffusion.schedules import SCHEDULES
from idenc_jax.diffusion.schedules import NoiseSchedule
from idenc_jax.diffusion.schedules import from_config
from idenc_jax.diffusion.schedules import make_schedule
from idenc_jax.diffusion.schedules import predict_x0_from_eps
from idenc_jax.diffusion.schedules import q_sample
from idenc_jax.diffusion.schedules import schedule_from_betas

__all__ = [
    'SAMPLERS', 'SPACINGS', 'ddim_sample', 'ddpm_sample', 'dpmpp_2m_sample', 'sample', 'timestep_subsequence',
    'SCHEDULES', 'NoiseSchedule', 'from_config', 'make_schedule', 'predict_x0_from_eps', 'q_sample',
    'schedule_from_betas',
]
