"""Diffusion autoencoders (Preechakul et al., CVPR 2022; official code phizaz/diffae).

A semantic encoder z_sem = Enc_φ(x_0) and a conditional noise predictor ε_θ(x_t, t, z_sem),
trained jointly with L_simple; the stochastic code x_T is the DDIM inversion of x_0 given z_sem.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from diffusion_apps.diffusion import NoiseSchedule, ddim_invert, slerp
from diffusion_apps.evaluation.probe import LinearProbe, encode_all
from diffusion_apps.methods.ddpm import DDPM
from diffusion_apps.nn import EncoderUNet, UNet

LATENT_HINT = (
    "DiffAE decodes given codes: call decode(z_sem, x_T); for unconditional samples train its "
    "latent DDIM stage (configs/diffae_latent.yaml) and sample from that checkpoint"
)


class DiffAE(DDPM):
    """DiffAE: L_simple = E_{x_0, t, ε} ‖ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, Enc_φ(x_0)) − ε‖².

    The UNet must be built with ``cond_dim`` = the encoder's ``out_dim`` (DiffAE: 512) and
    ``cond_shift=False``: every ResBlock then applies DiffAE's adaptive group norm
    h ← (1 + z_s)·(GN(h)·(1 + t_s) + t_b), z_s = W_z SiLU(z_sem). The encoder is the UNet's
    down path without time conditioning, pooled GN → SiLU → average → linear.

    Inference (all under ``torch.no_grad``, with DDIM η = 0):
        ``encode``             x_0 → z_sem
        ``encode_stochastic``  (x_0, z_sem) → x_T by DDIM inversion (``encode_steps`` steps)
        ``decode``             (z_sem, x_T) → x_0 by DDIM (``sample_steps`` steps)
        ``reconstruct``        decode(encode(x_0), x_T), x_T inferred or random
        ``interpolate``        lerp on z_sem, slerp on x_T, decoded
        ``stochastic_variations``  z_sem fixed, x_T random
        ``semantic_variations``    x_T (inferred) fixed, z_sem varied
        ``fit_probe``          a linear classifier on normalised z_sem (attribute directions)
        ``manipulate``         decode(z', x_T), z' = denorm(norm(z) + s·√d·w/‖w‖)

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

    generates_unconditionally = False  # x_0 needs a z_sem: see LatentDDIM

    def __init__(
        self,
        unet: UNet,
        encoder: EncoderUNet,
        schedule: NoiseSchedule | None = None,
        sample_steps: int = 100,
        encode_steps: int = 100,
        timestep_spacing: Literal["uniform", "quad"] = "uniform",
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
            unet, schedule, "eps", "ddim", sample_steps, 0.0, timestep_spacing, "beta", clip_x0,
            num_val_samples, "mse", lr, weight_decay, warmup_steps, adam_betas, compile,
        )  # fmt: skip
        self.encoder = encoder
        self.encode_steps = encode_steps

    def draw(self, num_samples: int, *args, cond: Tensor | None = None, **kwargs) -> Tensor:
        """:meth:`DDPM.draw` given ``cond`` = z_sem (N, D); without it, an error that says how
        to sample unconditionally."""
        if cond is None:
            raise ValueError(LATENT_HINT)
        return super().draw(num_samples, *args, cond=cond, **kwargs)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        """Reconstructions (inferred x_T) of the batch's images."""
        return self.reconstruct(batch[0])

    def conditioning(self, x0: Tensor) -> dict[str, Tensor]:
        """z_sem = Enc_φ(x_0), trained through the diffusion loss."""
        return {"cond": self.encoder(x0)}

    @torch.no_grad()
    def encode(self, x0: Tensor) -> Tensor:
        """z_sem (B, D) of images x0 (B, C, H, W) in [−1, 1]."""
        return self.encoder(x0)

    @torch.no_grad()
    def encode_stochastic(
        self, x0: Tensor, z_sem: Tensor | None = None, steps: int | None = None
    ) -> Tensor:
        """x_T by deterministic DDIM inversion of x0 conditioned on z_sem (DiffAE eq. 8)."""
        z_sem = self.encode(x0) if z_sem is None else z_sem
        ts = self.timesteps(steps or self.encode_steps)
        return ddim_invert(self.eps, self.schedule, x0, timesteps=ts, cond=z_sem)

    @torch.no_grad()
    def decode(self, z_sem: Tensor, x_T: Tensor, steps: int | None = None) -> Tensor:
        """x_0 in [−1, 1] from (z_sem, x_T) by deterministic DDIM (η = 0)."""
        if z_sem.shape[0] != x_T.shape[0]:
            raise ValueError(f"z_sem {tuple(z_sem.shape)} and x_T {tuple(x_T.shape)} differ in B")
        return self.sample(len(z_sem), "ddim", steps, 0.0, x_T=x_T, cond=z_sem)

    @torch.no_grad()
    def reconstruct(
        self,
        x0: Tensor,
        inferred: bool = True,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """decode(z_sem, x_T) with x_T inferred by ``encode_stochastic`` or drawn N(0, I)."""
        z_sem = self.encode(x0)
        if inferred:
            x_T = self.encode_stochastic(x0, z_sem)
        else:
            x_T = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.decode(z_sem, x_T, steps)

    @torch.no_grad()
    def interpolate(
        self, x_a: Tensor, x_b: Tensor, num: int = 7, steps: int | None = None
    ) -> Tensor:
        """Decoded interpolations (B, num, C, H, W) from x_a (w = 0) to x_b (w = 1):
        z_sem by lerp, x_T (inferred) by slerp, as DiffAE does."""
        if num < 2:
            raise ValueError(f"num must be >= 2, got {num}")
        z_a, z_b = self.encode(x_a), self.encode(x_b)
        t_a, t_b = self.encode_stochastic(x_a, z_a), self.encode_stochastic(x_b, z_b)
        frames = []
        for w in torch.linspace(0, 1, num).tolist():
            frames.append(self.decode(torch.lerp(z_a, z_b, w), slerp(t_a, t_b, w), steps))
        return torch.stack(frames, dim=1)

    @torch.no_grad()
    def stochastic_variations(
        self,
        x0: Tensor,
        num: int = 4,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """(B, num, C, H, W): each image's z_sem decoded from ``num`` random x_T — what the
        stochastic code holds (pose, stroke) varies, the semantics stay."""
        z_sem = self.encode(x0)
        frames = []
        for _ in range(num):
            x_T = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            frames.append(self.decode(z_sem, x_T, steps))
        return torch.stack(frames, dim=1)

    @torch.no_grad()
    def semantic_variations(self, x0: Tensor, z_sem: Tensor, steps: int | None = None) -> Tensor:
        """(B, K, C, H, W): each image's inferred x_T decoded with each of the K codes z_sem
        (K, D) — the stochastic detail stays, the semantics change."""
        x_T = self.encode_stochastic(x0)
        frames = [self.decode(z.expand(len(x0), -1), x_T, steps) for z in z_sem]
        return torch.stack(frames, dim=1)

    @torch.no_grad()
    def fit_probe(self, batches) -> LinearProbe:
        """A :class:`LinearProbe` fitted on the z_sem of every (images, labels) batch: one
        logistic regression per class (attribute) on z_sem normalised by its mean and std."""
        return LinearProbe.fit(*encode_all(self.encode, batches, self.device))

    @torch.no_grad()
    def manipulate(
        self,
        x0: Tensor,
        probe: LinearProbe,
        attribute: int,
        scales: list[float] | tuple[float, ...] = (0.3,),
        steps: int | None = None,
    ) -> Tensor:
        """(B, S, C, H, W): each image decoded from its inferred x_T with z_sem moved along
        ``attribute``'s direction by each of the S ``scales`` (DiffAE Sec. 4.2),
            z' = denorm(norm(z_sem) + s·√d · w/‖w‖),
        w the probe's weights for the attribute, norm/denorm its training-set statistics.
        Scale 0 is the reconstruction; the paper uses s = 0.3 on CelebA-HQ."""
        z_sem = self.encode(x0)
        x_T = self.encode_stochastic(x0, z_sem)
        frames = [self.decode(probe.shift(z_sem, attribute, s), x_T, steps) for s in scales]
        return torch.stack(frames, dim=1)

    def log_validation_images(self, x0: Tensor) -> None:
        """Originals over their reconstructions with inferred and with random x_T; interpolation
        strips between the two halves of the batch; x_T- and z_sem-variation grids."""
        x0 = x0[: self.num_val_samples]
        gen = torch.Generator(self.device).manual_seed(0)
        rows = [x0, self.reconstruct(x0), self.reconstruct(x0, inferred=False, generator=gen)]
        tag = "reconstructions (rows: original, inferred x_T, random x_T)"
        self.log_images(tag, torch.cat(rows), nrow=len(x0))
        half = len(x0) // 2
        if half:
            strip = self.interpolate(x0[:half], x0[half : 2 * half])  # (half, num, C, H, W)
            self.log_images("interpolations", strip.flatten(0, 1), nrow=strip.shape[1])
        first = x0[: max(half, 1)]
        grids = {
            "x_T variations (rows: one z_sem, random x_T)": self.stochastic_variations(
                first, generator=gen
            ),
            "z_sem variations (rows: one x_T, the batch's z_sem)": self.semantic_variations(
                first, self.encode(x0)
            ),
        }
        for tag, frames in grids.items():
            self.log_images(tag, frames.flatten(0, 1), nrow=frames.shape[1])
