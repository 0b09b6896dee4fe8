"""Interpolation between latents: spherical for Gaussian noise codes (DDIM Appendix D.5)."""

from __future__ import annotations

import torch
from torch import Tensor


def slerp(a: Tensor, b: Tensor, w: float) -> Tensor:
    """Spherical interpolation, per sample, between a and b of shape (B, …).

    slerp(a, b; w) = sin((1 − w)θ)/sin θ · a + sin(wθ)/sin θ · b, θ = arccos(⟨a, b⟩/(‖a‖‖b‖)),
    as DDIM and DiffAE interpolate x_T: norms of Gaussian codes stay typical, where a linear
    mix would shrink them. Falls back to the linear mix when a and b are (anti)parallel.
    """
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()
    cos = torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=1).clamp(-1, 1)
    theta = torch.arccos(cos)[:, None]
    sin = torch.sin(theta)
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    c_a = torch.where(parallel, 1 - w, torch.sin((1 - w) * theta) / safe)
    c_b = torch.where(parallel, torch.full_like(sin, w), torch.sin(w * theta) / safe)
    return (c_a * flat_a + c_b * flat_b).to(a.dtype).view_as(a)
