"""Classifier-free guidance of :class:`~diffusion_apps.methods.ddpm.DDPM` (Ho & Salimans 2022):
label dropout in training, the guided ε in sampling.

Algorithm 1 (training): with probability p_uncond (``label_dropout``) the label c is replaced by
the null label ∅ (the UNet's label K, ``null_label``), so one network learns both ε_θ(x_t, y)
and ε_θ(x_t, ∅) ≈ E[ε | x_t], the unconditional (class-mixture) denoiser.

Algorithm 2 / eq. 6 (sampling) at guidance weight w:
    ε̃_θ(x_t, y) = (1 + w)·ε_θ(x_t, y) − w·ε_θ(x_t, ∅).
w = 0 is the conditional model, w = −1 the unconditional one. GLIDE and LDM write the same as
ε(∅) + s·(ε(y) − ε(∅)) with s = 1 + w (the shared wrapper's ``scale``); our ``guidance_weight``
and ``sample(scale=)`` are Ho & Salimans's w.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_apps.diffusion import EpsFn, classifier_free_guidance


class ClassifierFreeGuidance:
    """Label dropout and guided ε of a DDPM-like module with ``unet``, ``class_conditional``,
    ``label_dropout``, ``guidance_weight``, ``model_output`` and ``sampling_eps``."""

    def check_guidance(self) -> None:
        """Label dropout needs ∅ (a class-conditional UNet with its null label); the default w,
        a network that learnt ε(x_t, ∅) (:meth:`guided_eps` refuses it else)."""
        p = self.label_dropout
        if not 0 <= p < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {p}")
        if p > 0 and not self.class_conditional:
            raise ValueError(
                f"label_dropout={p} drops class labels, but the UNet is unconditional: set "
                "model.init_args.unet.init_args.num_classes"
            )
        if p > 0 and not getattr(self.unet, "null_label", False):
            raise ValueError(
                f"label_dropout={p} replaces labels by the null label ∅, but the UNet was built "
                "with null_label=false (no row for ∅): set model.init_args.unet.init_args."
                "null_label true"
            )
        self.guided_eps(self.guidance_weight)  # refuses a w this model cannot take

    def drop_labels(self, cond: dict[str, Tensor], generator=None) -> dict[str, Tensor]:
        """Training's ``cond`` with each label y replaced by ∅ = K with probability
        ``label_dropout`` (Algorithm 1: c ← ∅ with probability p_uncond)."""
        if not self.label_dropout:
            return cond
        y = cond["y"]
        drop = torch.rand(y.shape, generator=generator, device=y.device) < self.label_dropout
        return {**cond, "y": y.masked_fill(drop, self.unet.num_classes)}

    def guided_eps(self, w: float) -> EpsFn | None:
        """ε̃ of eq. 6 at weight w: the shared wrapper
        :func:`~diffusion_apps.diffusion.classifier_free_guidance` at s = 1 + w, both branches
        in one batched call. The clamp of ``clip_x0`` acts on x̂_0 of the guided ε̃, as GLIDE's
        sampler clamps its guided model's x̂_0. None at w = 0: the sampler's own ε, one network
        call a step."""
        if w == 0:
            return None
        if w < -1:
            raise ValueError(f"the guidance weight w must be >= -1 (-1: ε(∅)), got {w:g}")
        if not self.label_dropout:
            raise ValueError(
                f"classifier-free guidance (w = {w:g}) needs ε(x_t, ∅): this DDPM was trained "
                "without label_dropout"
            )
        null = {"y": self.unet.num_classes}
        return self.sampling_eps(classifier_free_guidance(self.model_output, 1 + w, null))
