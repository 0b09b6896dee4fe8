"""Linear probes on learned codes: representation quality, and DiffAE's attribute directions.

A probe is a linear classifier on per-dimension normalised features, fitted one-vs-rest: every
class (or attribute) has its own logistic regression, as in DiffAE's attribute classifier (a
linear layer on normalised z_sem trained with binary cross-entropy, one output per attribute).
Digit labels are classes here; the predicted class is the largest logit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LinearProbe(nn.Module):
    """logits = W·(x − μ)/σ + b, with μ, σ the per-dimension mean and std of the training
    features (buffers, saved with the weights).

    Args:
        dim: feature width d.
        num_classes: K, outputs (classes or binary attributes).
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self.std + self.mean

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, K) of features (N, d)."""
        return self.linear(self.normalize(x.float()))

    @classmethod
    def fit(
        cls,
        features: Tensor,
        labels: Tensor,
        num_classes: int | None = None,
        l2: float = 1e-3,
        max_iter: int = 300,
    ) -> LinearProbe:
        """Fit on features (N, d) and labels: class indices (N,) or 0/1 attributes (N, K).

        Minimises the mean over samples and outputs of the logistic loss, plus ``l2``·‖W‖²/2,
        by full-batch L-BFGS from zero weights: deterministic, the same probe on every run.
        """
        if features.dim() != 2 or len(features) != len(labels) or len(features) < 2:
            raise ValueError(
                f"need features (N, d) and N labels with N >= 2, got {tuple(features.shape)} "
                f"and {tuple(labels.shape)}"
            )
        x = features.detach().float().cpu()
        if labels.dim() == 1:
            k = num_classes or int(labels.max()) + 1
            targets = F.one_hot(labels.long().cpu(), k).float()
        else:
            targets = labels.detach().float().cpu()
        probe = cls(x.shape[1], targets.shape[1])
        probe.mean.copy_(x.mean(0))
        probe.std.copy_(x.std(0).clamp(min=1e-6))
        nn.init.zeros_(probe.linear.weight)
        nn.init.zeros_(probe.linear.bias)
        x = probe.normalize(x)
        opt = torch.optim.LBFGS(
            probe.linear.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe"
        )

        def objective() -> Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(probe.linear(x), targets)
            loss = loss + 0.5 * l2 * probe.linear.weight.square().sum()
            loss.backward()
            return loss

        opt.step(objective)
        return probe.eval().requires_grad_(False)

    @torch.no_grad()
    def accuracy(self, features: Tensor, labels: Tensor) -> float:
        """Share of the N samples whose largest logit is their class (labels (N,))."""
        predicted = self(features.to(self.mean.device)).argmax(1).cpu()
        return float((predicted == labels.cpu()).float().mean())

    @torch.no_grad()
    def attribute_accuracy(self, features: Tensor, targets: Tensor) -> Tensor:
        """Per attribute k (K,), the share of the N samples whose logit sign is their 0/1
        target: 1[logit_k > 0] = y_k (targets (N, K))."""
        predicted = self(features.to(self.mean.device)).cpu() > 0
        return (predicted == targets.cpu().bool()).float().mean(0)

    def direction(self, attribute: int) -> Tensor:
        """ŵ = w/‖w‖, the unit normal of attribute ``attribute``'s boundary in normalised space."""
        if not 0 <= attribute < self.linear.out_features:
            raise ValueError(
                f"attribute must be in [0, {self.linear.out_features}), got {attribute}"
            )
        w = self.linear.weight[attribute]
        return w / w.norm()

    def shift(self, z: Tensor, attribute: int, scale: float) -> Tensor:
        """DiffAE's manipulation z' = denorm(norm(z) + s·√d·ŵ) of codes z (N, d)."""
        step = scale * math.sqrt(z.shape[-1]) * self.direction(attribute)
        return self.denormalize(self.normalize(z) + step.to(z))


@torch.no_grad()
def encode_all(
    encode: Callable[[Tensor], Tensor], batches: Iterable, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """(features (N, d), labels (N,)) on the CPU: ``encode`` of every (images, labels) batch."""
    features, labels = [], []
    for images, y in batches:
        features.append(encode(images.to(device)).float().flatten(1).cpu())
        labels.append(y)
    return torch.cat(features), torch.cat(labels)
