"""A class-conditional DDPM (ADM's ``class_cond``): the labels of a batch reach the network in
training, and the labels asked for in sampling; checked with the exact denoiser of per-class
Gaussian data, x0 | y ~ N(μ_y, σ² I)."""

import pytest
import torch

from diffusion_apps.diffusion import NoiseSchedule
from diffusion_apps.methods import DDPM
from tests.factories import tiny_unet
from tests.methods.test_ddpm import SIGMA, GaussianOracle

MEANS = torch.tensor([-0.4, 0.4])  # |x| > 1 (clamped by sample()) has probability 1e-3


class ClassGaussianOracle(GaussianOracle):
    """The exact optimal predictor given the class: GaussianOracle's at μ = μ_y."""

    num_classes = len(MEANS)

    def forward(self, x_t, t, y):
        return self.optimum(x_t, t, MEANS[y].view(-1, 1, 1, 1))


def make(T=200, **kw):
    schedule = NoiseSchedule(num_timesteps=T)
    return DDPM(ClassGaussianOracle(schedule, "eps"), schedule, **kw)


def test_training_loss_is_the_posterior_variance_of_the_given_class():
    """With the labels of the batch fed as y, the loss is the optimum's, E_t ᾱσ²/(ᾱσ² + 1 − ᾱ),
    whatever the class means; with the labels swapped it is far above it."""
    torch.manual_seed(0)
    model = make()
    labels = torch.arange(4096) % 2
    x0 = MEANS[labels].view(-1, 1, 1, 1) + SIGMA * torch.randn(4096, 1, 8, 8)
    loss = model.diffusion_loss(x0, **model.conditioning(x0, (x0, labels)))
    swapped = model.diffusion_loss(x0, **model.conditioning(x0, (x0, 1 - labels)))
    a = model.schedule.alphas_cumprod.double()
    expected = (a * SIGMA**2 / (a * SIGMA**2 + 1 - a)).mean().item()
    assert loss.item() == pytest.approx(expected, rel=0.03)  # 1% sampling error, as test_ddpm
    assert swapped.item() > 1.5 * expected


def test_samples_follow_the_class_asked_for():
    """DDIM of the exact denoiser draws N(μ_y, σ²) for each asked class y; unasked, the classes
    0, 1 in turn."""
    model = make(T=1000, clip_x0=False)
    x = model.sample(256, labels=[1, 0], steps=100, generator=torch.Generator().manual_seed(0))
    n = x[0::2].numel()  # 8,192 scalars a class: s.e. of the mean 0.002
    for start, mean in ((0, MEANS[1]), (1, MEANS[0])):
        assert x[start::2].mean().item() == pytest.approx(mean.item(), abs=5 * SIGMA / n**0.5)
    default = model.sample(4, steps=10, generator=torch.Generator().manual_seed(1))
    asked = model.sample(4, labels=[0, 1], steps=10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(default, asked, rtol=0, atol=0)


def test_generation_declares_the_labels_and_refuses_other_classes():
    model = make()
    assert "labels" in model.generation.inputs and model.generation.num_classes == 2
    with pytest.raises(ValueError, match=r"classes in \[0, 2\)"):
        model.sample(2, labels=[0, 2], steps=2)
    assert "labels" not in DDPM(tiny_unet()).generation.inputs


def test_unlabelled_data_is_refused_by_name():
    """A folder without class sub-folders gives label −1: a class-conditional DDPM says so."""
    model = DDPM(tiny_unet(num_classes=3))
    x0 = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"class-conditional DDPM needs labels in \[0, 3\).*-1"):
        model.conditioning(x0, (x0, torch.tensor([-1, -1])))
