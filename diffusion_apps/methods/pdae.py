"""PDAE (Zhang et al., NeurIPS 2022; official code ckczzj/PDAE): an autoencoder from a frozen
pretrained DDPM.

The unconditional ε_θ(x_t, t) stays fixed (a DDPM that predicts x0 or v is converted to ε:
the method needs the score, not the parametrisation). An encoder z = E_φ(x_0) and a gradient
estimator G_ψ(x_t, z, t) learn the gap between the unconditional and the z-conditional
posterior mean, a learned classifier guidance; decoding and inversion are DDIM through the
diffusion layer's ε-shift guidance wrapper.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_apps.checkpoint import load_part
from diffusion_apps.diffusion import (
    EpsFn,
    NoiseSchedule,
    convert_prediction,
    eps_shift_guidance,
)
from diffusion_apps.diffusion.schedule import per_sample
from diffusion_apps.methods.ddpm import DDPM
from diffusion_apps.methods.diffusion_autoencoder import Codes, DiffusionAutoencoder
from diffusion_apps.methods.protocol import Autoencoding
from diffusion_apps.nn import EncoderUNet, GradientEstimator, UNet
from diffusion_apps.nn.unet import DownFeatures


def shift_coefficient(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """c_t = −√α_t (1 − ᾱ_{t−1}) / √(1 − ᾱ_t), shape (B,): the ε shift that moves the posterior
    mean μ_θ by Σ_t·G with Σ_t = β̃_t (PDAE eq. 9; 0 at t = 0, where ᾱ_{−1} = 1)."""
    alpha_bar, alpha_bar_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod_prev[t]
    alpha = alpha_bar / alpha_bar_prev
    return -alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar).sqrt()


def loss_weight(schedule: NoiseSchedule, t: Tensor, gamma: float = 0.1) -> Tensor:
    """λ_t = SNR_t^γ / (1 + SNR_t), SNR_t = ᾱ_t/(1 − ᾱ_t), shape (B,) (PDAE's weighting)."""
    snr = schedule.snr(t)
    return snr.pow(gamma) / (1 + snr)


class PDAE(DiffusionAutoencoder, DDPM):
    """PDAE's objective on a frozen DDPM ε_θ (PDAE eq. 10, with the official weighting):

        L(φ, ψ) = E_{x_0, t, ε} λ_t ‖ε − (ε_θ(x_t, t) + c_t·G_ψ(x_t, E_φ(x_0), t))‖²,
        x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε,   c_t, λ_t: :func:`shift_coefficient`, :func:`loss_weight`,

    the squared error averaged over pixels, then weighted per sample and averaged over the batch.
    Only E_φ and G_ψ train; the DDPM's UNet runs without gradients in eval mode.

    Inference (:class:`DiffusionAutoencoder`) decodes and inverts with DDIM on
        ε' = ε_θ(x_t, t) − √(1−ᾱ_t)·G_ψ(x_t, z, t)
    (classifier guidance's Algorithm 2 form, as the official code samples), built by
    :func:`~diffusion_apps.diffusion.eps_shift_guidance`. ε_θ and G_ψ share the frozen down path:
    it runs once per step. :meth:`interpolate_trajectory` mixes the G of two codes.

    Latent samples (:class:`~diffusion_apps.methods.LatentDDIM`) decode with the shift off for
    the last low-noise steps, as the official code does (``unshifted_fraction`` of
    :meth:`decode`; configs/pdae_latent.yaml sets its 0.3).

    Difference from the official code: x̂_0 is not clamped while decoding (``clip_x0``, as in
    our DiffAE: decoding then inverts the unclamped DDIM encoder).

    Args:
        encoder: E_φ, built with ``time_conditioned=False`` (512-d in the paper).
        ddpm: path of the pretrained DDPM checkpoint (ours, any prediction, unconditional UNet;
            read with ``weights_only=True``). Its config and weights are saved in this module's
            checkpoints, which therefore load without that file. Its schedule is used.
        gamma: γ of λ_t (the paper: 0.1).
        dropout: dropout in G_ψ (default: the DDPM UNet's).
        encode_steps: DDIM steps of the stochastic encoder (the paper: 1000 for autoencoding).
        Other arguments: see :class:`DDPM`; the sampler is always DDIM.
    """

    autoencoding = Autoencoding(True, (*DiffusionAutoencoder.autoencoding.modes, "trajectory"))

    def __init__(
        self,
        encoder: EncoderUNet,
        ddpm: str,
        gamma: float = 0.1,
        dropout: float | None = None,
        sample_steps: int = 100,
        encode_steps: int = 100,
        clip_x0: bool = False,
        num_val_samples: int = 8,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        compile: bool = False,
    ) -> None:
        if encoder.time_conditioned:
            raise ValueError("PDAE's encoder must be built with time_conditioned=False")
        if encode_steps < 1:
            raise ValueError(f"encode_steps must be >= 1, got {encode_steps}")
        pretrained = load_part(ddpm, DDPM)
        unet = pretrained.unet
        if not isinstance(unet, UNet) or (unet.num_classes, unet.cond_dim, unet.context_dim) != (
            None, None, None
        ):  # fmt: skip
            raise ValueError(
                f"ddpm={ddpm!r} holds a {type(pretrained).__name__} whose network is not an "
                "unconditional UNet: PDAE builds on a plain DDPM (configs/ddpm.yaml)"
            )
        if (encoder.in_channels, encoder.image_size) != (unet.in_channels, unet.image_size):
            raise ValueError("the encoder and the DDPM's UNet must take the same images")
        super().__init__(
            unet.requires_grad_(False), schedule=pretrained.schedule,
            prediction=pretrained.prediction,
            sampler="ddim", sample_steps=sample_steps, eta=0.0,
            timestep_spacing=pretrained.timestep_spacing, variance="beta", clip_x0=clip_x0,
            num_val_samples=num_val_samples, loss="mse", lr=lr, weight_decay=weight_decay,
            warmup_steps=warmup_steps, adam_betas=adam_betas, compile=compile,
        )  # fmt: skip
        self._parts[str(ddpm)] = pretrained  # its config goes into our checkpoints
        self.encoder = encoder
        self.estimator = GradientEstimator(unet, encoder.out_dim, dropout)
        self.gamma, self.encode_steps = gamma, encode_steps

    def diffusion_loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """L(φ, ψ) for a batch x0 (B, C, H, W), t and ε drawn from ``generator`` when given."""
        t, noise, x_t = self.noised(x0, generator)
        with torch.no_grad():
            features = self.unet.down_features(x_t, t)
            eps = self.eps_from(features, x_t, t)
        shift = self.estimator(features, self.encoder(x0))
        c = per_sample(shift_coefficient(self.schedule, t), x0)
        error = (noise - (eps + c * shift.float())).square().flatten(1).mean(1)
        return (loss_weight(self.schedule, t, self.gamma) * error).mean()

    def eps_from(self, features: DownFeatures, x_t: Tensor, t: Tensor) -> Tensor:
        """ε_θ(x_t, t) in fp32 from the frozen UNet's down-path ``features``: its up path's
        output, converted from the DDPM's parametrisation (ε, x0 or v)."""
        out = self.unet.up_from(features).float()
        return convert_prediction(self.schedule, self.prediction, x_t, t, out, "eps")

    def code_eps(
        self, mix: float | None = None, decoding: bool = False, shift_from: int = 0
    ) -> EpsFn:
        """ε'(x_t, t, z) = ε_θ(x_t, t) − √(1−ᾱ_t)·G_ψ(x_t, z, t) at t ≥ ``shift_from``, ε_θ alone
        below it. With ``mix`` = w the eps takes a second code ``z_b`` and
        G = (1 − w)·G_ψ(x_t, z, t) + w·G_ψ(x_t, z_b, t) (PDAE's trajectory interpolation).
        ``decoding`` with ``clip_x0``: ε_θ's x̂_0 is clamped before the shift, as classifier
        guidance does in guided-diffusion."""
        last: dict = {}

        def features(x_t: Tensor, t: Tensor):
            # The wrapper calls eps then shift on the same (x_t, t): one down pass serves both.
            if last.get("x") is not x_t or last.get("t") is not t:
                last.update(x=x_t, t=t, f=self.unet.down_features(x_t, t))
            return last["f"]

        def eps(x_t: Tensor, t: Tensor, **_) -> Tensor:
            return self.eps_from(features(x_t, t), x_t, t)

        def shift(x_t: Tensor, t: Tensor, z: Tensor, z_b: Tensor | None = None) -> Tensor:
            g = self.estimator(features(x_t, t), z).float()
            if mix is None:
                return g
            return torch.lerp(g, self.estimator(features(x_t, t), z_b).float(), mix)

        unshifted = self.sampling_eps(eps) if decoding else eps
        shifted = eps_shift_guidance(unshifted, shift, self.schedule)
        if not shift_from:
            return shifted

        def switched(x_t: Tensor, t: Tensor, **cond) -> Tensor:
            on = t >= shift_from
            if not (on.all() or not on.any()):  # a sampler's call has one t for all samples
                raise ValueError(f"t {t.tolist()} lies on both sides of shift_from={shift_from}")
            return (shifted if on.all() else unshifted)(x_t, t, **cond)

        return switched

    @torch.no_grad()
    def decode(
        self, z: Tensor, x_T: Tensor, steps: int | None = None, unshifted_fraction: float = 0.0
    ) -> Tensor:
        """x_0 in [−1, 1] from (z, x_T) by DDIM (η = 0) over S = ``steps`` steps, the shift off
        in the last (lowest-noise) ones: numbering the steps i = S, …, 1 as they run, the
        official code (``shift_ddim_sample_loop``'s ``stop_percent`` p, 0.3 for latent
        samples) shifts while i ≥ ⌊p·S⌋, so ⌊p·S⌋ − 1 steps decode with ε_θ alone; p = 0 is
        :meth:`DiffusionAutoencoder.decode`."""
        if not 0 <= unshifted_fraction < 1:
            raise ValueError(f"unshifted_fraction must be in [0, 1), got {unshifted_fraction}")
        if not unshifted_fraction:
            return super().decode(z, x_T, steps)
        ts = self.timesteps(steps or self.sample_steps, sampler="ddim")  # t_0 < … < t_{S−1}
        first_shifted = ts[max(int(unshifted_fraction * len(ts)) - 1, 0)]  # i = ⌊p·S⌋
        eps = self.code_eps(decoding=True, shift_from=int(first_shifted))
        return self.draw(len(z), "ddim", steps, 0.0, x_T=x_T, z=z, eps_fn=eps).clamp(-1, 1)

    @torch.no_grad()
    def interpolate_trajectory(
        self,
        a: Tensor | Codes,
        b: Tensor | Codes,
        num: int = 7,
        steps: int | None = None,
        encode_steps: int | None = None,
    ) -> Tensor:
        """(B, num, C, H, W) from a (w = 0) to b (w = 1), images or their codes: x_T by slerp,
        and at every step G = (1 − w)·G_ψ(·, z_a) + w·G_ψ(·, z_b) instead of a lerp of the codes
        (PDAE Sec. 4)."""

        def frame(a: Codes, b: Codes, x_T: Tensor, w: float) -> Tensor:
            eps = self.code_eps(mix=w, decoding=True)
            x0 = self.draw(len(x_T), "ddim", steps, 0.0, x_T=x_T, eps_fn=eps, z=a.z, z_b=b.z)
            return x0.clamp(-1, 1)

        return self.interpolation_frames(a, b, num, frame, encode_steps or steps)

    def log_validation_images(self, x0: Tensor) -> None:
        """:class:`DiffusionAutoencoder`'s pictures, and trajectory-interpolation strips."""
        super().log_validation_images(x0)
        x0 = x0[: self.num_val_samples]
        half = len(x0) // 2
        if half:
            strip = self.interpolate_trajectory(x0[:half], x0[half : 2 * half])
            self.log_images("trajectory interpolations", strip.flatten(0, 1), nrow=strip.shape[1])
