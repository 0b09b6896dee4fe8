"""Discrete noise schedules of Gaussian diffusion (Ho et al. 2020, "DDPM").

The forward process q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), ᾱ_t = ∏_{s≤t} (1 − β_s), is fixed by
the betas; everything else (ε / x0 / v conversions, the posterior q(x_{t−1} | x_t, x_0), the SNR) is
derived from ᾱ here. Timesteps ``t`` are int64 tensors of indices in [0, T), shape (B,), on the
schedule's device.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

ScheduleKind = Literal["linear", "sqrt_linear", "cosine", "constant"]
_KINDS = ("linear", "sqrt_linear", "cosine", "constant")
_MAX_BETA = 0.999  # Nichol & Dhariwal clip the cosine betas to avoid a singularity near t = T


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {value}")


def _make_betas(
    kind: str, T: int, beta_start: float, beta_end: float, constant_beta: float, cosine_s: float
) -> Tensor:
    """β_0 … β_{T−1} in float64, after validating the options that ``kind`` uses."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if T < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {T}")
    if kind == "linear":
        scale = 1000 / T  # guided-diffusion keeps the T = 1000 shape for any T
        _check_unit_interval("beta_start * 1000 / num_timesteps", beta_start * scale)
        _check_unit_interval("beta_end * 1000 / num_timesteps", beta_end * scale)
        return torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64)
    if kind == "sqrt_linear":
        _check_unit_interval("beta_start", beta_start)
        _check_unit_interval("beta_end", beta_end)
        root = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64)
        return root**2
    if kind == "cosine":
        if cosine_s < 0:
            raise ValueError(f"cosine_s must be >= 0, got {cosine_s}")
        u = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=_MAX_BETA)
    _check_unit_interval("constant_beta", constant_beta)
    return torch.full((T,), constant_beta, dtype=torch.float64)


def per_sample(values: Tensor, x: Tensor) -> Tensor:
    """Cast per-sample coefficients (B,) to x's dtype/device, shaped (B, 1, …, 1) to broadcast.

    Compute the coefficients from the float32 tables first and cast last: √(1 − ᾱ_t) of a bf16
    ᾱ_t is 0 for t < 10."""
    return values.to(x).reshape(-1, *([1] * (x.ndim - 1)))


class NoiseSchedule(nn.Module):
    """The β schedule and the closed forms of q derived from it.

    Kinds:
        ``linear``: β = linspace(β_start·1000/T, β_end·1000/T, T) (DDPM; guided-diffusion's 1000/T
        rescale, the plain linspace at T = 1000).
        ``sqrt_linear``: β = linspace(√β_start, √β_end, T)², latent-diffusion's "linear", with no
        rescale; LDM uses β_start = 0.0015, β_end = 0.0195.
        ``cosine``: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2), β_t = min(1 − ᾱ(t+1)/ᾱ(t),
        0.999) (Nichol & Dhariwal 2021, eq. 17).
        ``constant``: β_t = constant_beta (DiffAE's latent DDIM uses 0.008).

    The tables are computed in float64 and kept as non-persistent float32 buffers ``betas``,
    ``alphas_cumprod`` (ᾱ_t) and ``alphas_cumprod_prev`` (ᾱ_{t−1}, ᾱ_{−1} = 1): they follow
    ``.to(device)`` and stay out of ``state_dict`` (the config is the source of truth). They stay
    float32 whatever dtype the module is cast to (``bf16-true`` would round ᾱ_0 … ᾱ_9 to 1:
    √(1 − ᾱ_t) = 0, SNR = ∞), and every coefficient is computed from them before the cast to the
    data's dtype.

    Args:
        kind: Which β schedule.
        num_timesteps: T, the number of diffusion steps.
        beta_start: First β of ``linear`` / ``sqrt_linear``.
        beta_end: Last β of ``linear`` / ``sqrt_linear``.
        constant_beta: β of ``constant``.
        cosine_s: Offset s of ``cosine``.
    """

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor

    def __init__(
        self,
        kind: ScheduleKind = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        constant_beta: float = 0.008,
        cosine_s: float = 0.008,
    ) -> None:
        super().__init__()
        betas = _make_betas(kind, num_timesteps, beta_start, beta_end, constant_beta, cosine_s)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        self.kind = kind
        self.num_timesteps = num_timesteps
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("alphas_cumprod_prev", alphas_cumprod_prev.float(), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        """Follow ``fn``'s device, never its dtype: the tables stay float32 (see above)."""
        tables = dict(self._buffers)  # every buffer here is a table
        super()._apply(fn, recurse)
        for name, table in tables.items():
            self._buffers[name] = table.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_timesteps={self.num_timesteps}"

    def alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ_t = ∏_{s≤t} (1 − β_s), shape (B,)."""
        return self.alphas_cumprod[t]

    def snr(self, t: Tensor) -> Tensor:
        """SNR_t = ᾱ_t / (1 − ᾱ_t), shape (B,)."""
        alpha_bar = self.alpha_bar(t)
        return alpha_bar / (1 - alpha_bar)

    def _scales(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(√ᾱ_t, √(1 − ᾱ_t)) broadcast against x."""
        alpha_bar = self.alpha_bar(t)
        return per_sample(alpha_bar.sqrt(), x), per_sample((1 - alpha_bar).sqrt(), x)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM eq. 4, reparameterised)."""
        signal, sigma = self._scales(t, x0)
        return signal * x0 + sigma * noise

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t (DDIM eq. 9)."""
        signal, sigma = self._scales(t, x_t)
        return (x_t - sigma * eps) / signal

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """ε = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t)."""
        signal, sigma = self._scales(t, x_t)
        return (x_t - signal * x0) / sigma

    def velocity(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022, v-prediction)."""
        signal, sigma = self._scales(t, x0)
        return signal * noise - sigma * x0

    def x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v."""
        signal, sigma = self._scales(t, x_t)
        return signal * x_t - sigma * v

    def eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """ε = √(1 − ᾱ_t) x_t + √ᾱ_t v."""
        signal, sigma = self._scales(t, x_t)
        return sigma * x_t + signal * v

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t−1} | x_t, x_0) (DDPM eqs. 6–7).

        μ̃_t = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · x_t and
        β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t); at t = 0 this is (x_0, 0).

        Returns:
            ``mean`` shaped like x_t and ``variance`` shaped (B, 1, …, 1).
        """
        beta, alpha_bar = self.betas[t], self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod_prev[t]
        c_x0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)
        c_xt = (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
        mean = per_sample(c_x0, x_t) * x0 + per_sample(c_xt, x_t) * x_t
        return mean, per_sample(beta * (1 - alpha_bar_prev) / (1 - alpha_bar), x_t)
