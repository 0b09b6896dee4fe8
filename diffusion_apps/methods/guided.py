"""Classifier guidance (Dhariwal & Nichol 2021; official code openai/guided-diffusion).

A noisy classifier p_φ(y | x_t), trained on the forward process of a given DDPM, steers that
frozen unconditional DDPM towards a class: its gradient g = ∇_{x_t} log p_φ(y | x_t) shifts the
ancestral mean (Algorithm 1) or the predicted noise (Algorithm 2), through the guidance wrappers
of :mod:`diffusion_apps.diffusion.guidance` and the DDPM's own sampling loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor

from diffusion_apps.diffusion import (
    EpsFn,
    Sampler,
    classifier_log_prob_grad,
    eps_shift_guidance,
    mean_shift_guidance,
)
from diffusion_apps.methods.base import DiffusionMethod
from diffusion_apps.methods.ddpm import DDPM
from diffusion_apps.methods.protocol import Generates, Generation, SampleRequest
from diffusion_apps.nn import EncoderUNet

NOISE_LEVELS = ("low", "mid", "high")


def noise_level_range(level: str, num_timesteps: int) -> tuple[int, int]:
    """[lo, hi) of a third of the T timesteps: low [0, ⌊T/3⌋), mid [⌊T/3⌋, ⌊2T/3⌋),
    high [⌊2T/3⌋, T)."""
    i = NOISE_LEVELS.index(level)
    return i * num_timesteps // 3, (i + 1) * num_timesteps // 3


class NoisyClassifier(DiffusionMethod):
    """f_φ(x_t, t) → logits, trained with cross-entropy on x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε,
    t ~ U{0, …, T−1}, under the schedule of the DDPM it will guide.

    The schedule is read from that DDPM's checkpoint (never typed twice); the classifier's
    checkpoint saves the DDPM's config, so it loads on its own. Validation logs the loss at
    t ~ U{0, …, T−1} and the accuracy in each third of the noise range
    (``val/acc_low``, ``val/acc_mid``, ``val/acc_high``).

    Args:
        classifier: ADM's noisy classifier: the UNet's encoder half with ``time_conditioned``,
            ``out_dim`` = number of classes (ADM: attention pooling).
        diffusion: checkpoint path of the DDPM to be guided.
        lr, weight_decay: AdamW (ADM: 3e-4 and 0.05).
        warmup_steps, adam_betas, compile: see :class:`DiffusionMethod`.
    """

    sample_instead = (
        "it is a noisy classifier, which guides a DDPM: sample --ckpt_path <that DDPM's "
        "checkpoint> --classifier_path <this one>"
    )

    def __init__(
        self,
        classifier: EncoderUNet,
        diffusion: str,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        compile: bool = False,
    ) -> None:
        super().__init__(lr, weight_decay, warmup_steps, adam_betas, compile)
        self.save_config()
        if not classifier.time_conditioned:
            raise ValueError("a noisy classifier must be built with time_conditioned=True")
        ddpm = self.load_part(diffusion, DDPM)
        c, size = classifier.in_channels, classifier.image_size
        if tuple(ddpm.sample_shape) != (c, size, size):
            raise ValueError(
                f"the classifier takes {c}-channel {size}px images, the DDPM in {diffusion} draws "
                f"{tuple(ddpm.sample_shape)}"
            )
        self.classifier = classifier
        self.schedule = ddpm.schedule  # non-persistent buffers: rebuilt from the DDPM's config

    @property
    def num_classes(self) -> int:
        return self.classifier.out_dim

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Logits (B, K) of noisy images x_t at original timestep indices t."""
        return self.classifier(x_t, t).float()

    def _noisy_loss(self, x0, y, t, generator=None) -> tuple[Tensor, Tensor]:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        logits = self(self.schedule.q_sample(x0, t, noise), t)
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).float()

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x0, y = batch[0], batch[1]
        t = torch.randint(0, self.schedule.num_timesteps, (len(x0),), device=x0.device)
        loss, correct = self._noisy_loss(x0, y, t)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", correct.mean())
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        """Loss at uniform t, and accuracy with t uniform within each third of [0, T), all
        drawn from a generator seeded by the batch index (comparable across validations)."""
        x0, y = batch[0], batch[1]
        T, n = self.schedule.num_timesteps, len(x0)
        gen = torch.Generator(x0.device).manual_seed(batch_idx)
        t = torch.randint(0, T, (n,), generator=gen, device=x0.device)
        loss, _ = self._noisy_loss(x0, y, t, gen)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        for level in NOISE_LEVELS:
            lo, hi = noise_level_range(level, T)
            t = torch.randint(lo, hi, (n,), generator=gen, device=x0.device)
            _, correct = self._noisy_loss(x0, y, t, gen)
            self.log(f"val/acc_{level}", correct.mean(), sync_dist=True, batch_size=n)


class ClassifierGuidedDDPM(Generates, LightningModule):
    """Class-conditional samples of a frozen DDPM, guided by a noisy classifier: of an
    unconditional DDPM (the paper's ADM-G on LSUN), or of a class-conditional one, ε_θ(x_t, t, y)
    asked for the guided class y (ADM-G on ImageNet, guided-diffusion's ``model_fn`` with
    ``class_cond``).

    With g = ∇_{x_t} log p_φ(y | x_t) (computed on a detached x_t, the DDPM never sees a
    gradient) and gradient scale s:
        ancestral (Algorithm 1):  μ' = μ_θ(x_t, t) + s·Σ_t·g,   x_{t−1} ~ N(μ', Σ_t);
        DDIM (Algorithm 2):       ε' = ε_θ(x_t, t) − s·√(1−ᾱ_t)·g, then x̂_0 and the step from ε'.
    On a respaced subsequence the classifier gets the original timestep index. With
    ``clip_x0`` (the DDPM's setting) the model's x̂_0 is clamped first and the shift comes after,
    unclamped, as guided-diffusion does (``p_mean_variance`` clamps; ``condition_score``
    re-derives ε from the clamped x̂_0 and shifts it; ``condition_mean`` adds s·Σ·g to the mean of
    the clamped x̂_0). DPM-Solver++ takes the same order, so s means the same for every sampler.

    A LightningModule (not a plain ``nn.Module``) so that ``.to(device)`` also updates the
    ``device`` of both parts, which the DDPM's sampling loop draws x_T on.

    Args:
        ddpm: the diffusion model (frozen here: no gradients, eval mode); a class-conditional
            one must have the classifier's classes (one trained for classifier-free guidance is
            guided here from its conditional ε, w = 0).
        classifier: a :class:`NoisyClassifier` trained on the same schedule.
    """

    def __init__(self, ddpm: DDPM, classifier: NoisyClassifier) -> None:
        super().__init__()
        ours, theirs = ddpm.schedule.alphas_cumprod, classifier.schedule.alphas_cumprod
        if len(ours) != len(theirs) or not torch.allclose(ours, theirs):
            raise ValueError(
                f"the classifier was trained on another noise schedule (T = {len(theirs)}) than "
                f"the DDPM's (T = {len(ours)})"
            )
        shape = (classifier.classifier.in_channels, *[classifier.classifier.image_size] * 2)
        if tuple(ddpm.sample_shape) != shape:
            raise ValueError(
                f"the classifier takes {shape} images, the DDPM draws {tuple(ddpm.sample_shape)}"
            )
        if ddpm.class_conditional and ddpm.unet.num_classes != classifier.num_classes:
            raise ValueError(
                f"the classifier tells {classifier.num_classes} classes, the class-conditional "
                f"DDPM takes {ddpm.unet.num_classes}"
            )
        self.ddpm = ddpm.requires_grad_(False).eval()
        self.classifier = classifier.requires_grad_(False).eval()

    @classmethod
    def from_checkpoints(cls, ddpm_path: str, classifier_path: str) -> ClassifierGuidedDDPM:
        from diffusion_apps.checkpoint import load_module

        ddpm = load_module(ddpm_path, DDPM)
        classifier = load_module(classifier_path, NoisyClassifier)
        try:
            return cls(ddpm, classifier)
        except ValueError as err:
            raise ValueError(f"{classifier_path} cannot guide {ddpm_path}: {err}") from None

    def guided_eps(self, scale: float, sampler: Sampler, timesteps: Tensor) -> EpsFn:
        """The DDPM's :meth:`~DDPM.sampling_eps` (x̂_0 clamped with ``clip_x0``) wrapped by
        Algorithm 1's mean shift (``ddpm``) or Algorithm 2's ε shift (the ODE samplers ``ddim``
        and ``dpmpp_2m``); the wrapper takes the labels as ``y``. At s = 0, no gradient."""
        ddpm = self.ddpm
        clipped = ddpm.sampling_eps()

        def eps(x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
            return clipped(x_t, t, y=y) if ddpm.class_conditional else clipped(x_t, t)

        if scale == 0:
            return eps
        grad = classifier_log_prob_grad(self.classifier)
        if sampler != "ddpm":
            return eps_shift_guidance(eps, grad, ddpm.schedule, scale)
        return mean_shift_guidance(
            eps, grad, ddpm.schedule, scale, ddpm.variance, timesteps=timesteps
        )

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.ddpm.sample_shape

    @property
    def generation(self) -> Generation:
        """The DDPM's samplers, each sample asked for a class label, the gradient scale s."""
        return Generation(
            self.ddpm.generation.samplers, self.ddpm.sampler, self.ddpm.sample_steps,
            inputs=("labels", "x_T"), num_classes=self.classifier.num_classes,
            max_steps=self.ddpm.schedule.num_timesteps,
            scale="classifier-guidance gradient scale s",
        )  # fmt: skip

    def nfe(self, sampler: str, steps: int) -> int:
        """The DDPM's network evaluations per sample (each step adds one classifier gradient)."""
        return self.ddpm.nfe(sampler, steps)

    def generate(self, num_samples: int, request: SampleRequest) -> Tensor:
        """Images (N, C, H, W) in [−1, 1], sample i guided towards class ``labels[i]`` (the
        labels cycled; default 0, 1, …, K−1) at gradient scale s = ``scale`` (default 1; 0 is
        the unguided DDPM). Unset sampler settings are the DDPM's."""
        r = request
        scale = 1.0 if r.scale is None else r.scale
        chosen = self.generation.inputs_for(0, num_samples, r.labels)["labels"]
        sampler = r.sampler or self.ddpm.sampler
        timesteps = self.ddpm.timesteps(r.steps or self.ddpm.sample_steps, r.spacing, sampler)
        eps_fn = self.guided_eps(scale, sampler, timesteps)
        y = torch.tensor(chosen, dtype=torch.long, device=self.ddpm.device)
        x0 = self.ddpm.draw(
            num_samples, sampler, r.steps, r.eta, r.generator, r.progress,
            x_T=r.x_T, eps_fn=eps_fn, spacing=r.spacing, y=y,
        )  # fmt: skip
        return x0.clamp(-1, 1)
