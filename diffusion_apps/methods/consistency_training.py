"""Consistency training (Song et al., ICML 2023, Algorithm 3) from data alone, with the improved
recipe of Song & Dhariwal 2023 (iCT): no EMA target, pseudo-Huber distance, lognormal
noise-level sampling over the discretisation, 1/Δσ weighting and the N(k) curriculum."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_apps.methods.consistency_core import (
    ConsistencyModel,
    Distance,
    karras_sigmas,
    spread,
)
from diffusion_apps.nn import UNet


def num_scales(step: int, total_steps: int, initial: int = 10, final: int = 1280) -> int:
    """iCT's discretisation curriculum (Song & Dhariwal 2023): N points at step k,
        N(k) = min(s_0·2^⌊k/K'⌋, s_1) + 1,   K' = ⌊K/(log₂⌊s_1/s_0⌋ + 1)⌋,
    doubling from s_0 + 1 to s_1 + 1 in equal stages over K steps."""
    stage = math.floor(total_steps / (math.log2(final // initial) + 1))  # K'
    return min(initial * 2 ** (step // stage), final) + 1


def lognormal_proposal(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """iCT's lognormal noise-level sampling: the probability of the interval i (σ_i, σ_{i+1}),
    i = 1, …, N − 1, of the discretisation ``sigmas`` (N,) is the lognormal mass between them,
        p(σ_i) ∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std))."""
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf.diff()
    return mass / mass.sum()


class ConsistencyTraining(ConsistencyModel):
    """A consistency model trained from data alone (no teacher), the iCT recipe.

    Noise levels: CT has no DDPM schedule to follow, so it uses EDM/CM's continuous σ on the
    Karras grid directly (σ_min = 0.002, σ_max = 80, ρ = 7:
    :func:`~diffusion_apps.methods.consistency_core.karras_sigmas`), rather than mapping it onto
    a discrete schedule's σ_t as CD must: iCT's curriculum ends at 1,281 points, finer than a
    T = 1000 schedule near σ_min, where nearest indices would collide.

    Consistency function: the shared c_skip/c_out parametrisation
    (:class:`~diffusion_apps.methods.consistency_core.ConsistencyModel`) with the UNet as EDM's
    raw network F_θ(c_in x̄, c_noise), c_in = 1/√(σ² + σ_d²), fed the noise level as
    c_noise = 1000·¼ ln σ (CM's official ``denoise``: ¼ ln σ is EDM's, the 1000 puts it on the
    scale of the sinusoidal timestep embedding). F is not an ε̂ here: its error reaches f
    multiplied by c_out ≤ σ_d, never by σ (CD's Precision note does not apply to the sampler;
    the fp32 of the shared core is for the 1/Δσ-weighted loss).

    Loss (Algorithm 3 with iCT): at optimiser step k the discretisation is the N(k) Karras points
    (:func:`num_scales`), i ~ p(σ_i) (:func:`lognormal_proposal`), z ~ N(0, I), and the SAME z
    gives both points,
        x̄_{σ_{i+1}} = x + σ_{i+1} z,   x̄_{σ_i} = x + σ_i z,
        L = λ(σ_i)·d(f_θ(x̄_{σ_{i+1}}, σ_{i+1}), f_{θ⁻}(x̄_{σ_i}, σ_i)),   λ(σ_i) = 1/(σ_{i+1} − σ_i),
    θ⁻ = stop-grad(θ) (no EMA target), d pseudo-Huber with c = 0.00054·√dim. iCT's optimiser
    settings and large batches are not followed: AdamW at the config's batch size. Sampling and the
    saved weights are the EMA callback's (iCT evaluates an EMA of θ, 0.99993 on CIFAR-10).

    Args:
        unet: F_θ; ``out_channels`` must equal ``in_channels``.
        total_steps: K of the curriculum: the run's optimiser steps (set it to
            ``trainer.max_steps``); past it N stays at s_1 + 1.
        initial_scales, final_scales: s_0 and s_1 of the curriculum (iCT: 10, 1280).
        sigma_min, sigma_max, rho: the Karras grid (iCT: 0.002, 80, 7).
        p_mean, p_std: the lognormal proposal (iCT: −1.1, 2.0).
        distance: d (iCT: pseudo-Huber).
        sigma_data: σ_d (0.5 for data in [−1, 1]).
        sample_steps: consistency steps of validation grids and of ``sample`` by default;
            multistep sampling spreads its points evenly over the final grid (s_1 + 1 points).
        num_val_samples: images in the validation grid.
        lr, weight_decay, warmup_steps, adam_betas, compile: see :class:`DiffusionMethod`.
    """

    def __init__(
        self,
        unet: UNet,
        total_steps: int,
        initial_scales: int = 10,
        final_scales: int = 1280,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        distance: Distance = "pseudo_huber",
        sigma_data: float = 0.5,
        sample_steps: int = 1,
        num_val_samples: int = 64,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        compile: bool = False,
    ) -> None:
        super().__init__(
            distance, sigma_data, sample_steps, num_val_samples, lr, weight_decay, warmup_steps,
            adam_betas, compile,
        )  # fmt: skip
        self.save_config()
        stages = math.log2(max(final_scales // max(initial_scales, 1), 1)) + 1
        for name, value, ok, need in [
            ("initial_scales", initial_scales, initial_scales >= 1, ">= 1"),
            ("final_scales", final_scales, final_scales >= initial_scales, ">= initial_scales"),
            ("total_steps", total_steps, total_steps >= stages, f">= {math.ceil(stages)} (the "
             "curriculum's stages)"),
            ("p_std", p_std, p_std > 0, "> 0"),
            ("rho", rho, rho > 0, "> 0"),
            ("unet.out_channels", unet.out_channels, unet.out_channels == unet.in_channels,
             f"= in_channels ({unet.in_channels})"),
        ]:  # fmt: skip
            if not ok:
                raise ValueError(f"{name} must be {need}, got {value!r}")
        karras_sigmas(sigma_min, sigma_max, 2, rho)  # names a bad sigma_min/sigma_max now
        self.unet = unet
        self.total_steps, self.initial_scales, self.final_scales = (
            total_steps, initial_scales, final_scales,
        )  # fmt: skip
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.p_mean, self.p_std = p_mean, p_std

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.unet.sample_shape

    @property
    def sampling_network(self) -> UNet:
        return self.unet

    # -- the consistency function ----------------------------------------------------------------

    def _sigma(self, sigma: Tensor, like: Tensor) -> Tensor:
        return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def raw(self, net: UNet, x_bar: Tensor, sigma: Tensor) -> Tensor:
        """F_θ(c_in x̄, c_noise), c_in = 1/√(σ² + σ_d²), c_noise = 250 ln σ."""
        c_in = (self._sigma(sigma, x_bar) ** 2 + self.sigma_data**2).rsqrt()
        return net(c_in * x_bar, 250.0 * sigma.float().log()).float()

    def discretisation(self, step: int) -> Tensor:
        """The N(k) Karras points σ_1 < … < σ_N (float64) of optimiser step k."""
        n = num_scales(step, self.total_steps, self.initial_scales, self.final_scales)
        return karras_sigmas(self.sigma_min, self.sigma_max, n, self.rho)

    # -- training ----------------------------------------------------------------------------------

    def consistency_loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The iCT loss of a batch x0 (B, C, H, W) at the current step's discretisation, one i
        and z per example (see the class docstring)."""
        sigmas = self.discretisation(self.global_step).to(x0.device)
        probs = lognormal_proposal(sigmas, self.p_mean, self.p_std)
        i = torch.multinomial(probs, x0.shape[0], replacement=True, generator=generator)
        sigma_now, sigma_next = sigmas[i], sigmas[i + 1]  # (B,) float64
        weight = (sigma_next - sigma_now).reciprocal().float()  # λ(σ_i)
        sigma_now, sigma_next = sigma_now.float(), sigma_next.float()
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        x0 = x0.float()
        with torch.no_grad():  # θ⁻ = stop-grad(θ)
            target = self.consistency(self.unet, x0 + self._sigma(sigma_now, x0) * z, sigma_now)
        online = self.consistency(self.unet, x0 + self._sigma(sigma_next, x0) * z, sigma_next)
        return (weight * self.distance_fn(online, target)).mean()

    # -- sampling ----------------------------------------------------------------------------------

    def sampling_points(self, steps: int) -> Tensor:
        """The S noise levels of multistep sampling, evenly spread over the final grid of s_1 + 1
        Karras points (:func:`~diffusion_apps.methods.consistency_core.spread`), σ_max first."""
        grid = karras_sigmas(self.sigma_min, self.sigma_max, self.final_scales + 1, self.rho)
        return grid[spread(len(grid), steps)].float().to(self.device)

    @property
    def max_sample_steps(self) -> int:
        return self.final_scales
