"""Captions of digits, for text-conditioned LDM: "thick slanted seven".

Two properties are measured from the pixels and split at their medians over the embedded train
digits (32 px), so each word is about equally frequent:

* stroke width w = 2·Σ ink / Σ |∇ ink| (a stroke of width w and length l has ink ≈ w·l and two
  edges of total variation ≈ 2·l), ink = (x + 1)/2: "thin" or "thick";
* slant s = −cov(u, v)/var(v) of the ink's column u and row v (rows grow downwards, so s > 0
  when the top leans right): "upright" or "slanted".
"""

from __future__ import annotations

import torch
from torch import Tensor

DIGIT_DATASETS = ("digits", "mnist")  # ImageDataModule sources of digit images
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS = ("thin", "thick")
SLANT = ("upright", "slanted")
WORDS = (*THICKNESS, *SLANT, *DIGITS)  # the caption vocabulary
WIDTH_MEDIAN = 2.36  # px, measured on the embedded train digits at 32 px
SLANT_MEDIAN = 0.13


def stroke_width(images: Tensor) -> Tensor:
    """w = 2·Σ ink / Σ |∇ ink| per image (B,), images (B, 1, H, W) in [−1, 1], in pixels."""
    ink = (images.float() + 1) / 2
    dx = ink[..., :-1, 1:] - ink[..., :-1, :-1]
    dy = ink[..., 1:, :-1] - ink[..., :-1, :-1]
    edges = (dx.square() + dy.square()).sqrt().sum((1, 2, 3))
    return 2 * ink.sum((1, 2, 3)) / edges.clamp(min=1e-6)


def slant(images: Tensor) -> Tensor:
    """s = −cov(u, v)/var(v) of the ink distribution per image (B,): horizontal shift per row."""
    ink = (images.float() + 1) / 2
    mass = ink.sum((1, 2, 3)).clamp(min=1e-6)
    H, W = images.shape[-2:]
    v = torch.arange(H, dtype=ink.dtype, device=ink.device)[:, None]  # rows, downwards
    u = torch.arange(W, dtype=ink.dtype, device=ink.device)[None, :]  # columns
    mean_u, mean_v = (ink * u).sum((1, 2, 3)) / mass, (ink * v).sum((1, 2, 3)) / mass
    du, dv = u - mean_u[:, None, None, None], v - mean_v[:, None, None, None]
    cov = (ink * du * dv).sum((1, 2, 3)) / mass
    var = (ink * dv.square()).sum((1, 2, 3)) / mass
    return -cov / var.clamp(min=1e-6)


def describe(
    images: Tensor, labels: Tensor, drop: float = 0.0, generator: torch.Generator | None = None
) -> list[str]:
    """Captions "<thin|thick> <upright|slanted> <digit>" of digit images (B, 1, H, W) in [−1, 1].

    Args:
        images: the digits.
        labels: their classes (B,), 0-9.
        drop: probability of leaving out each property word independently, so the model also
            learns the partial captions "thick seven", "slanted seven" and "seven".
        generator: draws the left-out words.
    """
    if images.ndim != 4 or images.shape[1] != 1 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"describe needs one-channel images (B, 1, H, W) and labels (B,), got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise ValueError("describe needs digit labels in 0..9 (an unlabelled dataset has -1)")
    thick = (stroke_width(images) >= WIDTH_MEDIAN).tolist()
    slanted = (slant(images) >= SLANT_MEDIAN).tolist()
    keep = torch.rand((len(labels), 2), generator=generator) >= drop
    captions = []
    for i, label in enumerate(labels.tolist()):
        words = [THICKNESS[thick[i]], SLANT[slanted[i]]]
        captions.append(
            " ".join(
                [w for w, k in zip(words, keep[i].tolist(), strict=True) if k] + [DIGITS[label]]
            )
        )
    return captions
