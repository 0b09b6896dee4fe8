"""LPIPS (Zhang et al. 2018) from local weights: eval's perceptual metric and the first stage's
perceptual loss (its ``.net``). torchmetrics is imported only when one is built."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch
from torch import nn


@contextlib.contextmanager
def _hub_dir_holding(file: Path, name: str):
    """Point torch's hub cache, for the duration, at a temporary one where ``name`` is ``file``."""
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "checkpoints").mkdir()
        (Path(tmp) / "checkpoints" / name).symlink_to(file.resolve())
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub.set_dir(previous)


def lpips_metric(lpips_weights_path: str | None = None) -> nn.Module | None:
    """torchmetrics' LPIPS (AlexNet) metric when its backbone weights are on disk, else None.

    torchmetrics ships the LPIPS heads; the backbone is torchvision's ImageNet AlexNet
    (``alexnet-owt-7be5be79.pth``), found at ``lpips_weights_path`` or in torch's hub cache,
    where any online torchvision use puts it. Never downloads.

    Raises:
        FileNotFoundError: ``lpips_weights_path`` is given but is not a file.
    """
    from torchvision.models import AlexNet_Weights

    name = Path(AlexNet_Weights.IMAGENET1K_V1.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if lpips_weights_path is not None and not Path(lpips_weights_path).is_file():
        raise FileNotFoundError(
            f"lpips_weights_path={lpips_weights_path!r} does not exist; it should be "
            f"torchvision's AlexNet weights {name} ({AlexNet_Weights.IMAGENET1K_V1.url})"
        )
    if lpips_weights_path is None and not cached.is_file():
        return None
    from torchmetrics.image import LearnedPerceptualImagePatchSimilarity as LPIPS

    if lpips_weights_path is None:
        return LPIPS(net_type="alex")
    with _hub_dir_holding(Path(lpips_weights_path), name):
        return LPIPS(net_type="alex")
