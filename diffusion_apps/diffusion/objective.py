"""The denoising objective: what the network predicts (ε, x0 or v), the regression target, the
conversions between the parametrisations, and the per-sample loss terms of L_simple and L_vlb."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from diffusion_apps.diffusion.schedule import NoiseSchedule
from diffusion_apps.diffusion.variance import vlb_terms

Prediction = Literal["eps", "x0", "v"]


def regression_target(
    schedule: NoiseSchedule, prediction: Prediction, x0: Tensor, t: Tensor, noise: Tensor
) -> Tensor:
    """ε (Ho et al.), x0, or v = √ᾱ_t ε − √(1−ᾱ_t) x0 (Salimans & Ho 2022)."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return schedule.velocity(x0, t, noise)


def min_snr_weight(
    schedule: NoiseSchedule, prediction: Prediction, t: Tensor, gamma: float
) -> Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, eq. 9), shape (B,) in fp32.

    The x0-space weight min(SNR_t, γ) written for the parametrisation's own error: since
    ‖ε − ε̂‖² = SNR_t‖x0 − x̂0‖² and ‖v − v̂‖² = (SNR_t + 1)‖x0 − x̂0‖²,
        w_t = min(SNR_t, γ)/SNR_t (ε),  min(SNR_t, γ) (x0),  min(SNR_t, γ)/(SNR_t + 1) (v),
    so that w_t·‖target − f_θ‖² = min(SNR_t, γ)·‖x0 − x̂0‖² whatever the network predicts: the
    low-noise steps, whose tiny x0 errors dominate the gradient otherwise, stop at weight γ.
    The ε weight is computed as min(1, γ/SNR_t), finite where SNR_t = 0.
    """
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    snr = schedule.snr(t).float()
    if prediction == "eps":
        return (gamma / snr).clamp(max=1.0)
    clipped = snr.clamp(max=gamma)
    return clipped if prediction == "x0" else clipped / (snr + 1)


def convert_prediction(
    schedule: NoiseSchedule,
    prediction: Prediction,
    x_t: Tensor,
    t: Tensor,
    out: Tensor,
    to: Literal["eps", "x0"],
) -> Tensor:
    """The network's f_θ in the ``prediction`` parametrisation, as ε̂ or x̂_0 at (x_t, t)."""
    if prediction == to:
        return out
    if prediction == "v":
        return (schedule.eps_from_v if to == "eps" else schedule.x0_from_v)(x_t, t, out)
    return (schedule.predict_eps if to == "eps" else schedule.predict_x0)(x_t, t, out)


def loss_terms(
    schedule: NoiseSchedule,
    prediction: Prediction,
    f: Tensor,
    v: Tensor | None,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    noise: Tensor,
    loss: Literal["mse", "l1"] = "mse",
) -> dict[str, Tensor]:
    """Per-sample terms (B,) in fp32 of the network's output f_θ (and v, with a learned Σ):

    - ``"simple"``: mean over dimensions of (target − f_θ)², or |·| with ``loss="l1"``;
    - ``"vb"`` (when v is given): L_t in bits per dimension of p_θ(x_{t−1} | x_t), with the mean
      from the detached f_θ so that it trains Σ_θ only (Nichol & Dhariwal §3.1;
      :func:`~diffusion_apps.diffusion.variance.vlb_terms`, guided-diffusion's ``terms["vb"]``).
    """
    f = f.float()
    error = (f - regression_target(schedule, prediction, x0, t, noise).float()).flatten(1)
    terms = {"simple": (error.square() if loss == "mse" else error.abs()).mean(1)}
    if v is not None:
        x_t, x0 = x_t.float(), x0.float()
        x0_hat = convert_prediction(schedule, prediction, x_t, t, f.detach(), "x0")
        terms["vb"] = vlb_terms(schedule, x0, x_t, t, x0_hat, v.float())
    return terms
