"""Learned reverse-process variance (Nichol & Dhariwal 2021, "Improved DDPM", §3.1) and the
variational bound L_vlb that trains it; official code: openai/guided-diffusion
``gaussian_diffusion.py`` (``ModelVarType.LEARNED_RANGE``, ``_vb_terms_bpd``) and ``losses.py``.

Model contract: a model function with learned variance returns 2C channels, the concatenation
[ε̂, v] along dim 1 of x_t (B, C, …). :func:`split_output` tells the two forms apart by shape (an
ε̂ has x_t's shape), so every guidance wrapper acts on ε̂ and passes v through unchanged, and the
ODE samplers (DDIM, DPM-Solver++, DDIM inversion) read the ε̂ half only. v interpolates the log
variance between the two fixed choices (eq. 15):

    log Σ_θ(x_t, t) = frac·log β_t + (1 − frac)·log β̃_t,   frac = (v + 1)/2,

v raw (not clamped: v ∈ [−1, 1] spans [β̃_t, β_t]). log β̃ is guided-diffusion's
``posterior_log_variance_clipped``: β̃_0 = 0 is replaced by β̃_1. On a respaced subsequence
t_0 < … < t_{S−1} both bounds are those of the respaced process (``respace.py``):
β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}}, β̃'_i = β'_i (1 − ᾱ_{t_{i−1}})/(1 − ᾱ_{t_i}).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_apps.diffusion.schedule import NoiseSchedule, per_sample


def split_output(out: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
    """(ε̂, v) of a model output: (out, None) when it is shaped like x_t, its two channel halves
    when it has 2C channels [ε̂, v]."""
    if out.shape == x_t.shape:
        return out, None
    C = x_t.shape[1]
    if out.shape != (x_t.shape[0], 2 * C, *x_t.shape[2:]):
        raise ValueError(
            f"a model function returns ε shaped like x_t {tuple(x_t.shape)}, or [ε, v] with "
            f"2·{C} channels (learned variance); got {tuple(out.shape)}"
        )
    return out[:, :C], out[:, C:]


def join_output(eps: Tensor, v: Tensor | None) -> Tensor:
    """The inverse of :func:`split_output`: ε̂, or [ε̂, v] concatenated along dim 1."""
    return eps if v is None else torch.cat([eps, v], dim=1)


def log_variance_bounds(alpha_bar: Tensor, alpha_bar_prev: Tensor) -> tuple[Tensor, Tensor]:
    """(log β̃'_i clipped, log β'_i) for the levels ᾱ_{t_i} (S,) and ᾱ_{t_{i−1}} (S,), float64.

    β̃'_0 = 0 is replaced by β̃'_1 (``posterior_log_variance_clipped``); with a single step
    (S = 1, no β̃'_1) both bounds are log β'_0.
    """
    beta = 1 - alpha_bar / alpha_bar_prev
    beta_tilde = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    clipped = torch.cat([beta_tilde[1:2] if len(beta) > 1 else beta[:1], beta_tilde[1:]])
    return clipped.log(), beta.log()


def learned_log_variance(v: Tensor, min_log: Tensor, max_log: Tensor) -> Tensor:
    """log Σ_θ = frac·max_log + (1 − frac)·min_log, frac = (v + 1)/2 (Improved DDPM eq. 15);
    the bounds broadcast against v."""
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(μ₁, e^{ℓ₁}) ‖ N(μ₂, e^{ℓ₂})) elementwise, in nats:
    ½ (−1 + ℓ₂ − ℓ₁ + e^{ℓ₁ − ℓ₂} + (μ₁ − μ₂)² e^{−ℓ₂})."""
    return 0.5 * (-1 + logvar2 - logvar1 + (logvar1 - logvar2).exp()
                  + (mean1 - mean2).square() * (-logvar2).exp())  # fmt: skip


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    # Φ(x) ≈ ½ (1 + tanh(√(2/π) (x + 0.044715 x³))), the official code's approximation (Ho et al.)
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) elementwise, in nats, of N(mean, e^{2·log_scale}) discretised to the 256 bins of
    width 2/255 of 8-bit data scaled to [−1, 1] (DDPM §3.3, the decoder L_0): the mass of
    [x − 1/255, x + 1/255], the edge bins extended to ∓∞. Φ is the official tanh approximation
    and each probability is floored at 1e-12, as in guided-diffusion's ``losses.py``."""
    centered, inv_std = x - mean, (-log_scale).exp()
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    inner = torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    return torch.where(x < -0.999, log_cdf_plus, inner)


def vlb_terms(
    schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor, x0_hat: Tensor, v: Tensor
) -> Tensor:
    """L_t of the variational bound per sample (B,), in bits per dimension (Improved DDPM eqs.
    4–6; guided-diffusion's ``_vb_terms_bpd`` with ``clip_denoised=False``).

    p_θ(x_{t−1} | x_t) = N(μ̃_t(x̂_0, x_t), Σ_θ), μ̃_t the posterior mean (DDPM eq. 7) at the
    model's x̂_0 and log Σ_θ from v on the full T-step schedule:
        L_t = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t))  for t > 0, q's log-variance being
              log β̃_t (clipped at t = 0, unused there);
        L_0 = −log p_θ(x_0 | x_1), the discretised Gaussian decoder at t = 0.
    Both are averaged over the dimensions and divided by log 2. For L_hybrid (§3.1) give an
    x̂_0 from the detached ε̂ half, so that L_vlb trains Σ_θ only.

    Every coefficient is derived in float64 from the schedule's ᾱ alone, β_t = 1 − ᾱ_t/ᾱ_{t−1}
    included (as the samplers do), then cast to float32 (float64 data: float64) on x_t's
    device: mixing the float32 β table in would put the t = 0 mean coefficient β_0/(1 − ᾱ_0) = 1
    off by ~3e-4, visible in the decoder term, whose σ is ~√β_0 = 0.01.
    """
    alpha_bar = schedule.alphas_cumprod.detach().cpu().double()
    alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    beta = 1 - alpha_bar / alpha_bar_prev
    c_x0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)
    c_xt = (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
    min_log, max_log = log_variance_bounds(alpha_bar, alpha_bar_prev)
    dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    table = torch.stack([c_x0, c_xt, min_log, max_log], 1).to(x_t.device, dtype)[t]  # (B, 4)
    c_x0, c_xt, min_log, max_log = (per_sample(column, x_t) for column in table.unbind(1))

    true_mean = c_x0 * x0 + c_xt * x_t
    mean = c_x0 * x0_hat + c_xt * x_t
    log_var = learned_log_variance(v, min_log, max_log)
    kl = normal_kl(true_mean, min_log, mean, log_var).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1)
    return torch.where(t == 0, nll, kl) / math.log(2.0)
