"""Pure-torch diffusion maths: noise schedules, samplers and guidance wrappers (no Lightning)."""

from diffusion_apps.diffusion.guidance import (
    GradFn,
    classifier_free_guidance,
    classifier_log_prob_grad,
    eps_shift_guidance,
    mean_shift_guidance,
)
from diffusion_apps.diffusion.interpolation import slerp
from diffusion_apps.diffusion.samplers import (
    EpsFn,
    Spacing,
    clip_denoised,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    dpm_solver_pp_2m,
    timestep_subsequence,
)
from diffusion_apps.diffusion.schedule import NoiseSchedule, ScheduleKind

__all__ = [
    "EpsFn",
    "GradFn",
    "NoiseSchedule",
    "ScheduleKind",
    "Spacing",
    "classifier_free_guidance",
    "clip_denoised",
    "classifier_log_prob_grad",
    "ddim_invert",
    "ddim_sample",
    "ddpm_sample",
    "dpm_solver_pp_2m",
    "eps_shift_guidance",
    "mean_shift_guidance",
    "slerp",
    "timestep_subsequence",
]
