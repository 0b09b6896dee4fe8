"""Consistency distillation (Song et al., ICML 2023, Algorithm 2) of a trained DDPM; one-step
and multistep sampling (Algorithm 1) and the parametrisation are the shared
:class:`~diffusion_apps.methods.consistency_core.ConsistencyModel`'s."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor

from diffusion_apps.methods.consistency_core import (
    ConsistencyModel,
    Distance,
    karras_sigmas,
    spread,
)
from diffusion_apps.methods.ddpm import DDPM

TeacherSolver = Literal["ddim", "heun"]


def karras_timesteps(sigmas: Tensor, num_scales: int, rho: float = 7.0) -> Tensor:
    """The discretisation t_1 < … < t_N of a discrete schedule with noise levels ``sigmas``
    (σ_t, increasing in t): the indices nearest (in log σ) to the Karras et al. points
    (:func:`~diffusion_apps.methods.consistency_core.karras_sigmas`, ρ = 7) with
    σ_min = σ_0 and σ_max the last σ given; repeats dropped (int64, at most N)."""
    log_sigma = sigmas.detach().cpu().double().log()
    lo, hi = log_sigma[[0, -1]].exp().tolist()
    wanted = karras_sigmas(lo, hi, num_scales, rho).log()
    return (log_sigma[None, :] - wanted[:, None]).abs().argmin(1).unique()


class ConsistencyDistillation(ConsistencyModel):
    """A consistency model f_θ distilled from a frozen DDPM teacher ε̂_φ.

    The teacher's discrete schedule in variance-exploding form: σ_t = √((1 − ᾱ_t)/ᾱ_t) and
    x̄ = x_t/√ᾱ_t = x_0 + σ_t ε, so the probability-flow ODE is dx̄/dσ = ε̂_φ(x_t, t), and one
    DDIM (η = 0) step from t_{n+1} to t_n is exactly its Euler step,
        x̂_{t_n} = x̄_{t_{n+1}} + (σ_{t_n} − σ_{t_{n+1}}) ε̂_φ(x_{t_{n+1}}, t_{n+1});
    ``heun`` adds the trapezoidal correction with ε̂_φ at that Euler point (CM's EDM teacher).

    Consistency function: :class:`~diffusion_apps.methods.consistency_core.ConsistencyModel`'s
    f_θ(x̄, σ) = c_skip(σ) x̄ + c_out(σ) F_θ(x̄, σ) with σ_min = σ_{t_1} (t_1 = 0), σ_d = 0.5.
    F_θ is the student UNet, initialised from the teacher's and read as EDM's raw network: the
    teacher's x̂_0 = x̄ − σ ε̂ is EDM's denoiser c_skip x̄ + c_out F at σ_min = 0, so
        F_θ = (σ x̄/√(σ² + σ_d²) − √(σ² + σ_d²) ε̂_θ)/σ_d,
    and at initialisation f_θ is the teacher's x̂_0 (as with CM's EDM teacher, whose F the
    student copies).

    Loss (Algorithm 2, λ ≡ 1): n ~ U{1, …, N − 1}, z ~ N(0, I), x̄_{t_{n+1}} = x_0 + σ_{t_{n+1}} z,
        L = d(f_θ(x̄_{t_{n+1}}, σ_{t_{n+1}}), f_θ⁻(x̂_{t_n}, σ_{t_n})),
    with the target network θ⁻ ← μ θ⁻ + (1 − μ) θ after each optimiser step; d is the squared
    L2 distance (mean over pixels) or the pseudo-Huber √(‖·‖² + c²) − c, c = 0.00054·√dim (Song
    & Dhariwal 2023). LPIPS, CM's best d, needs weights we cannot download.

    Precision: x̂_0 = x̄ − σ ε̂ multiplies ε̂'s rounding by σ (157 at t = 999 of DDPM's schedule),
    and bf16 rounds ε̂ ≈ x_t to 2⁻⁸ (an error of 0.35 in the teacher's x̂_0 at t = 999): every
    network call here runs in fp32, under mixed precision too (teacher steps included).

    Args:
        teacher: path of a trained (unconditional, pixel-space) DDPM checkpoint, read with
            ``weights_only=True``; its config and weights are saved in this module's checkpoints.
        num_scales: N, discretisation points (CM on CIFAR-10: 18).
        max_timestep: t_N, the noisiest point, where one-step sampling starts from x̄ = σ_{t_N} z
            (default T − 1). Below T − 1 it trades a small prior mismatch (x̄ = x_0 + σ z drawn
            as σ z, off by x_0/σ) for less amplification of the student's ε̂ error by σ (see
            Precision); EDM and CM stop at σ = 80.
        teacher_solver: the ODE step of the teacher between adjacent points.
        distance: d.
        target_decay: μ of the target network θ⁻ (CM's CD: 0.95).
        sigma_data: σ_d.
        sample_steps: consistency steps of validation grids and of ``sample`` by default.
        num_val_samples: images in the validation grid.
        lr, weight_decay, warmup_steps, adam_betas, compile: see :class:`DiffusionMethod`.
    """

    timesteps: Tensor
    sigmas: Tensor

    def __init__(
        self,
        teacher: str,
        num_scales: int = 18,
        max_timestep: int | None = None,
        teacher_solver: TeacherSolver = "heun",
        distance: Distance = "pseudo_huber",
        target_decay: float = 0.95,
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
        for name, value, ok in [
            ("teacher_solver", teacher_solver, teacher_solver in ("ddim", "heun")),
            ("target_decay", target_decay, 0 <= target_decay < 1),
        ]:
            if not ok:
                raise ValueError(f"{name}: {value!r} is not allowed")
        self.teacher = self.load_part(teacher, DDPM)
        if type(self.teacher) is not DDPM:
            raise ValueError(
                f"{teacher}: consistency distillation takes an unconditional pixel-space DDPM "
                f"checkpoint, not a {type(self.teacher).__name__}"
            )
        self.student = copy.deepcopy(self.teacher).requires_grad_(True).train()
        self.target = copy.deepcopy(self.teacher)  # θ⁻, frozen, moved by EMA
        schedule = self.teacher.schedule
        T = schedule.num_timesteps
        t_max = T - 1 if max_timestep is None else max_timestep
        if not 0 < t_max < T:
            raise ValueError(f"max_timestep must be in [1, {T - 1}] (the teacher's T = {T})")
        sigmas = schedule.snr(torch.arange(T)).rsqrt()  # σ_t = √((1 − ᾱ_t)/ᾱ_t), t ∈ [0, T)
        ts = karras_timesteps(sigmas[: t_max + 1], num_scales)
        self.register_buffer("timesteps", ts, persistent=False)  # t_1 < … < t_N
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.sigma_min = float(sigmas[ts[0]])
        self.teacher_solver, self.target_decay = teacher_solver, target_decay

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.teacher.sample_shape

    def networks(self):
        return [self.student]

    @property
    def sampling_network(self) -> DDPM:
        return self.student

    # -- the consistency function ----------------------------------------------------------------

    def _sigma(self, t: Tensor, like: Tensor) -> Tensor:
        return self.sigmas[t].reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def _eps(self, net: DDPM, x_bar: Tensor, t: Tensor) -> Tensor:
        """ε̂ of ``net`` at x_t = x̄/√(1 + σ_t²) (= √ᾱ_t x̄), in fp32."""
        with torch.autocast(x_bar.device.type, enabled=False):
            return net.eps(x_bar.float() * (1 + self._sigma(t, x_bar) ** 2).rsqrt(), t)

    def raw(self, net: DDPM, x_bar: Tensor, t: Tensor) -> Tensor:
        """F = (σ x̄/√(σ² + σ_d²) − √(σ² + σ_d²) ε̂)/σ_d with ``net``'s ε̂ (class docstring)."""
        sigma, sd = self._sigma(t, x_bar), self.sigma_data
        norm = (sigma**2 + sd**2).sqrt()
        return (sigma * x_bar / norm - norm * self._eps(net, x_bar, t)) / sd

    @torch.no_grad()
    def teacher_step(self, x_bar: Tensor, t_from: Tensor, t_to: Tensor) -> Tensor:
        """x̂_{t_n} from x̄_{t_{n+1}}: one DDIM (Euler) or Heun step of the teacher's ODE."""
        d_sigma = self._sigma(t_to, x_bar) - self._sigma(t_from, x_bar)
        slope = self._eps(self.teacher, x_bar, t_from)
        euler = x_bar + d_sigma * slope
        if self.teacher_solver == "ddim":
            return euler
        return x_bar + d_sigma * (slope + self._eps(self.teacher, euler, t_to)) / 2

    # -- training ----------------------------------------------------------------------------------

    def consistency_loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The CD loss of a batch x0 (B, C, H, W), one n and z per example."""
        ts = self.timesteps
        n = torch.randint(0, len(ts) - 1, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t_next, t_now = ts[n + 1], ts[n]
        x_next = x0 + self._sigma(t_next, x0) * noise
        x_now = self.teacher_step(x_next, t_next, t_now)
        with torch.no_grad():
            target = self.consistency(self.target, x_now, t_now)
        return self.distance_fn(self.consistency(self.student, x_next, t_next), target).mean()

    def optimizer_step(self, *args, **kwargs) -> None:
        """The step of θ, then θ⁻'s: here rather than at batch end, where the checkpoint
        callbacks run first and would save a θ⁻ one update behind (a resume would diverge)."""
        super().optimizer_step(*args, **kwargs)
        self.update_target()

    def update_target(self) -> None:
        """θ⁻ ← μ θ⁻ + (1 − μ) θ."""
        with torch.no_grad():
            target, student = list(self.target.parameters()), list(self.student.parameters())
            torch._foreach_lerp_(target, student, 1 - self.target_decay)

    # -- sampling ----------------------------------------------------------------------------------

    def sampling_points(self, steps: int) -> Tensor:
        """The S timesteps t_{n_k} of multistep sampling, evenly spread over the discretisation
        the model was trained at (:func:`~diffusion_apps.methods.consistency_core.spread`)."""
        return self.timesteps[spread(len(self.timesteps), steps)]

    @property
    def max_sample_steps(self) -> int:
        return len(self.timesteps) - 1
