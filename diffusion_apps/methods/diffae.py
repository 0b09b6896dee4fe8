"""Diffusion autoencoders (Preechakul et al., CVPR 2022; official code phizaz/diffae).

A semantic encoder z_sem = Enc_φ(x_0) and a conditional noise predictor ε_θ(x_t, t, z_sem),
trained jointly with L_simple; the stochastic code x_T is the DDIM inversion of x_0 given z_sem.
"""

from __future__ import annotations

from torch import Tensor

from diffusion_apps.diffusion import EpsFn, NoiseSchedule, Spacing
from diffusion_apps.methods.ddpm import DDPM
from diffusion_apps.methods.diffusion_autoencoder import DiffusionAutoencoder
from diffusion_apps.nn import EncoderUNet, UNet


class DiffAE(DiffusionAutoencoder, DDPM):
    """DiffAE: L_simple = E_{x_0, t, ε} ‖ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, Enc_φ(x_0)) − ε‖².

    The UNet must be built with ``cond_dim`` = the encoder's ``out_dim`` (DiffAE: 512) and
    ``cond_shift=False``: every ResBlock then applies DiffAE's adaptive group norm
    h ← (1 + z_s)·(GN(h)·(1 + t_s) + t_b), z_s = W_z SiLU(z_sem). The encoder is the UNet's
    down path without time conditioning, pooled GN → SiLU → average → linear.

    Inference (:class:`DiffusionAutoencoder`: encode, encode_stochastic, decode, reconstruct,
    interpolate, variations, probe, manipulate) decodes with ε_θ(x_t, t, z_sem).

    Unconditional samples need a model of z_sem: the latent DDIM stage
    (:class:`~diffusion_apps.methods.LatentDDIM`, ``configs/diffae_latent.yaml``).

    Args:
        unet: the conditional noise predictor (``cond_dim`` = ``encoder.out_dim``).
        encoder: the semantic encoder, built with ``time_conditioned=False``.
        encode_steps: DDIM steps of the stochastic encoder (the paper: 250 for manipulation).
        clip_x0: clamp x̂_0 while decoding. Off by default, unlike the official code: the
            stochastic encoder runs the unclipped ODE, and clipping on the way back would make
            decoding no longer its inverse.
        Other arguments: see :class:`DDPM`; the sampler is always DDIM.
    """

    def __init__(
        self,
        unet: UNet,
        encoder: EncoderUNet,
        schedule: NoiseSchedule | None = None,
        sample_steps: int = 100,
        encode_steps: int = 100,
        timestep_spacing: Spacing = "uniform",
        clip_x0: bool = False,
        num_val_samples: int = 8,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        compile: bool = False,
    ) -> None:
        if encoder.time_conditioned:
            raise ValueError("DiffAE's encoder must be built with time_conditioned=False")
        if unet.cond_dim != encoder.out_dim:
            raise ValueError(
                f"the UNet's cond_dim={unet.cond_dim} must equal the encoder's "
                f"out_dim={encoder.out_dim} (z_sem conditions every ResBlock)"
            )
        if (encoder.in_channels, encoder.image_size) != (unet.in_channels, unet.image_size):
            raise ValueError("the encoder and the UNet must take the same images")
        if encode_steps < 1:
            raise ValueError(f"encode_steps must be >= 1, got {encode_steps}")
        super().__init__(
            unet, schedule=schedule, prediction="eps", sampler="ddim", sample_steps=sample_steps,
            eta=0.0, timestep_spacing=timestep_spacing, variance="beta", clip_x0=clip_x0,
            num_val_samples=num_val_samples, loss="mse", lr=lr, weight_decay=weight_decay,
            warmup_steps=warmup_steps, adam_betas=adam_betas, compile=compile,
        )  # fmt: skip
        self.encoder = encoder
        self.encode_steps = encode_steps

    def conditioning(self, x0: Tensor, batch=None) -> dict[str, Tensor]:
        """z_sem = Enc_φ(x_0), trained through the diffusion loss."""
        return {"cond": self.encoder(x0)}

    def code_eps(self, decoding: bool = False) -> EpsFn:
        """ε_θ(x_t, t, z_sem): the UNet's AdaGN takes the code (``decoding``: clamped x̂_0 with
        ``clip_x0``)."""

        def eps(x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
            return self.eps(x_t, t, cond=z)

        return self.sampling_eps(eps) if decoding else eps
