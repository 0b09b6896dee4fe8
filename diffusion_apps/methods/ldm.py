"""Latent diffusion (Rombach et al., CVPR 2022; CompVis/latent-diffusion): a DDPM on the latents
of a frozen first-stage autoencoder, conditioned by cross-attention, sampled with
classifier-free guidance (Ho & Salimans 2022)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from diffusion_apps.data.captions import DIGIT_DATASETS, DIGITS, WORDS, describe
from diffusion_apps.diffusion import NoiseSchedule, Sampler, classifier_free_guidance
from diffusion_apps.distributed import pooled_mean_std
from diffusion_apps.methods.autoencoder_kl import AutoencoderKL
from diffusion_apps.methods.ddpm import DDPM, labelled
from diffusion_apps.methods.protocol import Generation, SampleRequest
from diffusion_apps.nn import CaptionEncoder, ClassEmbedder, UNet


class LatentDiffusion(DDPM):
    """Stage 2: L_LDM = E_{E(x), y, ε, t} ‖ε − ε_θ(z_t, t, τ_θ(y))‖² (LDM eq. 3), z_0 = s·z,
    z ~ q(z | x) of the frozen first stage, s = 1/std(z) measured once, on the first training
    batch (every rank's under DDP), and saved with the weights (a resumed run keeps it); a first
    stage that knows its s (``scaling_factor``: an imported VAE's) gives it instead. Samples
    are decoded as D(z_0/s).

    Either first-stage kind, through the same encode/decode: KL, z sampled from the Gaussian;
    VQ (LDM's VQ-reg), z = z_e the pre-quantisation latent, and D quantises it to its nearest
    codes (LDM Sec. 3.1: the quantisation "absorbed by the decoder"). LDM's VQ configs keep
    s = 1; we measure s for both kinds (the std of our z_e is not 1).

    Conditioning: τ_θ (class embedding or caption encoder) gives the context of the UNet's
    cross-attention, softmax(QKᵀ/√d)·V with Q = W_q φ(z_t), K = W_k τ_θ(y), V = W_v τ_θ(y).
    Training replaces y by the null condition ∅ for a fraction ``cond_drop`` of the examples;
    sampling uses ε̂ = ε(z_t, ∅) + w·(ε(z_t, y) − ε(z_t, ∅)) through the shared guidance wrapper,
    so DDPM and DDIM sampling both take it. Captions come from the data when it gives them
    (batches (images, labels, captions): a folder with a ``.txt`` beside each image), else are
    measured from the training digits ("thick slanted seven", :mod:`diffusion_apps.data.captions`).
    A byte-level caption model (``tokenizer="bytes"``) takes any prompt, and no labels.

    Args:
        unet: the latent denoiser; ``in_channels``/``image_size`` must match the first stage's
            latent shape, ``context_dim`` the condition encoder's ``dim`` (None without one).
        first_stage: path of a trained :class:`AutoencoderKL` checkpoint, KL- or VQ-regularised
            (read with ``weights_only=True``; its config and weights are saved in this module's
            checkpoint).
        condition: τ_θ, or None for an unconditional LDM.
        cond_drop: fraction of training examples whose condition is replaced by ∅ (LDM: 0.1).
        caption_drop: probability of leaving out each property word of a measured digit caption
            (the data's own captions are kept whole).
        guidance_scale: w of validation grids and of ``sample`` when not given.
        schedule: default LDM's "linear", β = linspace(√0.0015, √0.0195, 1000)².
        Other arguments: see :class:`DDPM` (ε-prediction; x̂_0 is not clipped in latent space).
    """

    def __init__(
        self,
        unet: UNet,
        first_stage: str,
        condition: ClassEmbedder | CaptionEncoder | None = None,
        cond_drop: float = 0.1,
        caption_drop: float = 0.5,
        guidance_scale: float = 1.0,
        schedule: NoiseSchedule | None = None,
        sampler: Sampler = "ddim",
        sample_steps: int = 50,
        eta: float = 0.0,
        num_val_samples: int = 40,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        compile: bool = False,
    ) -> None:
        schedule = schedule or NoiseSchedule("sqrt_linear", 1000, 0.0015, 0.0195)
        super().__init__(
            unet, schedule=schedule, prediction="eps", sampler=sampler, sample_steps=sample_steps,
            eta=eta, timestep_spacing="uniform", variance="beta", clip_x0=False,
            num_val_samples=num_val_samples, loss="mse", lr=lr, weight_decay=weight_decay,
            warmup_steps=warmup_steps, adam_betas=adam_betas, compile=compile,
        )  # fmt: skip
        if not 0.0 <= cond_drop < 1.0 or not 0.0 <= caption_drop <= 1.0:
            raise ValueError(f"cond_drop must lie in [0, 1) and caption_drop in [0, 1], got "
                             f"{cond_drop}, {caption_drop}")  # fmt: skip
        self.first_stage = self.load_part(first_stage, AutoencoderKL)
        if tuple(unet.sample_shape) != tuple(self.first_stage.latent_shape):
            raise ValueError(
                f"the UNet takes {tuple(unet.sample_shape)} but the first stage {first_stage} "
                f"makes latents of shape {tuple(self.first_stage.latent_shape)}: set the UNet's "
                "in_channels and image_size to match"
            )
        context_dim = None if condition is None else condition.dim
        if unet.context_dim != context_dim or unet.num_classes is not None:
            raise ValueError(
                f"the UNet's context_dim={unet.context_dim} must equal the condition encoder's "
                f"dim={context_dim} (and num_classes must be unset: labels go through τ_θ)"
            )
        words = isinstance(condition, CaptionEncoder) and condition.tokenizer == "words"
        if words and set(WORDS) - set(condition.vocabulary):
            raise ValueError(f"the caption encoder's vocabulary must hold the words {WORDS}")
        self.condition = condition
        self.cond_drop, self.caption_drop, self.guidance_scale = (
            cond_drop,
            caption_drop,
            guidance_scale,
        )
        known = self.first_stage.scaling_factor  # an imported VAE's, e.g. SD's 0.18215
        self.register_buffer("scale_factor", torch.tensor(1.0 if known is None else known))
        self.register_buffer("scale_ready", torch.tensor(known is not None))
        self.val_prompts: list[str] | None = None  # the validation grid's, for byte captions

    def setup(self, stage: str) -> None:
        """The data's images must be the first stage's input, and captions in the data need a
        caption model: both checked before the first batch."""
        data = getattr(self.trainer, "datamodule", None)
        shape = (getattr(data, "channels", None), getattr(data, "image_size", None))
        takes = self.first_stage.sample_shape[:2]
        if None not in shape and shape != takes:
            raise ValueError(
                f"the data gives {shape[0]}-channel {shape[1]}px images but the first stage "
                f"{self.hparams.first_stage} takes {takes[0]}-channel {takes[1]}px: set "
                "data.init_args.{channels,image_size} to match, or train a first stage on these "
                "images (configs/ldm_autoencoder.yaml)"
            )
        captions, dataset = getattr(data, "captions", False), getattr(data, "dataset", "digits")
        if captions and not isinstance(self.condition, CaptionEncoder):
            raise ValueError(
                "the data gives captions but this LDM's condition is "
                f"{type(self.condition).__name__}: condition it with a CaptionEncoder, or set "
                "data.init_args.captions false"
            )
        if (
            isinstance(self.condition, CaptionEncoder)
            and not captions
            and dataset not in DIGIT_DATASETS
        ):
            raise ValueError(
                f"a caption-conditional LDM needs captions, and dataset={dataset!r} gives none "
                "(they are measured from the digits only): for a folder set "
                "data.init_args.captions true, with the caption of a.png in a.txt beside it"
            )

    @property
    def byte_captions(self) -> bool:
        """Whether τ_θ is a byte-level caption encoder (open vocabulary, no labels)."""
        return isinstance(self.condition, CaptionEncoder) and self.condition.tokenizer == "bytes"

    # -- the latent space ------------------------------------------------------------------------

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if not bool(self.scale_ready):
            self.measure_scale(batch[0])

    @torch.no_grad()
    def measure_scale(self, images: Tensor) -> None:
        """s = 1/std(z) over every element of z ~ q(z | x) for a batch of images (LDM's
        ``scale_by_std``); under DDP over every rank's batch, so all ranks get one s."""
        z = self.first_stage.encode(images).sample().double()
        _, std, _ = pooled_mean_std(z.sum(), z.square().sum(), z.numel(), self._trainer)
        self.scale_factor.fill_(float(1.0 / std))
        self.scale_ready.fill_(True)

    @torch.no_grad()
    def diffused(self, images: Tensor) -> Tensor:
        """z_0 = s·z, z ~ q(z | x) (the first stage's posterior sample, as LDM trains; for VQ
        the pre-quantisation z_e)."""
        return self.scale_factor * self.first_stage.encode(images).sample()

    @torch.no_grad()
    def decode(self, z0: Tensor) -> Tensor:
        """Images D(z_0/s) in [−1, 1] (a VQ first stage's D quantises z_0/s first)."""
        return self.first_stage.decode(z0 / self.scale_factor).clamp(-1, 1)

    # -- conditions ------------------------------------------------------------------------------

    def captions(self, batch) -> list[str]:
        """The captions of a batch (images, labels[, captions]): the data's, else measured from
        its digits (property words dropped with probability ``caption_drop`` in training)."""
        if len(batch) > 2:
            return list(batch[2])
        return describe(batch[0], batch[1], self.caption_drop if self.training else 0.0)

    def condition_ids(self, batch) -> Tensor:
        """y of a training batch: its labels, or the token ids of its captions."""
        labels = batch[1]
        if isinstance(self.condition, CaptionEncoder):
            return self.condition.tokenize(self.captions(batch), labels.device)
        return labelled(labels, self.condition.num_classes, type(self).__name__)

    def conditioning(self, x0: Tensor, batch) -> dict[str, Tensor]:
        """{"context": τ_θ(y)}, y replaced by ∅ for a fraction ``cond_drop`` in training."""
        if self.condition is None:
            return {}
        ids = self.condition_ids(batch)
        if self.training and self.cond_drop > 0:
            dropped = torch.rand(len(ids), device=ids.device) < self.cond_drop
            ids = torch.where(dropped.view(-1, *[1] * (ids.ndim - 1)), self.null_ids(1), ids)
        return {"context": self.condition(ids)}

    def null_ids(self, batch: int) -> Tensor:
        return self.condition.null(batch, self.device)

    def requested_ids(
        self, num_samples: int, labels: Sequence[int] | None, prompts: Sequence[str] | None
    ) -> Tensor:
        """y for ``num_samples`` samples, cycling through ``labels`` or ``prompts`` (default: the
        classes 0, 1, …, 9 in turn; a word-level caption model gets the digit's name, a byte-level
        one the empty caption ∅)."""
        if labels is not None and prompts is not None:
            raise ValueError("give labels or prompts, not both")
        asked = self.generation.inputs_for(0, num_samples, labels, prompts)
        if "prompts" in asked:
            return self.prompt_ids(asked["prompts"])
        if self.byte_captions:
            return self.null_ids(num_samples)
        if isinstance(self.condition, ClassEmbedder):
            return torch.tensor(asked["labels"], dtype=torch.long, device=self.device)
        return self.condition.tokenize([DIGITS[c] for c in asked["labels"]], self.device)

    def prompt_ids(self, prompts: Sequence[str]) -> Tensor:
        """Token ids of sampling prompts; a byte-level model warns of those it truncates."""
        if self.byte_captions:
            limit = self.condition.max_len
            long = sorted({p for p in prompts if len(" ".join(p.split()).encode()) > limit})
            if long:
                warnings.warn(
                    f"prompts longer than the caption encoder's max_len={limit} UTF-8 bytes are "
                    f"cut to their first {limit}: {long}",
                    stacklevel=2,
                )
        return self.condition.tokenize(prompts, self.device)

    # -- sampling --------------------------------------------------------------------------------

    @property
    def generation(self) -> Generation:
        """Unconditional, or class labels (a caption model: labels name the digit, or prompts),
        guided by classifier-free guidance of scale w."""
        unconditional = super().generation
        if self.condition is None:
            return replace(unconditional, inputs=())
        if self.byte_captions:
            return replace(
                unconditional,
                inputs=("prompts",),
                scale="classifier-free guidance w",
                note="Caption-conditional rows (LatentDiffusion, byte-level captions): asked for "
                "the given prompts, else the empty caption (unconditional samples).",
            )
        captions = isinstance(self.condition, CaptionEncoder)
        return replace(
            unconditional,
            inputs=("labels", "prompts") if captions else ("labels",),
            num_classes=len(DIGITS) if captions else self.condition.num_classes,
            scale="classifier-free guidance w",
            note="Class-conditional rows (LatentDiffusion): asked for the classes 0, 1, …, 9 in "
            "turn, at the checkpoint's guidance scale; accuracy is the share classified as asked.",
        )  # fmt: skip

    def nfe(self, sampler: str, steps: int) -> int:
        """Network evaluations per sample: two per step under guidance (w ≠ 1: ε(y) and ε(∅))."""
        per_step = 2 if self.condition is not None and self.guidance_scale != 1 else 1
        return super().nfe(sampler, steps) * per_step

    def generate(self, num_samples: int, request: SampleRequest) -> Tensor:
        """Images in [−1, 1] (N, C, H, W): latents drawn by DDPM/DDIM/DPM-Solver++ with
        classifier-free guidance of scale w = ``scale`` (default ``guidance_scale``; w = 1 is
        plain conditional sampling and skips the ∅ pass), decoded by the first stage."""
        r = request
        kw = dict(generator=r.generator, progress=r.progress, spacing=r.spacing)
        if self.condition is None:
            return self.decode(self.draw(num_samples, r.sampler, r.steps, r.eta, **kw))
        w = self.guidance_scale if r.scale is None else r.scale
        context = self.condition(self.requested_ids(num_samples, r.labels, r.prompts))
        eps_fn = None
        if w != 1:
            null = self.condition(self.null_ids(1))  # (1, L, dim), broadcast by the wrapper
            eps_fn = classifier_free_guidance(self.eps, w, {"context": null})
        x0 = self.draw(num_samples, r.sampler, r.steps, r.eta, eps_fn=eps_fn, context=context, **kw)
        return self.decode(x0)

    def validation_step(self, batch, batch_idx: int) -> None:
        if batch_idx == 0 and self.byte_captions:
            self.val_prompts = self.captions(batch)
        super().validation_step(batch, batch_idx)

    def log_validation_images(self, x0: Tensor) -> None:
        """Fixed-seed samples at ``guidance_scale``: one column per class (or digit name), or for
        a byte-level caption model the captions of the first validation batch in turn."""
        gen = torch.Generator(self.device).manual_seed(0)
        prompts = self.val_prompts if self.byte_captions else None
        images = self.sample(self.num_val_samples, generator=gen, prompts=prompts)
        nrow = 10 if self.condition is not None and prompts is None else None
        self.log_images(f"samples (w = {self.guidance_scale:g})", images, nrow)
