"""DPM-Solver++(2M) (Lu et al. 2022), an ODE solver on the samplers' contract
(:mod:`~diffusion_apps.diffusion.samplers`): stateless, ``eps_fn(x_t, t, **cond)`` with ORIGINAL
indices t; a learned-variance output [ε̂, v] is read for its ε̂.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from diffusion_apps import stop
from diffusion_apps.diffusion.samplers import EpsFn, clip_denoised
from diffusion_apps.diffusion.schedule import NoiseSchedule
from diffusion_apps.diffusion.timesteps import subsequence_tables
from diffusion_apps.diffusion.variance import split_output


def dpm_solver_pp_2m(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    timesteps: Tensor | None = None,
    clip_x0: bool = False,
    progress: bool = False,
    **cond: Any,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep, second order, data prediction;
    an ODE solver of the same probability-flow ODE as DDIM (η = 0), on the same contract.

    With α = √ᾱ, σ = √(1 − ᾱ), λ = log(α/σ), the data prediction x_θ = (x − σ ε̂)/α, and
    h_i = λ_{t_{i−1}} − λ_{t_i} for the step from t_i to t_{i−1}:
        x_{t_{i−1}} = (σ_{t_{i−1}}/σ_{t_i}) x_{t_i} − α_{t_{i−1}} (e^{−h_i} − 1) D_i,
        D_i = (1 + 1/(2 r_i)) x_θ(x_{t_i}) − 1/(2 r_i) x_θ(x_{t_{i+1}}),   r_i = h_{i+1}/h_i,
    and D = x_θ(x_{t_i}) (first order, which is DDIM with η = 0) for the first step, and for
    the last one, to ᾱ = 1 (h = ∞), which returns x_θ as DDIM does (diffusers'
    ``lower_order_final``). One network evaluation per step.

    Args:
        eps_fn: ε-prediction model ``eps_fn(x_t, t, **cond)``.
        schedule: The noise schedule the model was trained with.
        x_T: Start noise at level t_{S−1}, shape (B, …).
        timesteps: Increasing subsequence of [0, T); default all T.
        clip_x0: Clamp x_θ = x̂_0 to [−1, 1] and re-derive ε̂ from it (:func:`clip_denoised`
            around ``eps_fn``: after any guidance in it).
        progress: Show a tqdm bar.
        **cond: Passed to ``eps_fn`` unchanged.

    Returns:
        Samples shaped like x_T.
    """
    ts, alpha_bar, alpha_bar_prev = subsequence_tables(schedule, timesteps)
    # Per step, from t_{S−1} down: (α_s, σ_s, σ_t/σ_s, α_t, h), in float64, then Python floats.
    alpha_s, sigma_s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    alpha_t, sigma_t = alpha_bar_prev.sqrt(), (1 - alpha_bar_prev).sqrt()
    h = (alpha_t / sigma_t).log() - (alpha_s / sigma_s).log()  # +inf for the last step
    rows = torch.stack([alpha_s, sigma_s, sigma_t / sigma_s, alpha_t, h], 1).flip(0).tolist()
    t_all = torch.tensor(ts[::-1], dtype=torch.long, device=x_T.device)
    eps_fn = clip_denoised(eps_fn, schedule) if clip_x0 else eps_fn

    def data_prediction(x: Tensor, i: int, a_s: float, s_s: float) -> Tensor:
        # x_θ = (x − σ_s ε̂)/α_s
        eps, _ = split_output(eps_fn(x, t_all[i].expand(x.shape[0]), **cond), x)
        return torch.add(x, eps, alpha=-s_s).div_(a_s)

    x, x0_prev, h_prev = x_T, None, None
    for i, (a_s, s_s, sigma_ratio, a_t, h_i) in enumerate(tqdm(rows[:-1], disable=not progress)):
        stop.check()  # SIGTERM/Ctrl-C: stop within a step
        x0 = data_prediction(x, i, a_s, s_s)
        d = x0
        if x0_prev is not None:  # second order: extrapolate x_θ along λ
            half_inv_r = h_i / (2 * h_prev)
            d = x0.mul(1 + half_inv_r).add_(x0_prev, alpha=-half_inv_r)
        x = d.mul(-a_t * math.expm1(-h_i)).add_(x, alpha=sigma_ratio)
        x0_prev, h_prev = x0, h_i
    a_s, s_s = rows[-1][:2]  # the last step, to clean data (h = ∞): x_θ itself
    return data_prediction(x, len(rows) - 1, a_s, s_s)
