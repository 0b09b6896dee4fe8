"""Consistency training (iCT) against its formulas and the closed forms of Gaussian data
N(μ, s²) per pixel, whose exact consistency function (the PF-ODE's flow to σ_min) is
    f*(x̄, σ) = μ + (x̄ − μ)·√((s² + σ_min²)/(s² + σ²)),
and whose E[z | x̄_σ] = σ(x̄ − μ)/(s² + σ²). The "networks" here are exact: they read σ back
from the c_noise the module feeds them and return the F that makes f the function asked."""

import math

import pytest
import torch
from torch import nn

from diffusion_apps.checkpoint import load_module
from diffusion_apps.cli import main
from diffusion_apps.methods import ConsistencyTraining
from diffusion_apps.methods.consistency_core import karras_sigmas
from diffusion_apps.methods.consistency_training import lognormal_proposal, num_scales
from tests.conftest import CONFIGS, run_cli_in
from tests.factories import tiny_unet

MU, S = 0.2, 0.5
TINY = CONFIGS / "tiny" / "consistency_training.yaml"
CKPT = "runs/tiny_consistency_training/version_0/checkpoints/last.ckpt"


class Exact(nn.Module):
    """F_θ(c_in x̄, c_noise) for which f_θ(x̄, σ) = ``fn(x̄, σ, θ)``; θ one scalar parameter."""

    def __init__(self, model, fn, theta=0.0):
        super().__init__()
        self.model, self.fn = [model], fn  # a list: not a submodule
        self.theta = nn.Parameter(torch.tensor(float(theta)))
        self.sample_shape = (1, 8, 8)

    def forward(self, x_in, c_noise):
        m = self.model[0]
        sd, s_min = m.sigma_data, m.sigma_min
        sigma = (c_noise / 250).exp().reshape(-1, 1, 1, 1)  # c_noise = 250 ln σ
        x_bar = x_in * (sigma**2 + sd**2).sqrt()  # c_in = 1/√(σ² + σ_d²)
        c_skip = sd**2 / ((sigma - s_min) ** 2 + sd**2)
        c_out = (sd * (sigma - s_min) / (sigma**2 + sd**2).sqrt()).clamp(min=1e-12)
        return (self.fn(x_bar, sigma, self.theta) - c_skip * x_bar) / c_out


def exact_f(x_bar, sigma, s_min, s=S):
    return MU + (x_bar - MU) * ((s**2 + s_min**2) / (s**2 + sigma**2)).sqrt()


@pytest.fixture
def model(monkeypatch):
    m = ConsistencyTraining(tiny_unet(image_size=8), total_steps=800, distance="l2")
    monkeypatch.setattr(ConsistencyTraining, "global_step", property(lambda self: self._step))
    m._step = 0
    return m


def data(n, seed=0):
    return MU + S * torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_the_curriculum_doubles_from_s0_to_s1_in_equal_stages():
    """K' = ⌊800/(log₂128 + 1)⌋ = 100: N = 11, 21, …, 641 for 100 steps each, then 1281."""
    got = [num_scales(k, 800) for k in range(1000)]
    for stage, n in enumerate([11, 21, 41, 81, 161, 321, 641]):
        assert got[100 * stage : 100 * (stage + 1)] == [n] * 100
    assert set(got[700:]) == {1281}
    assert num_scales(124, 1000) == 11 and num_scales(125, 1000) == 21  # K' = ⌊1000/8⌋ = 125
    assert num_scales(6, 30, initial=2, final=16) == 3 and num_scales(7, 30, 2, 16) == 5  # K' = 7


def test_the_proposal_is_the_lognormal_mass_of_each_interval():
    """Against ln σ ~ N(P_mean, P_std²) drawn and binned into the grid's intervals."""
    sigmas = karras_sigmas(0.002, 80.0, 41)
    p = lognormal_proposal(sigmas, -1.1, 2.0)
    assert p.shape == (40,) and float(p.sum()) == pytest.approx(1.0)
    draws = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_sigma = -1.1 + 2.0 * draws
    inside = log_sigma[(log_sigma > sigmas[0].log()) & (log_sigma < sigmas[-1].log())]
    freq = torch.bincount(torch.bucketize(inside, sigmas.log()) - 1, minlength=40) / len(inside)
    se = (p * (1 - p) / len(inside)).sqrt()
    assert ((freq - p).abs() <= 5 * se + 1e-9).all()


@pytest.mark.parametrize(("step", "scales"), [(0, 11), (350, 81), (799, 1281)])
def test_the_loss_draws_weights_and_pairs_levels_as_ict(model, step, scales):
    """f = x̄ + θ(σ − σ_min) (boundary condition kept), l2: with the SAME z at both levels,
    f_{i+1} − f_i = Δσ_i (z + θ), so at θ = 1 and λ = 1/Δσ_i the loss has the mean
    2·Σ_i p_i Δσ_i, and the stop-gradient target gives dL/dθ the mean 2·Σ_i p_i (σ_{i+1} − σ_min)
    (2·Σ_i p_i Δσ_i without it). A uniform draw, λ ≡ 1 or an independent z would miss them."""
    model._step = step
    s_min = model.sigma_min
    model.unet = Exact(model, lambda x, sigma, th: x + th * (sigma - s_min), theta=1.0)
    sigmas = karras_sigmas(0.002, 80.0, scales)
    assert torch.equal(model.discretisation(step), sigmas)
    p, d_sigma = lognormal_proposal(sigmas), sigmas.diff()
    n, pixels = 16384, 64
    loss = model.consistency_loss(data(n), torch.Generator().manual_seed(1))
    loss.backward()
    mean = 2 * float((p * d_sigma).sum())
    # per example Δσ·m, m = mean over pixels of (z + 1)²: E m = 2, E m² = 4 + 6/pixels
    var = (4 + 6 / pixels) * float((p * d_sigma**2).sum()) - mean**2
    assert loss.item() == pytest.approx(mean, abs=6 * math.sqrt(var / n))
    for wrong in (2 * float(d_sigma.mean()), 2 * float((p * d_sigma**2).sum())):
        assert abs(wrong - mean) > 10 * math.sqrt(var / n)
    # per example 2(z̄ + 1)(σ_{i+1} − σ_min), z̄ the mean of the pixels' z: E (z̄ + 1)² = 1 + 1/pixels
    level = sigmas[1:] - s_min
    grad = 2 * float((p * level).sum())
    var = 4 * (1 + 1 / pixels) * float((p * level**2).sum()) - grad**2
    got = float(model.unet.theta.grad)
    assert got == pytest.approx(grad, abs=6 * math.sqrt(var / n))
    assert abs(2 * float((p * d_sigma).sum()) - grad) > 10 * math.sqrt(var / n)


def test_the_exact_consistency_function_is_where_the_loss_gradient_vanishes(model):
    """Perturb F by θ·c_in(x̄ − μ): at θ = 0 the CT gradient of f* is zero up to O(Δσ) (the
    one-sample z is ε* = E[z | x̄] on average), while f(x̄, σ) = μ + (x̄ − μ)(s² + σ_min²)/(s² + σ²),
    also 1 at σ_min, gets a gradient 20x larger, at the curriculum's finest grid."""
    model._step = 799
    sd, s_min = model.sigma_data, model.sigma_min

    def perturbed(base):
        def fn(x, sigma, th):
            c_out = sd * (sigma - s_min) / (sigma**2 + sd**2).sqrt()
            return base(x, sigma) + th * c_out * (x - MU) / (sigma**2 + sd**2).sqrt()

        return fn

    grads = {}
    for name, base in [
        ("exact", lambda x, sigma: exact_f(x, sigma, s_min)),
        ("wrong", lambda x, sigma: MU + (x - MU) * (S**2 + s_min**2) / (S**2 + sigma**2)),
    ]:
        model.unet = Exact(model, perturbed(base))
        model.consistency_loss(data(8192), torch.Generator().manual_seed(2)).backward()
        grads[name] = float(model.unet.theta.grad)
    assert abs(grads["exact"]) < abs(grads["wrong"]) / 20, grads


def test_the_exact_consistency_function_samples_the_data(model):
    """One step from σ_max = 80 and two steps (the second at the final grid's middle point) of
    f* give N(μ, s² + σ_min²) up to the prior's O(s/σ_max) mismatch (s = 0.1 here, so that the
    clamp to [−1, 1] never bites)."""
    s = 0.1
    model.unet = Exact(model, lambda x, sigma, th: exact_f(x, sigma, model.sigma_min, s))
    grid = karras_sigmas(0.002, 80.0, 1281).float()
    assert model.sampling_points(1).tolist() == [80.0] == [grid[-1].item()]
    assert model.sampling_points(2).tolist() == [grid[-1].item(), grid[640].item()]
    for steps in (1, 2):
        x = model.sample(2048, steps=steps, generator=torch.Generator().manual_seed(steps))
        n = x.numel()  # 131,072 values: s.e. of the mean 2.8e-4
        assert x.mean().item() == pytest.approx(MU, abs=5 * s / math.sqrt(n))
        assert x.var().item() == pytest.approx(s**2 + model.sigma_min**2, rel=0.02)


def test_the_boundary_condition_holds_for_the_real_network(model):
    x_bar = torch.randn(4, 1, 8, 8)
    torch.nn.init.normal_(model.unet.out_conv.weight)  # a UNet whose F is far from zero
    sigma = torch.full((4,), model.sigma_min)
    torch.testing.assert_close(model.consistency(model.unet, x_bar, sigma), x_bar)
    assert not torch.allclose(model.consistency(model.unet, x_bar, sigma * 2), x_bar)


def test_bad_arguments_are_named():
    unet = tiny_unet()
    with pytest.raises(ValueError, match=r"total_steps must be >= 8 \(the curriculum's stages\)"):
        ConsistencyTraining(unet, total_steps=7)
    with pytest.raises(ValueError, match="final_scales must be >= initial_scales"):
        ConsistencyTraining(unet, total_steps=100, initial_scales=20, final_scales=10)
    with pytest.raises(ValueError, match=r"unet.out_channels must be = in_channels \(1\)"):
        ConsistencyTraining(tiny_unet(out_channels=2), total_steps=100)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        ConsistencyTraining(unet, total_steps=100, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(TINY), "--model.init_args.distance", "huber"])
    assert "distance" in str(exit_.value.code)


def test_the_tiny_config_trains_checkpoints_and_samples(tmp_path):
    """Through the CLI: the UNet moved, the checkpoint alone rebuilds the module, the run logged
    its losses and 1- and 2-step grids, and sampling takes 1 … s_1 steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli_in(tmp_path, ["fit", "--config", str(TINY)])
    model = load_module(tmp_path / CKPT, ConsistencyTraining)
    assert model.total_steps == 8 and len(model.discretisation(3)) == 81
    assert any(p.abs().sum() > 0 for p in model.unet.out_conv.parameters())  # zero-initialised
    events = EventAccumulator(str(tmp_path / "runs/tiny_consistency_training/version_0"))
    events.Reload()
    assert {"train/loss", "val/loss"} <= set(events.Tags()["scalars"])
    assert {"samples (1 step)", "samples (2 step)"} <= set(events.Tags()["images"])
    x = model.sample(3, steps=4, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 16, 16) and x.abs().max() <= 1
    assert model.nfe("consistency", 4) == 4
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1280\]"):
        model.sample(2, steps=1281)
