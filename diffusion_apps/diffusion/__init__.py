"""Pure-torch diffusion maths: noise schedules, samplers and guidance wrappers (no Lightning)."""

from diffusion_apps.diffusion.exact_inversion import (
    CoupledCode,
    Inversion,
    InversionKind,
    StochasticCode,
    edict_invert,
    edict_sample,
    slerp_code,
)
from diffusion_apps.diffusion.guidance import (
    GradFn,
    classifier_free_guidance,
    classifier_log_prob_grad,
    eps_shift_guidance,
    mean_shift_guidance,
)
from diffusion_apps.diffusion.interpolation import slerp
from diffusion_apps.diffusion.objective import (
    Prediction,
    convert_prediction,
    loss_terms,
    min_snr_weight,
    regression_target,
)
from diffusion_apps.diffusion.samplers import (
    EpsFn,
    Variance,
    clip_denoised,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
)
from diffusion_apps.diffusion.sampling import SAMPLERS, Sampler, run_sampler
from diffusion_apps.diffusion.schedule import NoiseSchedule, ScheduleKind
from diffusion_apps.diffusion.solvers import dpm_solver_pp_2m
from diffusion_apps.diffusion.timesteps import Spacing, timestep_subsequence
from diffusion_apps.diffusion.variance import (
    discretized_gaussian_log_likelihood,
    join_output,
    learned_log_variance,
    normal_kl,
    split_output,
    vlb_terms,
)

__all__ = [
    "classifier_free_guidance",
    "CoupledCode",
    "edict_invert",
    "edict_sample",
    "Inversion",
    "InversionKind",
    "slerp_code",
    "StochasticCode",
    "classifier_log_prob_grad",
    "clip_denoised",
    "convert_prediction",
    "ddim_invert",
    "ddim_sample",
    "ddpm_sample",
    "discretized_gaussian_log_likelihood",
    "dpm_solver_pp_2m",
    "eps_shift_guidance",
    "EpsFn",
    "GradFn",
    "join_output",
    "learned_log_variance",
    "loss_terms",
    "min_snr_weight",
    "mean_shift_guidance",
    "NoiseSchedule",
    "normal_kl",
    "Prediction",
    "regression_target",
    "run_sampler",
    "Sampler",
    "SAMPLERS",
    "ScheduleKind",
    "slerp",
    "Spacing",
    "split_output",
    "timestep_subsequence",
    "Variance",
    "vlb_terms",
]
