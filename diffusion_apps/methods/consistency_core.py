"""What consistency distillation and consistency training share (Song et al., ICML 2023): the
parametrisation with its boundary condition, the distance, the Karras discretisation and
multistep consistency sampling (Algorithm 1)."""

from __future__ import annotations

import math
import typing
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_apps.methods.base import DiffusionMethod
from diffusion_apps.methods.protocol import Generation, SampleRequest

Distance = Literal["l2", "pseudo_huber"]


def karras_sigmas(sigma_min: float, sigma_max: float, num_scales: int, rho: float = 7.0) -> Tensor:
    """The N noise levels σ_1 < … < σ_N of Karras et al. (EDM eq. 5, CM's discretisation):
        σ_i = (σ_min^{1/ρ} + (i − 1)/(N − 1)·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ,
    in float64."""
    if num_scales < 2:
        raise ValueError(f"num_scales must be >= 2, got {num_scales}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.linspace(lo, hi, num_scales, dtype=torch.float64) ** rho


def spread(num_points: int, steps: int) -> list[int]:
    """Positions (0-based, descending) of the S points of multistep sampling among N increasing
    points: n_k = N − ⌊k(N − 1)/S⌋ (1-based n), k < S, from the noisiest point down, evenly
    spread, never the first point (σ_min, where f is the identity); S ≤ N − 1."""
    if not 1 <= steps < num_points:
        raise ValueError(f"consistency steps must be in [1, {num_points - 1}], got {steps}")
    return [num_points - 1 - k * (num_points - 1) // steps for k in range(steps)]


class ConsistencyModel(DiffusionMethod):
    """A consistency function f_θ(x̄, σ) of the variance-exploding PF-ODE x̄_σ = x_0 + σ z, with
    the boundary condition f_θ(x̄, σ_min) = x̄ (CM, Appendix C):
        f_θ(x̄, σ) = c_skip(σ) x̄ + c_out(σ) F_θ(x̄, σ),
        c_skip = σ_d²/((σ − σ_min)² + σ_d²),   c_out = σ_d (σ − σ_min)/√(σ² + σ_d²).

    A subclass says where a noise level lives (a "point": CD's index t into a DDPM schedule,
    CT's σ itself) with :meth:`_sigma`, what F_θ is with :meth:`raw`, which points multistep
    sampling visits with :meth:`sampling_points`, and what it trains with
    :meth:`consistency_loss`; it sets ``sigma_min``.

    Precision: every network call runs in fp32, under mixed precision too. CD's x̂_0 = x̄ − σ ε̂
    multiplies ε̂'s rounding by σ; CT's loss compares f at two noise levels Δσ apart and weights
    it by 1/Δσ (up to ~10⁴ late in the curriculum), so bf16's rounding (2⁻⁸) would outweigh
    the difference it learns from.

    Args:
        distance: d, the squared L2 distance (mean over pixels) or the pseudo-Huber
            √(‖·‖² + c²) − c, c = 0.00054·√dim (Song & Dhariwal 2023).
        sigma_data: σ_d.
        sample_steps: consistency steps of validation grids and of ``sample`` by default.
        num_val_samples: images in the validation grid.
        lr, weight_decay, warmup_steps, adam_betas, compile: see :class:`DiffusionMethod`.
    """

    sampler = "consistency"
    sigma_min: float

    def __init__(
        self,
        distance: Distance,
        sigma_data: float,
        sample_steps: int,
        num_val_samples: int,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        adam_betas: tuple[float, float],
        compile: bool,
    ) -> None:
        super().__init__(lr, weight_decay, warmup_steps, adam_betas, compile)
        for name, value, ok in [
            ("distance", distance, distance in typing.get_args(Distance)),
            ("sigma_data", sigma_data, sigma_data > 0),
            ("sample_steps", sample_steps, sample_steps >= 1),
        ]:
            if not ok:
                raise ValueError(f"{name}: {value!r} is not allowed")
        self.distance, self.sigma_data = distance, sigma_data
        self.sample_steps, self.num_val_samples = sample_steps, num_val_samples

    # -- what a subclass says ------------------------------------------------------------------

    def _sigma(self, point: Tensor, like: Tensor) -> Tensor:
        """σ at ``point`` (B,), shaped (B, 1, …) to broadcast against ``like``, in its dtype."""
        raise NotImplementedError

    def raw(self, net: nn.Module, x_bar: Tensor, point: Tensor) -> Tensor:
        """F_θ(x̄, σ) of ``net`` (fp32 in, fp32 out)."""
        raise NotImplementedError

    def sampling_points(self, steps: int) -> Tensor:
        """The (S,) points multistep sampling visits, noisiest first."""
        raise NotImplementedError

    @property
    def max_sample_steps(self) -> int:
        """The most consistency steps :meth:`sampling_points` takes."""
        raise NotImplementedError

    @property
    def sampling_network(self) -> nn.Module:
        """The network whose f_θ samples (CD's student, CT's UNet)."""
        raise NotImplementedError

    def consistency_loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The loss of a batch x0 (B, C, H, W), every random number from ``generator``."""
        raise NotImplementedError

    # -- the consistency function and the distance ---------------------------------------------

    def consistency(self, net: nn.Module, x_bar: Tensor, point: Tensor) -> Tensor:
        """f(x̄, σ) = c_skip x̄ + c_out F of ``net``, in fp32 (see the class docstring)."""
        with torch.autocast(x_bar.device.type, enabled=False):
            x_bar = x_bar.float()
            sigma, sd = self._sigma(point, x_bar), self.sigma_data
            c_skip = sd**2 / ((sigma - self.sigma_min) ** 2 + sd**2)
            c_out = sd * (sigma - self.sigma_min) / (sigma**2 + sd**2).sqrt()
            return c_skip * x_bar + c_out * self.raw(net, x_bar, point)

    def distance_fn(self, a: Tensor, b: Tensor) -> Tensor:
        """d(a_i, b_i) per example (B,): ‖a − b‖²/dim (``l2``) or √(‖a − b‖² + c²) − c with
        c = 0.00054·√dim (``pseudo_huber``)."""
        sq = (a - b).square().flatten(1)
        if self.distance == "l2":
            return sq.mean(1)
        c = 0.00054 * math.sqrt(sq.shape[1])
        return (sq.sum(1) + c**2).sqrt() - c

    # -- training ----------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = self.consistency_loss(batch[0])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        gen = torch.Generator(self.device).manual_seed(batch_idx)
        loss = self.consistency_loss(batch[0], gen)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if batch_idx == 0 and self.num_val_samples > 0 and self.trainer.is_global_zero:
            for steps in sorted({1, min(2, self.max_sample_steps), self.sample_steps}):
                gen = torch.Generator(self.device).manual_seed(0)
                self.log_images(
                    f"samples ({steps} step)",
                    self.sample(self.num_val_samples, steps=steps, generator=gen),
                )

    # -- sampling (Algorithm 1) --------------------------------------------------------------------

    @property
    def generation(self) -> Generation:
        """Unconditional samples of multistep consistency sampling, one network call a step."""
        return Generation(
            ("consistency",), "consistency", self.sample_steps, options=(),
            max_steps=self.max_sample_steps,
            note="Consistency rows: the EMA weights, in fp32 whatever the network precision "
            "(CD's x̂_0 = x̄ − σ ε̂ would multiply bf16 rounding by σ); NFE = consistency steps.",
        )  # fmt: skip

    def generate(self, num_samples: int, request: SampleRequest) -> Tensor:
        """Samples in [−1, 1] (Algorithm 1): x̄ = σ_{τ_1} z, x = f_θ(x̄, τ_1); then for each later
        point τ_k, x̄ = x + √(σ_{τ_k}² − σ_min²) z and x = f_θ(x̄, τ_k), clamped to [−1, 1]."""
        x = None
        for point in self.sampling_points(request.steps or self.sample_steps):
            z = torch.randn(
                (num_samples, *self.sample_shape), generator=request.generator, device=self.device
            )
            points = point.expand(num_samples)
            sigma = self._sigma(points, z)
            x_bar = z * sigma if x is None else x + z * (sigma**2 - self.sigma_min**2).sqrt()
            x = self.consistency(self.sampling_network, x_bar, points).clamp(-1, 1)
        return x
