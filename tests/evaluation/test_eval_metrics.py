"""Feature-space metrics against closed forms: Fréchet distance of Gaussians, KID, P&R, IS."""

import math

import pytest
import torch

from diffusion_apps.evaluation import (
    frechet_distance,
    inception_score,
    kernel_distance,
    mean_cov,
    precision_recall,
)
from diffusion_apps.evaluation.metrics import space_input


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=torch.float64))
    return q


def test_frechet_distance_diagonal_closed_form():
    # Diagonal (commuting) covariances: d² = ‖Δμ‖² + Σ_i (√a_i − √b_i)².
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = 5.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(mu1, a.diag(), mu2, b.diag()) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_commuting_full_covariances():
    # Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ share eigenvectors: the same closed form holds.
    d = 16
    q = random_rotation(d, seed=1)
    a = torch.rand(d, generator=gen(2), dtype=torch.float64) * 3 + 0.1
    b = torch.rand(d, generator=gen(3), dtype=torch.float64) * 3 + 0.1
    mu1 = torch.randn(d, generator=gen(4), dtype=torch.float64)
    mu2 = torch.randn(d, generator=gen(5), dtype=torch.float64)
    s1, s2 = q @ a.diag() @ q.T, q @ b.diag() @ q.T
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(float(expected), rel=1e-9)


def test_frechet_distance_general_covariances_match_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    d = 12
    x, y = (torch.randn(d, 3 * d, generator=gen(s), dtype=torch.float64) for s in (6, 7))
    s1, s2 = x @ x.T / d, y @ y.T / d  # non-commuting, full rank
    mu1, mu2 = torch.zeros(d), torch.full((d,), 0.5)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = d * 0.25 + float(s1.trace() + s2.trace()) - 2 * covmean.trace()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_identical_statistics_is_zero():
    mu, sigma = mean_cov(torch.randn(500, 64, generator=gen(8)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    # 50 samples in 64-d: 15 zero eigenvalues, each off by rounding (~1e-16) and square-rooted.
    mu, sigma = mean_cov(torch.randn(50, 64, generator=gen(8)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_sample_estimate_converges():
    d, n = 4, 20_000
    q = random_rotation(d, seed=9)
    a, b = torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.tensor([2.0, 1.0, 1.0, 0.5])
    l1, l2 = q @ a.double().sqrt().diag(), q @ b.double().sqrt().diag()
    f1 = torch.randn(n, d, generator=gen(10), dtype=torch.float64) @ l1.T
    f2 = torch.randn(n, d, generator=gen(11), dtype=torch.float64) @ l2.T + 1.0
    expected = d * 1.0 + float((a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(*mean_cov(f1), *mean_cov(f2)) == pytest.approx(expected, rel=0.05)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


def test_kid_is_unbiased_for_independent_draws_of_one_distribution():
    # The mean of many independent estimates sits within 4 standard errors of 0; the biased
    # (V-statistic) estimate would be ≈ 2 E k(x, x)/m away from it.
    estimates = [
        kernel_distance(
            torch.randn(40, 4, generator=gen(2 * i)), torch.randn(40, 4, generator=gen(2 * i + 1)),
            subsets=1, subset_size=40, generator=gen(i),
        )[0]
        for i in range(200)
    ]  # fmt: skip
    est = torch.tensor(estimates, dtype=torch.float64)
    assert abs(est.mean()) < 4 * est.std() / math.sqrt(len(est))
    assert (est < 0).any()  # unbiased estimates of 0 must sometimes be negative


def test_kid_of_shifted_distribution_is_clearly_positive():
    real = torch.randn(1000, 8, generator=gen(0))
    fake = torch.randn(1000, 8, generator=gen(1)) + 0.5
    same = torch.randn(1000, 8, generator=gen(2))
    kid, std = kernel_distance(real, fake, subsets=20, subset_size=200, generator=gen(3))
    kid_same, _ = kernel_distance(real, same, subsets=20, subset_size=200, generator=gen(3))
    assert kid > 5 * std and kid > 20 * abs(kid_same)


def test_kid_clips_subset_size_to_the_smaller_set():
    real, fake = torch.randn(30, 5, generator=gen(0)), torch.randn(20, 5, generator=gen(1))
    kid, std = kernel_distance(real, fake, subsets=3, subset_size=1000, generator=gen(2))
    assert math.isfinite(kid) and std >= 0


def test_precision_recall_identical_sets_is_one():
    f = torch.randn(300, 8, generator=gen(0))
    assert precision_recall(f, f.clone()) == (1.0, 1.0)


def test_precision_recall_far_apart_sets_is_zero():
    f = torch.randn(300, 8, generator=gen(0))
    assert precision_recall(f, f + 100.0) == (0.0, 0.0)


def test_precision_recall_fake_covering_half_the_modes():
    # Real: two far-apart clusters; fake: independent draws of one of them.
    modes = torch.tensor([[0.0, 0.0], [50.0, 0.0]])
    real = torch.randn(1000, 2, generator=gen(0)) + modes.repeat_interleave(500, 0)
    fake = torch.randn(500, 2, generator=gen(1))
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.9
    assert recall == pytest.approx(0.5, abs=0.06)


def test_precision_recall_needs_more_than_k_samples():
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2), k=3)


def test_inception_score_closed_forms():
    # Confident predictions spread evenly over C classes: IS = exp(KL(onehot ‖ uniform)) = C.
    labels = torch.arange(100) % 10
    confident = 100.0 * torch.nn.functional.one_hot(labels, 10).float()
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    # Identical predictions carry no information: IS = 1.
    assert inception_score(torch.randn(1, 10).expand(100, -1), splits=5)[0] == pytest.approx(1.0)


def test_space_input_channels_and_sizes():
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    digits = space_input(x.expand(-1, 3, -1, -1), "digits")
    assert digits.shape == (2, 1, 32, 32)
    assert torch.allclose(digits[..., 2:30, 2:30], x) and (digits[..., :2, :] == -1).all()
    assert space_input(torch.zeros(2, 1, 64, 64), "digits").shape == (2, 1, 32, 32)
    rgb = space_input(torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2), "inception")
    assert rgb.dtype == torch.uint8 and rgb.shape == (1, 3, 2, 2)
    assert rgb[0, 0].flatten().tolist() == [0, 128, 255, 255]
    with pytest.raises(ValueError, match="1 or 3"):
        space_input(torch.zeros(2, 2, 32, 32), "digits")
