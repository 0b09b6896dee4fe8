"""The sampling half of :class:`~diffusion_apps.methods.ddpm.DDPM`: timesteps, the clamp, the
generation declaration, and ancestral, DDIM or DPM-Solver++(2M) draws of its ε̂."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_apps.diffusion import (
    SAMPLERS,
    EpsFn,
    Sampler,
    Spacing,
    clip_denoised,
    run_sampler,
    timestep_subsequence,
)
from diffusion_apps.distributed import predict_indices
from diffusion_apps.methods.protocol import Generation, SampleRequest


class DDPMSampling:
    """Sampling of a DDPM-like module: it has ``schedule``, ``model_output`` (ε̂, or [ε̂, v]),
    ``sample_shape``, ``class_conditional``, ``unet`` and the configured ``sampler``,
    ``sample_steps``, ``eta``, ``timestep_spacing``, ``variance``, ``clip_x0``,
    ``label_dropout`` and ``guidance_weight`` (see :class:`DDPM`'s arguments), and
    :class:`~diffusion_apps.methods.ddpm_guidance.ClassifierFreeGuidance`'s ``guided_eps``."""

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """One sample per item of the batch, item i of the predict set drawn on its own
        (:meth:`predict_item`): under DDP, where the items are dealt out to the ranks, each
        item's image is the one a single process draws, and no two ranks draw the same. One
        image per sampler run: ``sample`` batches (and writes files)."""
        indices = predict_indices(self.trainer, batch_idx, dataloader_idx)
        return torch.cat([self.predict_item(i) for i in indices])

    def predict_item(self, index: int) -> Tensor:
        """Item ``index`` of ``predict``: one sample (1, C, H, W) from a generator seeded
        ``index``; a class-conditional model's of class ``index`` mod K, so the classes cycle over
        the predict set."""
        gen = torch.Generator(self.device).manual_seed(index)
        return self.sample(1, generator=gen, **self.generation.inputs_for(index, 1))

    def timesteps(
        self, steps: int, spacing: Spacing | None = None, sampler: Sampler | None = None
    ) -> Tensor:
        """The subsequence of ``steps`` ≤ T of the T training steps, spaced by ``spacing``;
        default: ``logsnr`` for ``dpmpp_2m`` (on uniform steps its last step overshoots: worse
        than DDIM), else ``timestep_spacing``."""
        T = self.schedule.num_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}] (T), got {steps}")
        spacing = spacing or ("logsnr" if sampler == "dpmpp_2m" else self.timestep_spacing)
        return timestep_subsequence(T, steps, spacing, self.schedule.alphas_cumprod)

    def sampling_eps(self, eps_fn: EpsFn | None = None) -> EpsFn:
        """``eps_fn`` (default :meth:`model_output`) as the samplers take it: with ``clip_x0``, its
        x̂_0 clamped to [−1, 1] and ε re-derived (:func:`~diffusion_apps.diffusion.clip_denoised`).
        Classifier guidance and PDAE's shift wrap this, so the clamp comes before the shift and
        is not repeated after it, as in guided-diffusion."""
        eps_fn = eps_fn or self.model_output
        return clip_denoised(eps_fn, self.schedule) if self.clip_x0 else eps_fn

    @property
    def generation(self) -> Generation:
        """Samples of the three samplers (:mod:`~diffusion_apps.methods.protocol`): unconditional,
        or of a class-conditional network each asked for a class label (default 0, 1, …, K−1)."""
        if not self.class_conditional:
            return Generation(
                SAMPLERS, self.sampler, self.sample_steps, inputs=("x_T",),
                max_steps=self.schedule.num_timesteps,
            )  # fmt: skip
        guided = bool(self.label_dropout)
        return Generation(
            SAMPLERS, self.sampler, self.sample_steps, inputs=("labels", "x_T"),
            num_classes=self.unet.num_classes, max_steps=self.schedule.num_timesteps,
            scale="classifier-free guidance w (Ho & Salimans; 0: conditional)" if guided else None,
            note=f"Class-conditional rows ({type(self).__name__}): asked for the classes 0, 1, …, "
            "K−1 in turn" + (f", guidance w = {self.guidance_weight:g}" if guided else "")
            + "; accuracy is the share classified as asked.",
        )  # fmt: skip

    def nfe(self, sampler: str, steps: int) -> int:
        """Network evaluations per sample: one per step (steps ≤ T), two under classifier-free
        guidance at the default w ≠ 0. DPM-Solver++(2M) one too: its second order is multistep,
        reusing the previous step's x̂_0."""
        return steps * (2 if self.guidance_weight else 1)

    def generate(self, num_samples: int, request: SampleRequest) -> Tensor:
        """:meth:`draw` of the request, clamped to [−1, 1]; sample i of a class-conditional model
        of class ``labels[i]`` (:meth:`label_inputs`), guided at w = ``scale`` (default
        ``guidance_weight``: :meth:`guided_eps`)."""
        r = request
        w = self.guidance_weight if r.scale is None else r.scale
        x0 = self.draw(num_samples, r.sampler, r.steps, r.eta, r.generator, r.progress,
                       x_T=r.x_T, eps_fn=self.guided_eps(w), spacing=r.spacing,
                       **self.label_inputs(num_samples, r.labels))  # fmt: skip
        return x0.clamp(-1, 1)

    def label_inputs(self, num_samples: int, labels=None) -> dict[str, Tensor]:
        """The network's y for ``num_samples`` samples of a class-conditional model: ``labels``
        cycled (default 0, 1, …, K−1); {} for an unconditional one."""
        if not self.class_conditional:
            return {}
        chosen = self.generation.inputs_for(0, num_samples, labels)["labels"]
        return {"y": torch.tensor(chosen, dtype=torch.long, device=self.device)}

    @torch.no_grad()
    def draw(
        self,
        num_samples: int,
        sampler: Sampler | None = None,
        steps: int | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        x_T: Tensor | None = None,
        eps_fn: EpsFn | None = None,
        spacing: Spacing | None = None,
        **cond,
    ) -> Tensor:
        """x̂_0 (N, *sample_shape) by DDPM ancestral, DDIM or DPM-Solver++(2M) sampling, not
        clamped.

        Unset arguments fall back to the module's configured sampler, steps, η and timestep
        spacing (``logsnr`` for DPM-Solver++: :meth:`timesteps`). ``eps_fn`` replaces
        :meth:`sampling_eps` and receives ``cond``: a guidance wrapper built on
        :meth:`sampling_eps`, which holds the ``clip_x0`` clamp.
        """
        sampler = sampler or self.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        timesteps = self.timesteps(steps or self.sample_steps, spacing, sampler)
        if x_T is None:
            x_T = torch.randn(
                (num_samples, *self.sample_shape), generator=generator, device=self.device
            )
        return run_sampler(
            sampler, eps_fn or self.sampling_eps(), self.schedule, x_T, timesteps,
            eta=self.eta if eta is None else eta, variance=self.variance,
            generator=generator, progress=progress, **cond,
        )  # fmt: skip
