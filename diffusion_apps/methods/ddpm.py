"""DDPM (Ho et al. 2020) trained with L_simple (and, with a learned variance, Nichol & Dhariwal's
L_hybrid); ancestral, DDIM (Song et al. 2021) or DPM-Solver++ sampling."""

from __future__ import annotations

import typing
from typing import Literal

import torch
from torch import Tensor

from diffusion_apps.diffusion import (
    NoiseSchedule,
    Prediction,
    Sampler,
    Spacing,
    Variance,
    convert_prediction,
    join_output,
    loss_terms,
    min_snr_weight,
    regression_target,
    split_output,
)
from diffusion_apps.methods.base import DiffusionMethod, LRSchedule
from diffusion_apps.methods.ddpm_guidance import ClassifierFreeGuidance
from diffusion_apps.methods.ddpm_sampling import DDPMSampling
from diffusion_apps.nn import UNet

TimestepSampling = Literal["uniform", "importance"]


def labelled(labels: Tensor, num_classes: int, method: str) -> Tensor:
    """A training batch's class labels, checked to be in [0, ``num_classes``): a folder without
    class sub-folders gives label −1."""
    if labels.min() < 0 or labels.max() >= num_classes:
        found = sorted(set(labels.tolist()))
        raise ValueError(
            f"a class-conditional {method} needs labels in [0, {num_classes}) (a folder: one "
            f"sub-folder per class), this batch has {found[:5]}"
            + (" (-1: unlabelled data)" if found[0] < 0 else "")
        )
    return labels


class DDPM(DDPMSampling, ClassifierFreeGuidance, DiffusionMethod):
    """Denoising diffusion probabilistic model with an ε (or x0, v) parametrised UNet.

    Training minimises L_simple (Ho et al. eq. 14) with t ~ U{0, …, T−1} (or importance-
    sampled, below), ε ~ N(0, I):
        L = E_{x0, t, ε} ‖target − f_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t)‖²,
    where target is ε (paper), x0, or v = √ᾱ_t ε − √(1−ᾱ_t) x0 (Salimans & Ho 2022). The loss
    is computed in fp32 even under mixed precision. With ``min_snr_gamma`` = γ each sample's
    term is weighted by Hang et al.'s min-SNR-γ w_t (:func:`~diffusion_apps.diffusion.
    min_snr_weight`), the x0-space weight min(SNR_t, γ) in every parametrisation. With
    ``timestep_sampling="importance"`` t is drawn where the weighted loss is:
        t ~ p(t) = m_t / Σ_s m_s,   m_t = min(SNR_t, γ)/(SNR_t + 1),
    each term weighted by w_t·m̄/m_t (m̄ = (1/T) Σ_s m_s; for v-prediction, whose w_t is m_t,
    the constant m̄): the same expected loss (1/T) Σ_t w_t E‖·‖², with lower variance. m_t is
    the weighted x0 error min(SNR_t, γ)·Var(x0 | x_t) of unit-variance data at the optimum,
    where Var(x0 | x_t) = 1/(1 + SNR_t). Under the linear schedule (T = 1000, γ = 5) the
    uniform draw spends half its t > 500, where m_t < 0.08 against a peak of 0.66
    (E[m²]/E[m]² = 2.65). Not with a learned variance, whose L_vlb is not reweighted. The
    Monte-Carlo device of improved DDPM's importance-sampled L_vlb (Nichol & Dhariwal 2021,
    §3.3), with a fixed proposal instead of a loss history.

    Class-conditional (ADM, Dhariwal & Nichol 2021, ``class_cond``): a UNet built with
    ``num_classes`` K is trained on ε_θ(x_t, t, y) with y the batch's labels (a folder's class
    sub-folders) and sampled for labels asked (default 0, 1, …, K−1 in turn), guided by a
    classifier at most (:class:`~diffusion_apps.methods.guided.ClassifierGuidedDDPM`): ADM.

    Classifier-free guidance (Ho & Salimans 2022, Algorithm 1): with ``label_dropout`` p_uncond
    each training label is replaced by the null label ∅ (the UNet's label K) with probability
    p_uncond, so one network learns ε_θ(x_t, y) and ε_θ(x_t, ∅) ≈ E[ε | x_t], the unconditional
    (class-mixture) denoiser. Sampling at guidance weight w (``guidance_weight``; ``scale=`` of
    ``sample``) uses their Algorithm 2's (:mod:`~diffusion_apps.methods.ddpm_guidance`)
        ε̃_θ(x_t, y) = (1 + w)·ε_θ(x_t, y) − w·ε_θ(x_t, ∅).

    Learned variance (Nichol & Dhariwal 2021, ``variance="learned"``): the UNet outputs 2C
    channels [f_θ, v], f_θ the chosen parametrisation and v the interpolation of eq. 15,
    log Σ_θ = frac·log β_t + (1 − frac)·log β̃_t with frac = (v + 1)/2
    (:mod:`~diffusion_apps.diffusion.variance`). Training minimises
        L_hybrid = L_simple + λ·L_vlb,   L_vlb = T·E_t[L_t] (bits per dimension),
    L_t the KL of p_θ(x_{t−1} | x_t) from q(x_{t−1} | x_t, x0) (t > 0) or the discretised
    decoder NLL (t = 0), with the mean stop-gradient'ed so that L_vlb trains Σ_θ only (§3.1).
    λ = 0.001 at T = 1000 is guided-diffusion's ``LossType.MSE`` loss ``mse + vb``; for any T it
    is improved-diffusion's ``RESCALED_MSE`` (vb·T/1000). Sampling: the ancestral sampler draws
    with Σ_θ (on respaced steps, with the respaced β', β̃'); DDIM and DPM-Solver++ use ε̂ only.
    A 2C-channel UNet with a fixed ``variance`` is sampled with that variance, its v ignored.

    Args:
        unet: the noise-prediction network; its ``in_channels``/``image_size`` fix the sample shape.
        schedule: the forward process q(x_t | x0).
        prediction: what the network outputs.
        sampler: sampler used for validation grids (``sample`` can override it).
        sample_steps: number of steps of that sampler (DDPM: T means every step).
        eta: DDIM η (0 deterministic, 1 = DDPM posterior variance).
        timestep_spacing: sampling timestep subsequence, "uniform", "quad" or "logsnr" (see
            :func:`~diffusion_apps.diffusion.timestep_subsequence`).
        variance: ancestral σ²_t, β_t ("beta", the paper's CIFAR-10 choice), β̃_t
            ("beta_tilde"), or the network's Σ_θ ("learned": needs a UNet with
            ``out_channels = 2·in_channels``; ADM's and improved DDPM's ``learn_sigma``).
        clip_x0: clamp x̂0 to [−1, 1] at each sampling step, before any guidance shift
            (:meth:`sampling_eps`).
        num_val_samples: images in the grid drawn at each validation.
        loss: squared error (L_simple) or absolute error (DiffAE's latent DDIM).
        timestep_sampling: t ~ U{0..T−1} ("uniform") or t ~ p(t) ∝ m_t ("importance", needs
            ``min_snr_gamma`` and a fixed ``variance``): see above.
        vlb_weight: λ of L_hybrid (the paper: 0.001), used with ``variance="learned"`` only
            (with a fixed Σ the stop-gradient'ed L_vlb would carry no gradient).
        label_dropout: p_uncond of classifier-free guidance, the probability that a training
            label is replaced by ∅ (Ho & Salimans: 0.1 or 0.2); needs a class-conditional UNet
            with its null label. 0: ADM's conditional training, ∅ never seen.
        guidance_weight: Ho & Salimans's w of samples drawn without ``scale=`` (validation
            grids, ``predict``, ``eval``): 0 is the plain conditional model (one network call a
            step), w > 0 guided, two (ε(y) and ε(∅)); w = −1 gives ε(∅), unconditional.
            GLIDE's and LDM's scale is s = 1 + w (ε(∅) + s·(ε(y) − ε(∅))); this option and
            ``scale=`` are w. Needs ``label_dropout``.
        lr, weight_decay, warmup_steps, adam_betas, compile, lr_schedule: see
            :class:`DiffusionMethod`.
    """

    def __init__(
        self,
        unet: UNet,
        schedule: NoiseSchedule | None = None,
        prediction: Prediction = "eps",
        sampler: Sampler = "ddim",
        sample_steps: int = 50,
        eta: float = 0.0,
        timestep_spacing: Spacing = "uniform",
        variance: Variance = "beta",
        clip_x0: bool = True,
        num_val_samples: int = 64,
        loss: Literal["mse", "l1"] = "mse",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 1000,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        compile: bool = False,
        vlb_weight: float = 0.001,
        min_snr_gamma: float | None = None,
        lr_schedule: LRSchedule = "constant",
        timestep_sampling: TimestepSampling = "uniform",
        label_dropout: float = 0.0,
        guidance_weight: float = 0.0,
    ) -> None:
        super().__init__(lr, weight_decay, warmup_steps, adam_betas, compile, lr_schedule)
        self.save_config()
        self.unet = unet
        self.schedule = schedule if schedule is not None else NoiseSchedule()
        self.prediction = prediction
        self.sampler, self.sample_steps, self.eta = sampler, sample_steps, eta
        self.timestep_spacing, self.variance, self.clip_x0 = timestep_spacing, variance, clip_x0
        self.num_val_samples = num_val_samples
        if loss not in ("mse", "l1"):
            raise ValueError(f"loss must be 'mse' or 'l1', got {loss!r}")
        if variance not in typing.get_args(Variance):
            raise ValueError(
                f"variance must be one of {typing.get_args(Variance)}, got {variance!r}"
            )
        T = self.schedule.num_timesteps
        for name, value, allowed, ok in [
            ("vlb_weight", vlb_weight, ">= 0", vlb_weight >= 0),
            ("sample_steps", sample_steps, f"in [1, {T}] (T)", 1 <= sample_steps <= T),
            ("eta", eta, "in [0, 1]", 0 <= eta <= 1),
            (
                "min_snr_gamma",
                min_snr_gamma,
                "> 0 or null",
                min_snr_gamma is None or min_snr_gamma > 0,
            ),
        ]:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {value}")
        channels, out = (getattr(unet, name, None) for name in ("in_channels", "out_channels"))
        if variance == "learned" and (channels is None or out != 2 * channels):
            raise ValueError(
                f"variance='learned' needs a UNet that outputs [ε, v], out_channels = "
                f"2·in_channels = 2·{channels}, got out_channels={out} (set "
                "model.init_args.unet.init_args.out_channels)"
            )
        if timestep_sampling not in typing.get_args(TimestepSampling):
            raise ValueError(
                f"timestep_sampling must be one of {typing.get_args(TimestepSampling)}, "
                f"got {timestep_sampling!r}"
            )
        if timestep_sampling == "importance" and min_snr_gamma is None:
            raise ValueError(
                "timestep_sampling='importance' draws t by min-SNR-γ weights: set min_snr_gamma"
            )
        if timestep_sampling == "importance" and variance == "learned":
            raise ValueError(
                "timestep_sampling='importance' reweights the min-SNR term only: L_hybrid's "
                "λ·T·E_t[L_t] (variance='learned') needs t drawn uniformly"
            )
        self.loss, self.vlb_weight, self.min_snr_gamma = loss, vlb_weight, min_snr_gamma
        self.timestep_sampling = timestep_sampling
        self.label_dropout, self.guidance_weight = label_dropout, guidance_weight
        self.check_guidance()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: the network's ``sample_shape``, (C, H, W) for the UNet."""
        return tuple(self.unet.sample_shape)

    @property
    def class_conditional(self) -> bool:
        """Whether the network takes class labels y (a UNet built with ``num_classes``)."""
        return getattr(self.unet, "num_classes", None) is not None

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        shape = (getattr(data, "channels", None), getattr(data, "image_size", None))
        if None not in shape and shape != self.sample_shape[:2]:
            raise ValueError(
                f"the data gives {shape[0]}-channel {shape[1]}px images but the UNet takes "
                f"{self.sample_shape[0]}-channel {self.sample_shape[1]}px: set "
                "model.init_args.unet.init_args.{in_channels,image_size} to match "
                "data.init_args.{channels,image_size}"
            )

    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The regression target of the chosen parametrisation."""
        return regression_target(self.schedule, self.prediction, x0, t, noise)

    def model_output(self, x_t: Tensor, t: Tensor, **cond) -> Tensor:
        """The samplers' model function: ε̂(x_t, t), and with ``variance="learned"`` [ε̂, v]
        (2C channels) for the ancestral sampler's Σ_θ (the other samplers read ε̂ only)."""
        f, v = split_output(self.unet(x_t, t, **cond).float(), x_t)
        return join_output(
            convert_prediction(self.schedule, self.prediction, x_t, t, f, "eps"),
            v if self.variance == "learned" else None,
        )

    def eps(self, x_t: Tensor, t: Tensor, **cond) -> Tensor:
        """ε̂(x_t, t) (B, C, …): the network's first half converted to ε, whatever the variance."""
        f, _ = split_output(self.unet(x_t, t, **cond).float(), x_t)
        return convert_prediction(self.schedule, self.prediction, x_t, t, f, "eps")

    def loss_terms(self, x0: Tensor, t: Tensor, noise: Tensor, **cond) -> dict[str, Tensor]:
        """Per-sample loss terms (B,) at the given t and ε: ``"simple"`` and, with
        ``variance="learned"``, ``"vb"`` (:func:`~diffusion_apps.diffusion.loss_terms`)."""
        x_t = self.schedule.q_sample(x0, t, noise)
        f, v = split_output(self.unet(x_t, t, **cond), x_t)
        v = v if self.variance == "learned" else None
        return loss_terms(self.schedule, self.prediction, f, v, x0, x_t, t, noise, self.loss)

    def diffusion_loss(
        self, x0: Tensor, generator: torch.Generator | None = None, **cond
    ) -> Tensor:
        """L_simple, E‖target − f_θ(x_t, t)‖² (or ‖·‖₁ with ``loss="l1"``), for a batch x0 (B, …):
        one t and ε ~ N(0, I) per sample (:meth:`noised`), drawn from ``generator`` when given
        (validation: comparable across epochs); each term times w_t with ``min_snr_gamma``
        (over p(t) where t was drawn by importance). With a learned variance, L_hybrid: plus
        λ·T·E[L_t] (:meth:`loss_terms`)."""
        t, noise, _ = self.noised(x0, generator)
        terms = self.loss_terms(x0, t, noise, **cond)
        simple = terms["simple"]
        if self.min_snr_gamma is not None:
            w = min_snr_weight(self.schedule, self.prediction, t, self.min_snr_gamma)
            if self.timestep_sampling == "importance":
                m = self._timestep_proposal()
                w = w * m.mean() / m[t]
            simple = simple * w
        loss = simple.mean()
        if "vb" in terms:
            loss = loss + self.vlb_weight * self.schedule.num_timesteps * terms["vb"].mean()
        return loss

    def noised(
        self, x0: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(t, ε, x_t): t ~ U{0, …, T−1} (or ∝ m_t, ``timestep_sampling``) and ε ~ N(0, I) per
        sample, x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε."""
        n, T = x0.shape[0], self.schedule.num_timesteps
        if self.timestep_sampling == "importance":
            m = self._timestep_proposal().to(x0.device)
            t = torch.multinomial(m, n, replacement=True, generator=generator)
        else:
            t = torch.randint(0, T, (n,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return t, noise, self.schedule.q_sample(x0, t, noise)

    def _timestep_proposal(self) -> Tensor:
        """m_t = min(SNR_t, γ)/(SNR_t + 1) of every t ∈ {0, …, T−1}: v-prediction's min-SNR-γ
        weight, whatever the parametrisation."""
        t = torch.arange(self.schedule.num_timesteps, device=self.schedule.alphas_cumprod.device)
        return min_snr_weight(self.schedule, "v", t, self.min_snr_gamma)

    def diffused(self, images: Tensor) -> Tensor:
        """What the model diffuses, from a batch of images: the images themselves for DDPM."""
        return images

    def conditioning(self, x0: Tensor, batch=None) -> dict[str, Tensor]:
        """The network's inputs besides (x_t, t) for clean data x0 of ``batch`` (images, labels):
        for a class-conditional UNet (``num_classes``: ADM's ``class_cond``) the labels as y,
        ε_θ(x_t, t, y); none otherwise."""
        if not self.class_conditional:
            return {}
        return {"y": labelled(batch[1], self.unet.num_classes, type(self).__name__)}

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x0 = self.diffused(batch[0])
        loss = self.diffusion_loss(x0, **self.drop_labels(self.conditioning(x0, batch)))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        return loss

    def _heldout_loss(self, batch, batch_idx: int) -> Tensor:
        x0 = self.diffused(batch[0])
        gen = torch.Generator(x0.device).manual_seed(batch_idx)
        return self.diffusion_loss(x0, gen, **self.conditioning(x0, batch))

    def validation_step(self, batch, batch_idx: int) -> None:
        self.log("val/loss", self._heldout_loss(batch, batch_idx), prog_bar=True, sync_dist=True)
        if batch_idx == 0 and self.num_val_samples > 0 and self.trainer.is_global_zero:
            # Runs while the EMA callback has swapped the EMA weights in.
            self.log_validation_images(batch[0])

    def log_validation_images(self, x0: Tensor) -> None:
        """TensorBoard pictures of the first validation batch x0: a grid of fixed-seed samples
        (of a class-conditional model the classes 0, 1, … in turn, one column each up to K = 16)."""
        gen = torch.Generator(self.device).manual_seed(0)
        k = self.unet.num_classes if self.class_conditional else None
        nrow = k if k is not None and k <= 16 else None
        self.log_images("samples", self.sample(self.num_val_samples, generator=gen), nrow)

    def test_step(self, batch, batch_idx: int) -> None:
        self.log("test/loss", self._heldout_loss(batch, batch_idx), sync_dist=True)
