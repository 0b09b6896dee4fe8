"""DiffAE's latent denoiser: an MLP with skip connections (official ``MLPSkipNet``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_apps.nn.layers import timestep_embedding, zero_


class SkipMLPLayer(nn.Module):
    """h ← SiLU(LayerNorm(W h · (1 + W_t SiLU(emb)))), dropout after the activation."""

    def __init__(self, in_dim: int, out_dim: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.emb_proj = nn.Linear(emb_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        h = self.linear(h) * (1 + self.emb_proj(emb))
        return self.dropout(F.silu(self.norm(h)))


class SkipMLP(nn.Module):
    """ε_ω(z_t, t) for vectors z (B, dim): ``num_layers`` − 1 hidden layers of width ``hidden``,
    each fed [h, z_t] (the input concatenated into every hidden layer), time-modulated as
    h·(1 + W_t SiLU(emb(t))), then LayerNorm and SiLU; a zero-initialised linear output.

    DiffAE (Preechakul et al. 2022, latent DDIM): 10 layers x 2048 for 512-d z_sem.

    Args:
        dim: Width of the vectors it denoises.
        hidden: Width of the hidden layers.
        num_layers: Linear layers in all, the output one included (≥ 2).
        time_dim: Width of the sinusoidal timestep embedding and its MLP.
        dropout: Dropout after each hidden activation.
    """

    def __init__(
        self,
        dim: int = 512,
        hidden: int = 2048,
        num_layers: int = 10,
        time_dim: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"num_layers={num_layers} must be >= 2")
        for name, value in (("dim", dim), ("hidden", hidden), ("time_dim", time_dim)):
            if value < 1:
                raise ValueError(f"{name}={value} must be a positive integer")
        self.dim, self.time_dim = dim, time_dim
        self.time_embed = nn.Sequential(
            nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.layers = nn.ModuleList(
            SkipMLPLayer(dim if i == 0 else hidden + dim, hidden, hidden, dropout)
            for i in range(num_layers - 1)
        )
        self.out = zero_(nn.Linear(hidden + dim, dim))

    @property
    def sample_shape(self) -> tuple[int]:
        """Shape of one sample: (dim,)."""
        return (self.dim,)

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        """Predict ε for z_t (B, dim) at timesteps t (B,)."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected z of shape (B, {self.dim}), got {tuple(z.shape)}")
        if t.ndim == 0:
            t = t.expand(z.shape[0])
        z = z.to(self.out.weight.dtype)  # bf16-true weights, fp32 sampler state
        emb = F.silu(self.time_embed(timestep_embedding(t, self.time_dim).to(z.dtype)))
        h = self.layers[0](z, emb)
        for layer in self.layers[1:]:
            h = layer(torch.cat([h, z.to(h.dtype)], dim=1), emb)  # the skip: z into every layer
        return self.out(torch.cat([h, z.to(h.dtype)], dim=1))
