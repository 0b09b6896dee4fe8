"""LDM's first stage, trained (Rombach et al. 2022, Sec. 3.1 and App. G; CompVis/latent-diffusion
``ldm/modules/losses/contperceptual.py`` and ``vqperceptual.py``): a KL- or VQ-regularised
autoencoder with an optional patch discriminator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_apps.methods.base import DiffusionMethod
from diffusion_apps.methods.protocol import Autoencoding
from diffusion_apps.nn.first_stage import Autoencoder, DiagonalGaussian, PatchDiscriminator
from diffusion_apps.nn.quantize import Quantized, codebook_usage


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """L_D = ½ (E[max(0, 1 − D(x))] + E[max(0, 1 + D(x̂))]) (LDM's hinge loss)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class AutoencoderKL(DiffusionMethod):
    """Stage 1: x → z ~ q(z | x) → x̂, trained with LDM's loss. KL-regularised (the class is named
    after LDM's ``AutoencoderKL``, the default kind; per image: sums over pixels):

        L = Σ_pixels [ |x − x̂|₁ / e^s + s ]  +  w_KL · KL(q(z | x) ‖ N(0, I))  +  λ · L_G,

    or, for an ``autoencoder`` with a quantizer, VQ-regularised (LDM's ``VQModel`` with the
    official ``VQLPIPSWithDiscriminator``: a mean over pixels, no log-variance):

        L = mean_pixels |x − x̂|₁  +  w_VQ · (‖sg[z_e] − e‖² + β ‖z_e − sg[e]‖²)  +  λ · L_G,

    x̂ decoded from the straight-through z_q (nn/quantize.py); the codebook's perplexity and the
    share of codes used are logged (``train/perplexity``, ``train/codebook_usage``, and ``val/``).
    In both, L_G = −E[D(x̂)], λ = w_D · ‖∇_last L_rec‖ / (‖∇_last L_G‖ + 10⁻⁴) clamped to
    [0, 10⁴], s a learned scalar log-variance, ∇_last the gradient at the decoder's last layer (the
    adaptive weight balances the two terms there). From step ``disc_start`` on, a second
    optimiser trains the discriminator D with the hinge loss
    L_D = ½ (E[max(0, 1 − D(x))] + E[max(0, 1 + D(x̂))]). With ``lpips_weights_path`` the
    reconstruction term is |x − x̂|₁ + w_p·LPIPS(x, x̂) as in LDM, LPIPS being torchmetrics'
    (AlexNet backbone, LDM uses VGG) from local weights; off by default (a download).

    The discriminator step scores the reconstructions of the same forward pass (LDM, under the
    old Lightning's per-optimiser ``training_step``, recomputes them after the autoencoder's step:
    a second forward pass for the same batch).

    Manual optimisation: Lightning counts every optimiser step in ``global_step``, so with the
    discriminator on, ``trainer.max_steps`` advances by 2 per batch (as for any GAN in Lightning);
    ``disc_start`` counts batches. Gradient clipping by the Trainer is not available.

    Args:
        autoencoder: the encoder/decoder network; with a ``quantizer``, VQ-regularised.
        discriminator: the patch discriminator, or None for no adversarial term.
        kl_weight: w_KL (LDM: 1e-6); KL only.
        codebook_weight: w_VQ (LDM's vq configs: 1); VQ only.
        disc_weight: w_D (LDM: 0.5).
        disc_start: training batches before the adversarial term switches on.
        logvar_init: initial s; KL only.
        lpips_weights_path: torchvision's AlexNet weights file: adds the LPIPS term. The frozen
            LPIPS network stays out of the checkpoint (the config names the file).
        perceptual_weight: w_p (LDM: 1).
        num_val_images: validation images shown with their reconstructions in TensorBoard.
        scaling_factor: the latent scale s a stage 2 multiplies z by, when it is known (Stable
            Diffusion's VAE: 0.18215); None: stage 2 measures s = 1/std(z) (LDM's scale_by_std).
        lr, adam_betas: of both Adam optimisers (LDM: β = (0.5, 0.9)).
    """

    sample_instead = (
        "it is latent diffusion's first stage: train configs/ldm.yaml on it "
        "(model.init_args.first_stage) and sample that checkpoint"
    )

    autoencoding = Autoencoding()  # reconstruct(x) only: no stochastic code

    def __init__(
        self,
        autoencoder: Autoencoder,
        discriminator: PatchDiscriminator | None = None,
        kl_weight: float = 1e-6,
        codebook_weight: float = 1.0,
        disc_weight: float = 0.5,
        disc_start: int = 1000,
        logvar_init: float = 0.0,
        lpips_weights_path: str | None = None,
        perceptual_weight: float = 1.0,
        num_val_images: int = 8,
        scaling_factor: float | None = None,
        lr: float = 1e-4,
        adam_betas: tuple[float, float] = (0.5, 0.9),
    ) -> None:
        super().__init__(lr=lr, adam_betas=adam_betas)
        self.save_config()
        if min(kl_weight, codebook_weight, disc_weight, disc_start) < 0:
            raise ValueError("kl_weight, codebook_weight, disc_weight and disc_start must be >= 0")
        self.autoencoder, self.discriminator = autoencoder, discriminator
        self.kl_weight, self.disc_weight, self.disc_start = kl_weight, disc_weight, disc_start
        self.codebook_weight = codebook_weight
        vq = autoencoder.quantizer is not None
        self.logvar = None if vq else nn.Parameter(torch.tensor(float(logvar_init)))
        self.perceptual, self.perceptual_weight = None, perceptual_weight
        if lpips_weights_path is not None:
            from diffusion_apps.lpips import lpips_metric

            self.perceptual = lpips_metric(lpips_weights_path).net.requires_grad_(False).eval()
            self.register_state_dict_post_hook(_without_perceptual)
            self.register_load_state_dict_pre_hook(_with_own_perceptual)
        self.num_val_images = num_val_images
        if scaling_factor is not None and scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {scaling_factor}")
        self.scaling_factor = scaling_factor
        self.automatic_optimization = False

    def setup(self, stage: str) -> None:
        """Under DDP, the two backward passes of a step reach different parameters (before
        ``disc_start`` the discriminator gets none, and the discriminator loss never reaches the
        autoencoder): DDP must look for the unused ones, or it stops at the second step."""
        from lightning.pytorch.strategies import DDPStrategy

        from diffusion_apps.lightning_internals import find_unused_parameters

        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy) and self.discriminator is not None:
            find_unused_parameters(strategy)  # read when DDP wraps us

    @property
    def quantizer(self):
        """The autoencoder's :class:`~diffusion_apps.nn.VectorQuantizer`; None: KL-regularised."""
        return self.autoencoder.quantizer

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        a = self.autoencoder
        return (a.in_channels, a.image_size, a.image_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.autoencoder.latent_shape

    def encode(self, x: Tensor):
        """q(z | x): a :class:`~diffusion_apps.nn.DiagonalGaussian` (KL) or a
        :class:`~diffusion_apps.nn.PointMass` at the pre-quantisation z_e (VQ)."""
        return self.autoencoder.encode(x)

    def decode(self, z: Tensor) -> Tensor:
        """x̂ from z, not clamped (a VQ first stage quantises z first)."""
        return self.autoencoder.decode(z)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """x̂ = decode(μ(x)) in [−1, 1]: the posterior mean, as LDM's stage 2 does not sample."""
        return self.decode(self.encode(x).mode()).clamp(-1, 1)

    def losses(
        self, x: Tensor, x_rec: Tensor, latent: DiagonalGaussian | Quantized
    ) -> dict[str, Tensor]:
        """The terms of L without the adversarial one: ``nll`` (KL: per image; VQ: per pixel),
        and ``regularizer``, w_KL·KL (with ``kl``) or w_VQ·L_VQ (with ``codebook``,
        ``commitment``, ``perplexity``, ``codebook_usage``); means over the batch."""
        l1 = (x.float() - x_rec.float()).abs()
        terms = {"rec": l1.mean()}
        if self.perceptual is not None:  # LPIPS per image (B, 1, 1, 1), 3 channels, ≥ 64 px
            size = max(64, x.shape[-1])
            pair = [F.interpolate(v.float(), size=size, mode="bilinear") for v in (x, x_rec)]
            perceptual = self.perceptual(*[v.expand(-1, 3, -1, -1) for v in pair])
            terms["perceptual"] = perceptual.mean()
            l1 = l1 + self.perceptual_weight * perceptual
        if self.quantizer is None:
            terms["nll"] = (l1 / self.logvar.exp() + self.logvar).sum() / len(x)
            terms["kl"] = latent.kl().mean()
            terms["regularizer"] = self.kl_weight * terms["kl"]
            return terms
        terms["nll"] = l1.mean()
        terms["codebook"], terms["commitment"] = latent.codebook, latent.commitment
        terms["regularizer"] = self.codebook_weight * latent.loss
        usage = codebook_usage(latent.indices, self.quantizer.num_embeddings)
        terms["perplexity"], terms["codebook_usage"] = usage
        return terms

    def adaptive_weight(self, nll: Tensor, g_loss: Tensor) -> Tensor:
        """λ = w_D ‖∇_last nll‖ / (‖∇_last L_G‖ + 1e-4), clamped to [0, 1e4], no gradient."""
        last = self.autoencoder.decoder.last_layer
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        weight = g_nll.norm() / (g_adv.norm() + 1e-4)
        return self.disc_weight * weight.clamp(0.0, 1e4).detach()

    def adversarial(self) -> bool:
        """Whether the adversarial terms are on for this batch."""
        batches = self.trainer.fit_loop.total_batch_idx if self._trainer is not None else 0
        return self.discriminator is not None and batches >= self.disc_start

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x = batch[0]
        x_rec, latent = self.autoencoder(x)
        terms = self.losses(x, x_rec, latent)
        loss = terms["nll"] + terms["regularizer"]
        adversarial = self.adversarial()
        if adversarial:
            g_loss = -self.discriminator(x_rec).float().mean()
            terms["g"], terms["adaptive_weight"] = (
                g_loss,
                self.adaptive_weight(terms["nll"], g_loss),
            )
            loss = loss + terms["adaptive_weight"] * g_loss
        optimizers = self.optimizers()
        opt_ae = optimizers[0] if isinstance(optimizers, list) else optimizers
        opt_ae.zero_grad()
        self.manual_backward(loss)
        opt_ae.step()
        if adversarial:
            opt_d = optimizers[1]
            logits_real = self.discriminator(x.detach()).float()
            logits_fake = self.discriminator(x_rec.detach()).float()
            terms["d"] = hinge_d_loss(logits_real, logits_fake)
            opt_d.zero_grad()
            self.manual_backward(terms["d"])
            opt_d.step()
        self.log("train/loss", loss, prog_bar=True)
        if self.logvar is not None:
            self.log("train/logvar", self.logvar.detach())
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()})
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x = batch[0]
        z = self.encode(x).mode()
        x_rec = self.decode(z).clamp(-1, 1)  # = reconstruct(x)
        mse = (x.float() - x_rec.float()).square().mean() / 4  # on [0, 1] images
        self.log("val/mse", mse, prog_bar=True, sync_dist=True)
        self.log("val/psnr", -10 * torch.log10(mse), sync_dist=True)
        if self.quantizer is not None:  # per batch, averaged over the batches
            perplexity, used = codebook_usage(
                self.quantizer.nearest(z), self.quantizer.num_embeddings
            )
            self.log_dict({"val/perplexity": perplexity, "val/codebook_usage": used})
        if batch_idx == 0 and self.num_val_images > 0 and self.trainer.is_global_zero:
            n = min(self.num_val_images, len(x))
            self.log_images(
                "reconstructions (rows: input, reconstruction)", torch.cat([x[:n], x_rec[:n]]), n
            )

    def configure_optimizers(self):
        ae = list(self.autoencoder.parameters()) + ([] if self.logvar is None else [self.logvar])
        optimizers = [torch.optim.Adam(ae, lr=self.lr, betas=self.adam_betas)]
        if self.discriminator is not None:
            disc = self.discriminator.parameters()
            optimizers.append(torch.optim.Adam(disc, lr=self.lr, betas=self.adam_betas))
        return optimizers


def _without_perceptual(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual.")]:
        del state_dict[key]


def _with_own_perceptual(module, state_dict, prefix, *_) -> None:
    for key, value in module.perceptual.state_dict(prefix=prefix + "perceptual.").items():
        state_dict.setdefault(key, value)
