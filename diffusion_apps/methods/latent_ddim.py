"""DiffAE's latent DDIM (Preechakul et al. 2022, Sec. 3.3): unconditional samples of z_sem.

A second stage on top of a trained autoencoder (DiffAE, and PDAE's encoder likewise): a DDPM on
the autoencoder's codes, normalised per dimension by the training set's mean and std, whose
samples are decoded with a random x_T.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor
from tqdm import tqdm

from diffusion_apps.diffusion import NoiseSchedule, Sampler
from diffusion_apps.distributed import pooled_mean_std
from diffusion_apps.methods.ddpm import DDPM
from diffusion_apps.methods.pdae import PDAE
from diffusion_apps.methods.protocol import Generation, SampleRequest, has_stochastic_code
from diffusion_apps.nn import SkipMLP


class LatentDDIM(DDPM):
    """ε_ω(z_t, t) trained with L = E‖ε_ω(√ᾱ_t z + √(1−ᾱ_t) ε, t) − ε‖₁ on normalised codes
    z = (Enc(x_0) − μ)/σ, μ and σ per dimension over the training set (saved as buffers).

    DiffAE's constants are the defaults: constant β = 0.008, T = 1000, L1 loss, ε-prediction,
    AdamW with weight decay 0.01. The autoencoder is frozen (eval mode, no gradients).

    ``sample`` returns decoded images, so validation grids, the SampleQuality callback and
    ``make eval`` score latent-DDIM generations like any other model's; ``sample_latents``
    returns the codes.

    Args:
        net: the latent denoiser; its ``dim`` must equal the encoder's ``out_dim``.
        autoencoder: path of the trained autoencoder's checkpoint (read with
            ``weights_only=True``): a DiffAE or PDAE, or any module whose ``autoencoding``
            declares a ``stochastic_code`` (:mod:`~diffusion_apps.methods.protocol`).
            Its config and weights are saved in this module's checkpoint, which therefore
            loads without that file.
        schedule: the latent forward process; default constant β = 0.008.
        decode_steps: DDIM steps of the image decoder (default: the autoencoder's own).
        unshifted_fraction: PDAE only: the share p of the last (low-noise) decoding steps run
            without PDAE's learned shift (:meth:`PDAE.decode`); the official code's 0.3 is set
            by configs/pdae_latent.yaml, 0 keeps the shift on at every step.
        stats_batches: train batches (of each rank, under DDP) used for μ and σ (default: the
            whole train split).
        Other arguments: see :class:`DDPM`.
    """

    def __init__(
        self,
        net: SkipMLP,
        autoencoder: str,
        schedule: NoiseSchedule | None = None,
        sampler: Sampler = "ddim",
        sample_steps: int = 50,
        decode_steps: int | None = None,
        unshifted_fraction: float = 0.0,
        stats_batches: int | None = None,
        num_val_samples: int = 64,
        loss: Literal["mse", "l1"] = "l1",
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        compile: bool = False,
    ) -> None:
        schedule = schedule or NoiseSchedule("constant", 1000, constant_beta=0.008)
        super().__init__(
            net, schedule=schedule, prediction="eps", sampler=sampler, sample_steps=sample_steps,
            eta=0.0, timestep_spacing="uniform", variance="beta", clip_x0=False,
            num_val_samples=num_val_samples, loss=loss, lr=lr, weight_decay=weight_decay,
            warmup_steps=warmup_steps, adam_betas=adam_betas, compile=compile,
        )  # fmt: skip
        self.autoencoder = self.load_part(autoencoder)
        if not has_stochastic_code(self.autoencoder):
            raise ValueError(
                f"autoencoder={autoencoder!r} holds a {type(self.autoencoder).__name__}, which "
                "has no encode/encode_stochastic/decode: give a DiffAE (or PDAE) checkpoint"
            )
        if self.autoencoder.encoder.out_dim != net.dim:
            raise ValueError(
                f"the latent net's dim={net.dim} must equal the autoencoder's z_sem width "
                f"{self.autoencoder.encoder.out_dim}"
            )
        if unshifted_fraction and not isinstance(self.autoencoder, PDAE):
            raise ValueError(
                f"unshifted_fraction={unshifted_fraction} turns off PDAE's learned shift, but "
                f"autoencoder={autoencoder!r} holds a {type(self.autoencoder).__name__}"
            )
        self.decode_steps, self.stats_batches = decode_steps, stats_batches
        self.unshifted_fraction = unshifted_fraction
        self.register_buffer("z_mean", torch.zeros(net.dim))
        self.register_buffer("z_std", torch.ones(net.dim))
        self.register_buffer("stats_ready", torch.tensor(False))

    def setup(self, stage: str) -> None:
        """No image-shape check: the data feed the frozen autoencoder, which checks them."""

    def on_fit_start(self) -> None:
        """Measure μ and σ of z_sem over the training images, once (under DDP each rank encodes
        its shard and the sums are pooled): they are saved with the weights, so a resumed run
        keeps them."""
        if not bool(self.stats_ready):
            self.measure_statistics(self.trainer.datamodule.train_dataloader())

    @torch.no_grad()
    def measure_statistics(self, loader) -> None:
        """μ = Σz/n and σ = √((Σz² − nμ²)/(n − 1)) per dimension of z = Enc(x_0) over
        ``loader``'s images (the first ``stats_batches``), accumulated in float64; under DDP the
        sums of every rank's loader."""
        device = self.z_mean.device
        total = torch.zeros_like(self.z_mean, dtype=torch.float64)
        total_sq, n = total.clone(), 0
        batches = tqdm(loader, desc="z_sem statistics", total=self.stats_batches, leave=False)
        for i, batch in enumerate(batches):
            if self.stats_batches is not None and i >= self.stats_batches:
                break
            z = self.autoencoder.encode(batch[0].to(device)).double()
            total, total_sq, n = total + z.sum(0), total_sq + z.square().sum(0), n + len(z)
        mean, std, n = pooled_mean_std(total, total_sq, n, self._trainer)
        if n < 2:
            raise ValueError("LatentDDIM needs at least 2 training images for z statistics")
        self.z_mean.copy_(mean.float())
        self.z_std.copy_(std.clamp(min=1e-6).float())
        self.stats_ready.fill_(True)

    def normalize(self, z: Tensor) -> Tensor:
        return (z - self.z_mean) / self.z_std

    def denormalize(self, z: Tensor) -> Tensor:
        return z * self.z_std + self.z_mean

    def diffused(self, images: Tensor) -> Tensor:
        """The normalised codes (Enc(x_0) − μ)/σ of a batch of images."""
        return self.normalize(self.autoencoder.encode(images))

    @property
    def generation(self) -> Generation:
        """The DDPM's samplers on the codes; no x_T to give (the decoder draws its own)."""
        return replace(super().generation, inputs=())

    def nfe(self, sampler: str, steps: int) -> int:
        """Network evaluations per sample: ``steps`` of the latent net (a cheap MLP; steps ≤ T)
        plus the decoder's DDIM steps (the UNet)."""
        decode = len(self.autoencoder.timesteps(self.decode_steps or self.autoencoder.sample_steps))
        return steps + decode

    @torch.no_grad()
    def sample_latents(self, num_samples: int, *args, **kwargs) -> Tensor:
        """z_sem samples (N, D): :meth:`draw` (same arguments) denormalised, σ·z + μ."""
        return self.denormalize(self.draw(num_samples, *args, **kwargs))

    def generate(self, num_samples: int, request: SampleRequest) -> Tensor:
        """Images in [−1, 1]: :meth:`sample_latents` decoded by the autoencoder from
        x_T ~ N(0, I), both drawn from ``generator``."""
        r = request
        z = self.sample_latents(
            num_samples, r.sampler, r.steps, r.eta, r.generator, r.progress, spacing=r.spacing
        )
        shape = (num_samples, *self.autoencoder.sample_shape)
        x_T = torch.randn(shape, generator=r.generator, device=z.device)
        if self.unshifted_fraction:
            return self.autoencoder.decode(z, x_T, self.decode_steps, self.unshifted_fraction)
        return self.autoencoder.decode(z, x_T, self.decode_steps)
