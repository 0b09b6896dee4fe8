"""Consistency distillation (Song et al., ICML 2023, Algorithm 2) of a trained DDPM, and one-step
and multistep consistency sampling (Algorithm 1)."""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from torch import Tensor

from diffusion_apps.methods.base import DiffusionMethod
from diffusion_apps.methods.ddpm import DDPM
from diffusion_apps.methods.protocol import Generation, SampleRequest

TeacherSolver = Literal["ddim", "heun"]
Distance = Literal["l2", "pseudo_huber"]


def karras_timesteps(sigmas: Tensor, num_scales: int, rho: float = 7.0) -> Tensor:
    """The discretisation t_1 < … < t_N of a discrete schedule with noise levels ``sigmas``
    (σ_t, increasing in t): the indices nearest (in log σ) to the Karras et al. points
    σ_i = (σ_min^{1/ρ} + (i−1)/(N−1)·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ (CM's choice, ρ = 7), with
    σ_min = σ_0 and σ_max the last σ given; repeats dropped (int64, at most N)."""
    if num_scales < 2:
        raise ValueError(f"num_scales must be >= 2, got {num_scales}")
    log_sigma = sigmas.detach().cpu().double().log()
    lo, hi = (log_sigma[[0, -1]] / rho).exp().tolist()
    wanted = torch.linspace(lo, hi, num_scales, dtype=torch.float64).log() * rho
    return (log_sigma[None, :] - wanted[:, None]).abs().argmin(1).unique()


class ConsistencyDistillation(DiffusionMethod):
    """A consistency model f_θ distilled from a frozen DDPM teacher ε̂_φ.

    The teacher's discrete schedule in variance-exploding form: σ_t = √((1 − ᾱ_t)/ᾱ_t) and
    x̄ = x_t/√ᾱ_t = x_0 + σ_t ε, so the probability-flow ODE is dx̄/dσ = ε̂_φ(x_t, t), and one
    DDIM (η = 0) step from t_{n+1} to t_n is exactly its Euler step,
        x̂_{t_n} = x̄_{t_{n+1}} + (σ_{t_n} − σ_{t_{n+1}}) ε̂_φ(x_{t_{n+1}}, t_{n+1});
    ``heun`` adds the trapezoidal correction with ε̂_φ at that Euler point (CM's EDM teacher).

    Consistency function, with the boundary condition f_θ(x̄, σ_min) = x̄ (CM, Appendix C):
        f_θ(x̄, σ) = c_skip(σ) x̄ + c_out(σ) F_θ(x̄, σ),
        c_skip = σ_d²/((σ − σ_min)² + σ_d²),   c_out = σ_d (σ − σ_min)/√(σ² + σ_d²),
    σ_d = 0.5, σ_min = σ_{t_1} (t_1 = 0). F_θ is the student UNet, initialised from the teacher's
    and read as EDM's raw network: the teacher's x̂_0 = x̄ − σ ε̂ is EDM's denoiser c_skip x̄ +
    c_out F at σ_min = 0, so
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
    network call here runs in fp32, under mixed precision too.

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

    sampler = "consistency"
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
        super().__init__(lr, weight_decay, warmup_steps, adam_betas, compile)
        self.save_config()
        for name, value, ok in [
            ("teacher_solver", teacher_solver, teacher_solver in ("ddim", "heun")),
            ("distance", distance, distance in ("l2", "pseudo_huber")),
            ("target_decay", target_decay, 0 <= target_decay < 1),
            ("sigma_data", sigma_data, sigma_data > 0),
            ("sample_steps", sample_steps, sample_steps >= 1),
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
        self.teacher_solver, self.distance = teacher_solver, distance
        self.target_decay, self.sigma_data = target_decay, sigma_data
        self.sample_steps, self.num_val_samples = sample_steps, num_val_samples

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.teacher.sample_shape

    def networks(self):
        return [self.student]

    # -- the consistency function ----------------------------------------------------------------

    def _sigma(self, t: Tensor, like: Tensor) -> Tensor:
        return self.sigmas[t].reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def _eps(self, net: DDPM, x_bar: Tensor, t: Tensor) -> Tensor:
        """ε̂ of ``net`` at x_t = x̄/√(1 + σ_t²) (= √ᾱ_t x̄), in fp32."""
        with torch.autocast(x_bar.device.type, enabled=False):
            return net.eps(x_bar.float() * (1 + self._sigma(t, x_bar) ** 2).rsqrt(), t)

    def consistency(self, net: DDPM, x_bar: Tensor, t: Tensor) -> Tensor:
        """f(x̄, σ_t) = c_skip x̄ + c_out F with ``net``'s ε̂ (see the class docstring)."""
        sigma, sd = self._sigma(t, x_bar), self.sigma_data
        norm = (sigma**2 + sd**2).sqrt()
        raw = (sigma * x_bar / norm - norm * self._eps(net, x_bar, t)) / sd  # F
        c_skip = sd**2 / ((sigma - self.sigma_min) ** 2 + sd**2)
        c_out = sd * (sigma - self.sigma_min) / norm
        return c_skip * x_bar + c_out * raw

    @torch.no_grad()
    def teacher_step(self, x_bar: Tensor, t_from: Tensor, t_to: Tensor) -> Tensor:
        """x̂_{t_n} from x̄_{t_{n+1}}: one DDIM (Euler) or Heun step of the teacher's ODE."""
        d_sigma = self._sigma(t_to, x_bar) - self._sigma(t_from, x_bar)
        slope = self._eps(self.teacher, x_bar, t_from)
        euler = x_bar + d_sigma * slope
        if self.teacher_solver == "ddim":
            return euler
        return x_bar + d_sigma * (slope + self._eps(self.teacher, euler, t_to)) / 2

    def distance_fn(self, a: Tensor, b: Tensor) -> Tensor:
        """Mean over the batch of d(a, b): ‖a − b‖²/dim (``l2``) or √(‖a − b‖² + c²) − c with
        c = 0.00054·√dim (``pseudo_huber``)."""
        if self.distance == "l2":
            return (a - b).square().mean()
        c = 0.00054 * math.sqrt(a[0].numel())
        return ((a - b).square().flatten(1).sum(1) + c**2).sqrt().sub(c).mean()

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
        return self.distance_fn(self.consistency(self.student, x_next, t_next), target)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = self.consistency_loss(batch[0])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

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

    def validation_step(self, batch, batch_idx: int) -> None:
        gen = torch.Generator(self.device).manual_seed(batch_idx)
        loss = self.consistency_loss(batch[0], gen)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if batch_idx == 0 and self.num_val_samples > 0 and self.trainer.is_global_zero:
            for steps in sorted({1, 2, self.sample_steps}):
                gen = torch.Generator(self.device).manual_seed(0)
                self.log_images(
                    f"samples ({steps} step)",
                    self.sample(self.num_val_samples, steps=steps, generator=gen),
                )

    # -- sampling ----------------------------------------------------------------------------------

    def sampling_timesteps(self, steps: int) -> list[int]:
        """The S points of multistep sampling: t_{n_k} with n_k = N − ⌊k(N − 1)/S⌋, k < S (1-based
        n; S ≤ N − 1), evenly spread over the discretisation the model was trained at, from
        t_N down, above σ_min (where f is the identity)."""
        N = len(self.timesteps)
        if not 1 <= steps < N:
            raise ValueError(f"consistency steps must be in [1, {N - 1}], got {steps}")
        return [int(self.timesteps[N - 1 - k * (N - 1) // steps]) for k in range(steps)]

    @property
    def generation(self) -> Generation:
        """Unconditional samples of multistep consistency sampling, one network call a step."""
        return Generation(
            ("consistency",), "consistency", self.sample_steps, options=(),
            max_steps=len(self.timesteps) - 1,
            note="Consistency rows: the student's EMA weights, in fp32 whatever the network "
            "precision (x̂_0 = x̄ − σ ε̂ would multiply bf16 rounding by σ); NFE = consistency steps.",
        )  # fmt: skip

    def generate(self, num_samples: int, request: SampleRequest) -> Tensor:
        """Samples in [−1, 1] (Algorithm 1): x̄ = σ_{τ_1} z, x = f_θ(x̄, τ_1); then for each later
        point τ_k, x̄ = x + √(σ_{τ_k}² − σ_min²) z and x = f_θ(x̄, τ_k), clamped to [−1, 1]."""
        steps, generator = request.steps, request.generator
        points = self.sampling_timesteps(steps or self.sample_steps)
        x = None
        for t in points:
            z = torch.randn(
                (num_samples, *self.sample_shape), generator=generator, device=self.device
            )
            tt = torch.full((num_samples,), t, device=self.device, dtype=torch.long)
            sigma = float(self.sigmas[t])
            x_bar = z * sigma if x is None else x + z * math.sqrt(sigma**2 - self.sigma_min**2)
            x = self.consistency(self.student, x_bar, tt).clamp(-1, 1)
        return x
