"""Vector quantisation: LDM's "VQ-reg" first stage (Rombach et al. 2022, Sec. 3.1), the codebook
layer of VQ-VAE (van den Oord et al. 2017, eq. 3) as VQGAN and CompVis/latent-diffusion code it
(``taming/modules/vqvae/quantize.py`` ``VectorQuantizer2``, ``ldm/modules/losses/vqperceptual.py``
for the usage statistics).

For an encoder output z_e (B, D, h, w), each of its h·w vectors is replaced by its nearest
codebook entry e_k, k = argmin_j ‖z_e − e_j‖². The decoder sees z_q = z_e + sg[e_k − z_e]
(the straight-through estimator: the value e_k, the gradient of the identity w.r.t. z_e), and
the loss pulls codes and encoder together (VQ-VAE eq. 3):

    L_VQ = ‖sg[z_e] − e‖²  +  β ‖z_e − sg[e]‖²        (codebook term + commitment term)

with β = 0.25 and the squared norms as means over the elements, as in the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn


@dataclass
class Quantized:
    """What :class:`VectorQuantizer` returns for one batch z_e (B, D, h, w).

    Attributes:
        z_q: the straight-through latent z_e + sg[e_k − z_e], (B, D, h, w).
        indices: k per position, int64 (B, h, w).
        codebook: ‖sg[z_e] − e‖², the mean over elements (moves the codes only).
        commitment: ‖z_e − sg[e]‖², the mean over elements (moves the encoder only).
        loss: L_VQ, the two terms weighted as the quantiser's ``beta_on`` says.
    """

    z_q: Tensor
    indices: Tensor
    codebook: Tensor
    commitment: Tensor
    loss: Tensor


class VectorQuantizer(nn.Module):
    """A codebook of K vectors e_j ∈ R^D and the nearest-code assignment with its loss.

    Paper and official code differ on where β sits: VQ-VAE's eq. 3 weights the commitment term,
    ``L = ‖sg[z_e] − e‖² + β‖z_e − sg[e]‖²`` (``beta_on="commitment"``, our default);
    ``VectorQuantizer2(legacy=True)``, the default every LDM/VQGAN config trains with, weights
    the codebook term instead, ``L = β‖sg[z_e] − e‖² + ‖z_e − sg[e]‖²`` (``beta_on="codebook"``).
    Codes start uniform in [−1/K, 1/K] (as in the official code).

    Args:
        num_embeddings: K (LDM's vq-f4: 8192).
        embedding_dim: D, the latent channels (LDM's vq-f4: 3).
        beta: β (VQ-VAE, VQGAN: 0.25).
        beta_on: the term β weights: "commitment" (the paper's) or "codebook" (the official
            code's ``legacy`` placement).
    """

    def __init__(
        self,
        num_embeddings: int = 8192,
        embedding_dim: int = 3,
        beta: float = 0.25,
        beta_on: Literal["commitment", "codebook"] = "commitment",
    ) -> None:
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if beta < 0:
            raise ValueError(f"beta={beta} must be >= 0")
        if beta_on not in ("commitment", "codebook"):
            raise ValueError(f"beta_on={beta_on!r} must be 'commitment' or 'codebook'")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.beta, self.beta_on = beta, beta_on
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def nearest(self, z_e: Tensor) -> Tensor:
        """k = argmin_j ‖z_e − e_j‖² per position, (B, h, w), in fp32 whatever the autocast:
        ‖z‖² − 2 z·e_j + ‖e_j‖² (the ‖z‖² term, the same for every j, is left out)."""
        if z_e.ndim != 4 or z_e.shape[1] != self.embedding_dim:
            raise ValueError(
                f"expected z_e of shape (B, {self.embedding_dim}, h, w), got {tuple(z_e.shape)}"
            )
        with torch.autocast(z_e.device.type, enabled=False):
            z = z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, self.embedding_dim)  # (N, D)
            e = self.embedding.weight.detach().float()  # (K, D)
            distance = e.square().sum(1) - 2 * z @ e.T  # (N, K)
        b, _, h, w = z_e.shape
        return distance.argmin(1).view(b, h, w)

    def lookup(self, indices: Tensor) -> Tensor:
        """The codes e_k (B, D, h, w) of indices (B, h, w)."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def forward(self, z_e: Tensor) -> Quantized:
        z_e = z_e.float()
        indices = self.nearest(z_e)
        e = self.lookup(indices).float()
        codebook = (z_e.detach() - e).square().mean()  # ‖sg[z_e] − e‖²
        commitment = (z_e - e.detach()).square().mean()  # ‖z_e − sg[e]‖²
        if self.beta_on == "commitment":
            loss = codebook + self.beta * commitment
        else:
            loss = self.beta * codebook + commitment
        z_q = z_e + (e - z_e).detach()  # straight-through: value e, ∂z_q/∂z_e = I
        return Quantized(z_q, indices, codebook, commitment, loss)


def codebook_usage(indices: Tensor, num_embeddings: int) -> tuple[Tensor, Tensor]:
    """Perplexity exp(−Σ_k p_k log p_k) of the code frequencies p_k over all positions (K when
    every code is used equally, 1 when one code takes all; the official ``measure_perplexity``)
    and the share of the K codes used at least once."""
    counts = torch.bincount(indices.flatten(), minlength=num_embeddings).double()
    p = counts / counts.sum()
    entropy = -(p * p.clamp_min(1e-30).log()).sum()
    used = (counts > 0).double().mean()
    return entropy.exp().float(), used.float()
