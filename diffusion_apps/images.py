"""Images in [−1, 1] as grids: for TensorBoard, PNG files and reports."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor


def to_unit(images: Tensor) -> Tensor:
    """Map model images in [−1, 1] to [0, 1] on the CPU in fp32, clamping strays: (x + 1)/2."""
    return (images.detach().float().cpu().clamp(-1, 1) + 1) / 2


def to_uint8(images: Tensor) -> Tensor:
    """Images in [−1, 1] as uint8 on the CPU, quantised as :func:`save_png` writes them
    (torchvision's ``save_image``): ⌊255·(x + 1)/2 + 0.5⌋, clamped to 0..255."""
    return to_unit(images).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """One grid (C, H', W') in [0, 1] of images (N, C, H, W) in [−1, 1], ``nrow`` images a row
    (default: square-ish)."""
    from torchvision.utils import make_grid

    nrow = nrow or math.ceil(math.sqrt(len(images)))
    return make_grid(to_unit(images), nrow=nrow, padding=1)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write one image (C, H, W) in [0, 1] as a PNG, whole or not at all: it is written beside
    ``path`` and renamed over it, so a full disk or a kill leaves no partial PNG. An OSError
    becomes a ValueError naming the file."""
    from torchvision.utils import save_image

    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_image(image, partial, format="png")
        os.replace(partial, path)
    except OSError as err:
        raise ValueError(
            f"cannot write {path} ({type(err).__name__}: {err.strerror or err})"
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    return path


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save ``grid(images, nrow)`` as a PNG (:func:`save_png`), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(grid(images, nrow), path)
