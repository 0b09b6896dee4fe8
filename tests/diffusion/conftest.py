"""Shared statistical check for the sampler and guidance tests."""

import math

import pytest
import torch


def _assert_gaussian(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, n_se: float = 4.0):
    """Sample moments of x (N, D) match N(mean, diag(std²)) within ``n_se`` standard errors.

    For Gaussian data SE(mean_i) = σ_i/√N, SE(var_i) = σ_i²·√(2/(N − 1)) and, for independent
    dimensions, SE(cov_ij) = σ_i σ_j/√N.
    """
    n = x.shape[0]
    x, mean, std = x.double(), mean.double(), std.double()
    cov = torch.cov(x.T).reshape(x.shape[1], x.shape[1])
    expected = torch.diag(std**2)
    mean_se = std / math.sqrt(n)
    cov_se = torch.outer(std, std) / math.sqrt(n)
    cov_se.diagonal().copy_(std**2 * math.sqrt(2 / (n - 1)))
    assert torch.all((x.mean(0) - mean).abs() < n_se * mean_se), (x.mean(0), mean, mean_se)
    assert torch.all((cov - expected).abs() < n_se * cov_se), (cov, expected, cov_se)


@pytest.fixture
def assert_gaussian():
    return _assert_gaussian
