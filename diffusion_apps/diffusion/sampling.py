"""The samplers by name: one entry that runs DDPM ancestral, DDIM or DPM-Solver++(2M)."""

from __future__ import annotations

import typing
from typing import Any, Literal

import torch
from torch import Tensor

from diffusion_apps.diffusion.samplers import EpsFn, Variance, ddim_sample, ddpm_sample
from diffusion_apps.diffusion.schedule import NoiseSchedule
from diffusion_apps.diffusion.solvers import dpm_solver_pp_2m

Sampler = Literal["ddpm", "ddim", "dpmpp_2m"]
SAMPLERS: tuple[str, ...] = typing.get_args(Sampler)


def run_sampler(
    sampler: Sampler,
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    timesteps: Tensor,
    *,
    eta: float = 0.0,
    variance: Variance = "beta",
    generator: torch.Generator | None = None,
    progress: bool = False,
    **cond: Any,
) -> Tensor:
    """x̂_0 from x_T over ``timesteps`` by the named sampler: ``ddpm`` draws with ``variance``,
    ``ddim`` with ``eta``, ``dpmpp_2m`` is deterministic (neither η nor a generator)."""
    common = dict(timesteps=timesteps, progress=progress, **cond)
    if sampler == "ddpm":
        return ddpm_sample(eps_fn, schedule, x_T, variance=variance, generator=generator, **common)
    if sampler == "ddim":
        return ddim_sample(eps_fn, schedule, x_T, eta=eta, generator=generator, **common)
    if sampler == "dpmpp_2m":
        return dpm_solver_pp_2m(eps_fn, schedule, x_T, **common)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
