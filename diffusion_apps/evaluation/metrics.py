"""Generation metrics in a feature space: Fréchet distance, KID, improved precision and recall.

Two feature spaces: "digits" (the penultimate layer of our embedded-digits classifier, offline;
its Fréchet distance is ``fd_digits``, never called FID) and "inception" (torch-fidelity's
InceptionV3 pool features, the FID of the literature). :class:`FeatureStats` collects the features
of real and generated images in one space, under DDP too, and computes every metric there.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from diffusion_apps.evaluation.digits import digit_classifier

Space = Literal["digits", "inception"]
CHUNK = 1024  # rows of a distance matrix held at once: 1024 x 10k floats = 40 MB


def mean_cov(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (d,) and unbiased covariance (d, d) of features (N, d), in float64."""
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"need features (N >= 2, d), got {tuple(features.shape)}")
    f = features.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2) (Dowson & Landau 1982; Heusel et al. 2017):

        d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}).

    Σ1Σ2 is similar to the symmetric PSD matrix √Σ1 Σ2 √Σ1, so Tr (Σ1Σ2)^{1/2} = Σ_i √λ_i over
    the eigenvalues λ of the latter: two symmetric eigendecompositions in float64 instead of a
    non-symmetric sqrtm. Tiny negative eigenvalues from rounding are clamped to 0.
    """
    mu1, mu2, s1, s2 = (a.double() for a in (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        shapes = [tuple(a.shape) for a in (mu1, sigma1, mu2, sigma2)]
        raise ValueError(f"frechet_distance: need means (d,) and covariances (d, d), got {shapes}")
    lam, v = torch.linalg.eigh(s1)
    sqrt_s1 = (v * lam.clamp(min=0).sqrt()) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def _check_pair(f_real: Tensor, f_fake: Tensor, what: str, min_n: int) -> None:
    if f_real.dim() != 2 or f_fake.dim() != 2 or f_real.shape[1] != f_fake.shape[1]:
        shapes = (tuple(f_real.shape), tuple(f_fake.shape))
        raise ValueError(f"{what}: need real and fake features (N, d) of one d, got {shapes}")
    if min(len(f_real), len(f_fake)) < min_n:
        counts = (len(f_real), len(f_fake))
        raise ValueError(f"{what}: needs at least {min_n} real and fake samples, got {counts}")


def kernel_distance(
    f_real: Tensor,
    f_fake: Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018) in any feature space.

    The unbiased estimate of MMD² with the cubic kernel k(x, y) = (xᵀy/d + 1)³, for subsets
    X and Y of m points each:

        MMD²_u = 1/(m(m−1)) Σ_{i≠j} [k(x_i, x_j) + k(y_i, y_j)] − 2/m² Σ_{i,j} k(x_i, y_j),

    whose expectation is 0 when both sets come from one distribution (so it can be negative).

    Args:
        f_real, f_fake: features (N, d) and (M, d).
        subsets: number of random subsets (drawn without replacement within each subset).
        subset_size: m, clipped to min(N, M).
        generator: CPU generator of the subset draws.

    Returns:
        Mean and standard deviation (ddof 0, as torch-fidelity) of MMD²_u over the subsets.
    """
    _check_pair(f_real, f_fake, "kernel_distance", min_n=2)
    m = min(subset_size, len(f_real), len(f_fake))
    d = f_real.shape[1]
    x_all, y_all = f_real.double(), f_fake.double()
    off_diag = 1 - torch.eye(m, dtype=torch.float64, device=x_all.device)
    scores = []
    for _ in range(subsets):
        x = x_all[torch.randperm(len(x_all), generator=generator)[:m].to(x_all.device)]
        y = y_all[torch.randperm(len(y_all), generator=generator)[:m].to(y_all.device)]
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = ((k_xx + k_yy) * off_diag).sum() / (m * (m - 1))
        scores.append(within - 2 * k_xy.mean())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(correction=0))


def _knn_radii(f: Tensor, k: int) -> Tensor:
    """Distance from each point of ``f`` to its k-th nearest neighbour among the others."""
    # kthvalue(k + 1): the point itself sits at distance 0 in its own row.
    return torch.cat(
        [torch.cdist(rows, f).kthvalue(k + 1, dim=1).values for rows in f.split(CHUNK)]
    )


def _inside(queries: Tensor, points: Tensor, radii: Tensor) -> Tensor:
    """Whether each query lies in some ball (points[j], radii[j])."""
    return torch.cat([(torch.cdist(q, points) <= radii).any(1) for q in queries.split(CHUNK)])


def precision_recall(f_real: Tensor, f_fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points, of radius the distance to the
    point's k-th nearest neighbour in the same set. Then

        precision = 1/M Σ_j 1[fake_j ∈ manifold(real)],
        recall = 1/N Σ_i 1[real_i ∈ manifold(fake)].

    Distances are computed CHUNK rows at a time, so 10k x 10k sets fit in memory.
    """
    _check_pair(f_real, f_fake, "precision_recall", min_n=k + 1)
    real, fake = f_real.float(), f_fake.float()
    precision = _inside(fake, real, _knn_radii(real, k)).float().mean()
    recall = _inside(real, fake, _knn_radii(fake, k)).float().mean()
    return float(precision), float(recall)


def inception_score(
    logits: Tensor, splits: int = 10, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): IS = exp(E_x KL(p(y|x) ‖ p(y))) with p(y) the mean
    of p(y|x) over a split; mean and standard deviation (ddof 0) over ``splits`` random splits."""
    perm = torch.randperm(len(logits), generator=generator).to(logits.device)
    scores = []
    for part in logits.double()[perm].chunk(splits):
        log_p = part.log_softmax(1)  # (n, classes)
        log_marginal = log_p.logsumexp(0) - math.log(len(part))  # log p(y)
        kl = (log_p.exp() * (log_p - log_marginal)).sum(1).mean()
        scores.append(kl.exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(correction=0))


def space_input(images: Tensor, space: Space) -> Tensor:
    """Images (B, C, H, W) in [-1, 1] (clamped) → the extractor's input.

    "digits": 1 channel (the mean of 3), 32 x 32 (28 px padded by 2 px of background like the
    data module, other sizes resized bilinearly). "inception": uint8 0..255 with 3 channels;
    the network resizes to 299 itself.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"need images (B, 1 or 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    x = images.float().clamp(-1, 1)
    if space == "inception":
        return ((x + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    x = x.mean(1, keepdim=True)
    if x.shape[-2:] == (28, 28):
        return F.pad(x, (2, 2, 2, 2), value=-1.0)
    if x.shape[-2:] != (32, 32):
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True).clamp(-1, 1)
    return x


@torch.no_grad()
def extract(extractor: nn.Module, images: Tensor, space: Space) -> tuple[Tensor, Tensor]:
    """Features (B, d) and logits (B, classes) of images in [-1, 1], both float32."""
    x = space_input(images, space)
    if space == "digits":
        features = extractor.features(x)
        logits = extractor.head(features)
    else:
        features, logits = extractor(x)
    return features.float(), logits.float()


def build_extractor(
    space: Space, cache_dir: str | Path | None, weights_path: str | None
) -> nn.Module:
    """The digit classifier or torch-fidelity's InceptionV3, frozen in eval mode."""
    if space == "digits":
        return digit_classifier(cache_dir)
    if space == "inception":
        from diffusion_apps.evaluation.inception import inception_feature_extractor

        return inception_feature_extractor(weights_path)
    raise ValueError(f"space must be 'digits' or 'inception', got {space!r}")


class FeatureStats(Metric):
    """Collects features of real and generated images (DDP-synced list states,
    ``dist_reduce_fx="cat"``) in ONE feature space and computes every generation metric there.

    Args:
        space: "digits" (offline; keys ``fd_digits``, ``kid_digits``, ``kid_digits_std``,
            ``precision_digits``, ``recall_digits``, ``confidence``, ``class_entropy``, and
            ``accuracy`` when generated images come with labels) or "inception" (keys ``fid``,
            ``kid``, ``kid_std``, ``precision``, ``recall``, ``inception_score``,
            ``inception_score_std``). Both add ``n_real`` and ``n_fake``.
        k: neighbour rank of the precision/recall manifolds.
        kid_subsets, kid_subset_size: see :func:`kernel_distance` (subsets seeded with 0).
        feature_extractor_weights_path: InceptionV3 weights file (space "inception").
        cache_dir: where the digit classifier is cached (space "digits").
        extractor: the space's network, already built (another FeatureStats' ``extractor``, to
            share it); default: built here.
        kwargs: passed to ``torchmetrics.Metric``.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(
        self,
        space: Space = "digits",
        k: int = 3,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        feature_extractor_weights_path: str | None = None,
        cache_dir: str | Path | None = None,
        extractor: nn.Module | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if extractor is None:
            extractor = build_extractor(space, cache_dir, feature_extractor_weights_path)
        self.extractor = extractor
        self.space, self.k = space, k
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        for name in ("real_features", "fake_features", "fake_logits", "fake_labels"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.reference: tuple[Tensor, Tensor, Tensor] | None = None

    def update(self, images: Tensor, real: bool, labels: Tensor | None = None) -> None:
        """Add a batch of images (B, C, H, W) in [-1, 1].

        Args:
            images: real or generated images; converted by :func:`space_input`.
            real: whether they are real (the reference) or generated.
            labels: for generated images in space "digits", the class (B,) each was asked to be
                (class-conditional or guided sampling); gives ``accuracy``. Ignored otherwise.
        """
        if real and self.reference is not None:
            raise ValueError("FeatureStats: set_reference() already gave the real statistics")
        features, logits = extract(self.extractor, images, self.space)
        if real:
            self.real_features.append(features)
            return
        if labels is None or self.space == "inception":
            labels = torch.full((len(images),), -1, dtype=torch.long, device=images.device)
        elif labels.shape != (len(images),) or labels.min() < 0 or labels.max() > 9:
            raise ValueError(f"labels must be (B,) = ({len(images)},) digits 0..9, got {labels}")
        self.fake_features.append(features)
        self.fake_logits.append(logits)
        self.fake_labels.append(labels.long())

    def set_reference(self, mu: Tensor, sigma: Tensor, features: Tensor) -> None:
        """Use cached real statistics (see :func:`reference_features`, :func:`mean_cov`)
        instead of ``update(real=True)``; kept across ``reset()``."""
        self.reference = (mu.double().cpu(), sigma.double().cpu(), features.float().cpu())

    def compute(self) -> dict[str, float]:
        """Every metric of the space between the real (or reference) and generated features."""
        # A list of batches, or one tensor once DDP sync has concatenated it.
        if len(self.fake_features) == 0:
            raise RuntimeError("FeatureStats: no generated images; call update(images, real=False)")
        fake = dim_zero_cat(self.fake_features)
        if self.reference is not None:
            mu_r, sigma_r, real = (a.to(fake.device) for a in self.reference)
        elif len(self.real_features) > 0:
            real = dim_zero_cat(self.real_features)
            mu_r, sigma_r = mean_cov(real)
        else:
            raise RuntimeError(
                "FeatureStats: no real images; call update(real=True) or set_reference"
            )
        gen = torch.Generator().manual_seed(0)
        fd = frechet_distance(mu_r, sigma_r, *mean_cov(fake))
        kid, kid_std = kernel_distance(real, fake, self.kid_subsets, self.kid_subset_size, gen)
        precision, recall = precision_recall(real, fake, self.k)
        logits, labels = dim_zero_cat(self.fake_logits), dim_zero_cat(self.fake_labels)
        counts = {"n_real": len(real), "n_fake": len(fake)}
        if self.space == "inception":
            score, score_std = inception_score(logits, generator=gen)
            return {
                "fid": fd, "kid": kid, "kid_std": kid_std, "precision": precision,
                "recall": recall, "inception_score": score, "inception_score_std": score_std,
                **counts,
            }  # fmt: skip
        probs = logits.double().softmax(1)
        predicted = probs.argmax(1)
        share = torch.bincount(predicted, minlength=10).double() / len(predicted)
        out = {
            "fd_digits": fd, "kid_digits": kid, "kid_digits_std": kid_std,
            "precision_digits": precision, "recall_digits": recall,
            "confidence": float(probs.max(1).values.mean()),
            "class_entropy": float(-torch.xlogy(share, share).sum()),  # nats, at most ln 10
        }  # fmt: skip
        labelled = labels >= 0
        if labelled.all():
            out["accuracy"] = float((predicted == labels).double().mean())
        elif labelled.any():
            raise ValueError("FeatureStats: labels were given for some generated batches only")
        return {**out, **counts}


def state_hash(module: nn.Module) -> str:
    """sha256 of a module's state dict (names and tensor bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
