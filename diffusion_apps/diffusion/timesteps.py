"""Timestep subsequences of [0, T) for respaced sampling, and their ᾱ tables."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from diffusion_apps.diffusion.schedule import NoiseSchedule

Spacing = Literal["uniform", "quad", "logsnr"]


def timestep_subsequence(
    num_timesteps: int,
    steps: int,
    kind: Spacing = "uniform",
    alphas_cumprod: Tensor | None = None,
) -> Tensor:
    """The S-step subsequences of [0, T) of DDIM (Song et al. 2021; official ermongroup/ddim) and
    DPM-Solver (Lu et al. 2022).

    ``uniform``: ``arange(0, T, T // S)[:S]``, i.e. t_i = i·⌊T/S⌋: it starts at 0 and ends at
    T − T/S when S divides T (the official DDIM code; latent-diffusion adds +1, we do not).
    ``quad``: t_i = ⌊(i·√(0.8 T)/(S − 1))²⌋, rounded like the official code's ``numpy.linspace``:
    the walk starts at t_{S−1} = 0.8·T, not near T (the official choice).
    Its repeats near 0 (from S ≈ √(0.8 T) on: 96 distinct of S = 100 at T = 1000) are dropped; the
    official sampler runs them as no-op steps t → t that still cost a model call.
    ``logsnr``: uniform in λ = log(√ᾱ/√(1 − ᾱ)) from λ_{T−1} to λ_0 (DPM-Solver's ``logSNR``
    skip type, its choice for low resolutions), each λ rounded to the nearest index, repeats
    dropped. It needs ``alphas_cumprod``, and unlike the others it ends at T − 1.

    Args:
        num_timesteps: T.
        steps: S, with 1 ≤ S ≤ T.
        kind: Spacing rule.
        alphas_cumprod: ᾱ_0 … ᾱ_{T−1}, for ``logsnr``.

    Returns:
        Strictly increasing int64 tensor, (S,) (``quad``, ``logsnr``: at most S).
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, num_timesteps={num_timesteps}], got {steps}")
    if kind == "uniform":
        return torch.arange(0, num_timesteps, num_timesteps // steps)[:steps]
    if kind == "quad":
        stop = math.sqrt(0.8 * num_timesteps)  # numpy.linspace's rounding, as in the official code
        root = torch.arange(steps, dtype=torch.float64) * (stop / max(steps - 1, 1))
        if steps > 1:
            root[-1] = stop
        return (root**2).long().unique()
    if kind != "logsnr":
        raise ValueError(f"kind must be one of {get_args(Spacing)}, got {kind!r}")
    if alphas_cumprod is None or len(alphas_cumprod) != num_timesteps:
        raise ValueError("kind='logsnr' needs the schedule's alphas_cumprod (T values)")
    alpha_bar = alphas_cumprod.detach().cpu().double()
    lam = 0.5 * (alpha_bar.log() - (1 - alpha_bar).log())  # decreasing in t
    if steps == 1:
        return torch.tensor([num_timesteps - 1])
    wanted = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
    nearest = (lam[None, :] - wanted[:, None]).abs().argmin(1)
    return nearest.unique()


def subsequence_tables(
    schedule: NoiseSchedule, timesteps: Tensor | None
) -> tuple[list[int], Tensor, Tensor]:
    """Validated indices [t_0, …, t_{S−1}] and float64 (S,) tables ᾱ_{t_i} and ᾱ_{t_{i−1}}
    (ᾱ_{t_{−1}} = 1)."""
    T = schedule.num_timesteps
    ts = torch.arange(T) if timesteps is None else torch.as_tensor(timesteps).cpu().long()
    if ts.ndim != 1 or len(ts) == 0 or ts[0] < 0 or ts[-1] >= T or (ts.diff() <= 0).any():
        raise ValueError(f"timesteps must be a non-empty increasing 1-D subset of [0, {T})")
    alpha_bar = schedule.alphas_cumprod.detach().cpu().double()[ts]
    return ts.tolist(), alpha_bar, torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
