"""Images in [−1, 1] as grids: for TensorBoard, PNG files and reports."""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor


def to_unit(images: Tensor) -> Tensor:
    """Map model images in [−1, 1] to [0, 1] on the CPU in fp32, clamping strays: (x + 1)/2."""
    return (images.detach().float().cpu().clamp(-1, 1) + 1) / 2


def grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """One grid (C, H', W') in [0, 1] of images (N, C, H, W) in [−1, 1], ``nrow`` images a row
    (default: square-ish)."""
    from torchvision.utils import make_grid

    nrow = nrow or math.ceil(math.sqrt(len(images)))
    return make_grid(to_unit(images), nrow=nrow, padding=1)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save ``grid(images, nrow)`` as a PNG, creating its folder."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid(images, nrow), path)
    return path
