"""LinearProbe against the closed form of two Gaussian classes, and DiffAE's code shift."""

import math

import pytest
import torch

from diffusion_apps.methods.probe import LinearProbe, encode_all


def two_gaussians(n: int, mu: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = ±μ + ε, ε ~ N(0, I), label 1 for +μ: the logistic model holds exactly."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = (2 * y[:, None] - 1) * mu + torch.randn(n, len(mu), generator=g)
    return x, y


MU = torch.tensor([1.0, -0.5, 0.0, 0.3, 0.0])


def test_probe_recovers_the_bayes_direction_and_accuracy():
    x, y = two_gaussians(20000, MU, seed=0)
    probe = LinearProbe.fit(x, y, l2=0.0)
    # In normalised coordinates u = (x − m)/σ, σ² = 1 + μ² per dimension, the classes have
    # within-class covariance diag(1/σ²) and means ±μ/σ: the Bayes boundary's normal is 2μσ.
    sigma = (1 + MU.square()).sqrt()
    bayes = 2 * MU * sigma
    w1 = probe.linear.weight[1]
    assert torch.nn.functional.cosine_similarity(w1, bayes, dim=0) > 0.995
    assert torch.allclose(w1, bayes, atol=0.06)
    assert torch.allclose(probe.mean, torch.zeros(5), atol=0.05)
    assert torch.allclose(probe.std, sigma, atol=0.03)
    # Bayes accuracy Φ(‖μ‖) on fresh data.
    x_test, y_test = two_gaussians(20000, MU, seed=1)
    bayes_accuracy = 0.5 * (1 + math.erf(MU.norm().item() / math.sqrt(2)))
    assert probe.accuracy(x_test, y_test) == pytest.approx(bayes_accuracy, abs=0.01)


def test_shift_moves_normalised_codes_by_s_sqrt_d_along_the_unit_normal():
    x, y = two_gaussians(2000, MU, seed=0)
    probe = LinearProbe.fit(x, y)
    z = torch.randn(3, 5)
    shifted = probe.shift(z, attribute=1, scale=0.3)
    w = probe.linear.weight[1]
    expected_step = 0.3 * math.sqrt(5) * w / w.norm()
    assert torch.allclose(
        probe.normalize(shifted) - probe.normalize(z), expected_step.expand(3, -1), atol=1e-5
    )
    # The attribute's logit grows by s·√d·‖w‖; the probe's mind is changed in its favour.
    gain = probe(shifted)[:, 1] - probe(z)[:, 1]
    assert torch.allclose(gain, torch.full((3,), 0.3 * math.sqrt(5) * w.norm().item()), atol=1e-4)
    assert torch.equal(probe.shift(z, 1, 0.0), probe.denormalize(probe.normalize(z)))


def test_probe_takes_attribute_matrices_and_rejects_bad_input():
    x, y = two_gaussians(500, MU, seed=0)
    attributes = torch.stack([y, 1 - y], dim=1)  # (N, 2) 0/1 attributes
    probe = LinearProbe.fit(x, attributes)
    assert probe.linear.out_features == 2
    assert probe.accuracy(x, y.flip(0)) < 0.7 < probe.accuracy(x, 1 - y)
    with pytest.raises(ValueError, match="features"):
        LinearProbe.fit(x[:, :, None], y)
    with pytest.raises(ValueError, match="N labels"):
        LinearProbe.fit(x, y[:-1])
    with pytest.raises(ValueError, match="attribute must be in"):
        probe.direction(2)


def test_encode_all_flattens_and_concatenates_in_order():
    batches = [(torch.full((2, 1, 2, 2), float(i)), torch.tensor([i, i])) for i in range(3)]
    features, labels = encode_all(lambda x: 2 * x, batches)
    assert features.shape == (6, 4)
    assert torch.equal(features[:, 0], torch.tensor([0.0, 0, 2, 2, 4, 4]))
    assert torch.equal(labels, torch.tensor([0, 0, 1, 1, 2, 2]))
