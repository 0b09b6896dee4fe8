"""Reconstruction metrics of the autoencoding methods: MSE, PSNR, SSIM, and LPIPS when possible."""

from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure


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


def lpips_metric(lpips_weights_path: str | None = None) -> Metric | None:
    """torchmetrics' LPIPS (AlexNet) when its backbone weights are on disk, else None.

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


class ReconstructionMetrics(Metric):
    """MSE, PSNR, SSIM (and LPIPS) of reconstructions against their targets.

    Images in [-1, 1] are clamped and mapped to [0, 1] first, the scale of DiffAE's tables, so
    ``mse`` is the mean squared error per pixel value on [0, 1] (a quarter of the [-1, 1] one) and

        psnr = 10 log10(1 / mse)   (data range 1; from the MSE of the whole set, as torchmetrics'
                                    PeakSignalNoiseRatio; inf for a perfect reconstruction),
        ssim = mean over images of torchmetrics' SSIM (11 x 11 Gaussian window, data range 1),
        lpips = mean LPIPS-AlexNet (inputs in [-1, 1], grey repeated to RGB).

    ``lpips`` is present only when the AlexNet weights are on disk (see :func:`lpips_metric`).
    States are sums, so the metric syncs under DDP.

    Args:
        lpips_weights_path: torchvision's AlexNet weights file; default: torch's hub cache.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, lpips_weights_path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        zero = torch.tensor(0.0, dtype=torch.float64)
        self.add_state("squared_error", zero.clone(), dist_reduce_fx="sum")
        self.add_state("ssim_sum", zero.clone(), dist_reduce_fx="sum")
        self.add_state("n_values", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("n_images", torch.tensor(0), dist_reduce_fx="sum")
        self.lpips = lpips_metric(lpips_weights_path)

    def update(self, reconstructions: Tensor, targets: Tensor) -> None:
        """Add a batch of reconstructions and targets, both (B, C, H, W) in [-1, 1]."""
        if reconstructions.shape != targets.shape or reconstructions.dim() != 4:
            shapes = (tuple(reconstructions.shape), tuple(targets.shape))
            raise ValueError(f"need reconstructions and targets of one (B, C, H, W), got {shapes}")
        x, y = ((a.float().clamp(-1, 1) + 1) / 2 for a in (reconstructions, targets))
        self.squared_error += (x - y).double().square().sum()
        self.n_values += x.numel()
        ssim = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
        self.ssim_sum += ssim.double().sum()
        self.n_images += len(x)
        if self.lpips is not None:
            rgb = [a.expand(-1, 3, -1, -1) * 2 - 1 for a in (x, y)]
            self.lpips.update(*rgb)

    def compute(self) -> dict[str, float]:
        """``mse``, ``psnr``, ``ssim``, ``n`` (images), and ``lpips`` when available."""
        if self.n_images == 0:
            raise RuntimeError("ReconstructionMetrics: no images; call update() first")
        mse = float(self.squared_error / self.n_values)
        out = {
            "mse": mse,
            "psnr": 10 * math.log10(1 / mse) if mse > 0 else math.inf,
            "ssim": float(self.ssim_sum / self.n_images),
            "n": int(self.n_images),
        }
        if self.lpips is not None:
            out["lpips"] = float(self.lpips.compute())
        return out

    def reset(self) -> None:
        super().reset()
        if self.lpips is not None:
            self.lpips.reset()
