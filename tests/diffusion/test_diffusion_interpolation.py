"""slerp against its closed form on orthogonal and parallel vectors."""

import math

import torch

from diffusion_apps.diffusion import slerp


def test_slerp_walks_the_great_circle_between_orthogonal_codes():
    a = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0, 0.0, 0.0]])
    for w in (0.0, 0.25, 0.5, 1.0):
        expected = math.cos(w * math.pi / 2) * a + math.sin(w * math.pi / 2) * b
        torch.testing.assert_close(slerp(a, b, w), expected)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)


def test_slerp_is_per_sample_and_keeps_shapes_and_falls_back_to_lerp():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    mid = slerp(a, b, 0.5)
    assert mid.shape == a.shape
    for i in range(3):  # each sample on its own circle
        torch.testing.assert_close(slerp(a[i : i + 1], b[i : i + 1], 0.5), mid[i : i + 1])
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: the linear mix
