"""Reconstruction metrics of the autoencoding methods: MSE, PSNR, SSIM, and LPIPS when possible."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure

from diffusion_apps.lpips import lpips_metric


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
