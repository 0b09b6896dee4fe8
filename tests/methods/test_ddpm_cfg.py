"""Classifier-free guidance of the pixel DDPM (Ho & Salimans 2022): label dropout in training and
ε̃ = (1 + w)·ε(x_t, y) − w·ε(x_t, ∅) in sampling, checked with per-class Gaussian data,
x0 | y ~ N(μ_y, σ² I), whose conditional denoiser E[ε | x_t, y] and unconditional (mixture)
denoiser E[ε | x_t] = Σ_y p(y | x_t) E[ε | x_t, y] are exact."""

from types import SimpleNamespace

import pytest
import torch

from diffusion_apps.diffusion import NoiseSchedule, classifier_free_guidance, run_sampler
from diffusion_apps.methods import DDPM
from tests.factories import tiny_unet
from tests.methods.test_ddpm import SIGMA, GaussianOracle

MEANS = torch.tensor([-0.5, 0.0, 0.4], dtype=torch.float64)  # unequal gaps: a skewed mixture
K = len(MEANS)


def conditional_eps(schedule, x_t, t, y):
    """E[ε | x_t, y] = √(1−ᾱ)(x_t − √ᾱ μ_y)/(ᾱσ² + 1 − ᾱ) (float64)."""
    a = schedule.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    return (
        (1 - a).sqrt()
        * (x_t.double() - a.sqrt() * MEANS[y].view(-1, 1, 1, 1))
        / (a * SIGMA**2 + 1 - a)
    )


def mixture_eps(schedule, x_t, t):
    """E[ε | x_t] = Σ_y p(y | x_t) E[ε | x_t, y], equal class weights: p(y | x_t) ∝
    N(x_t; √ᾱ μ_y, (ᾱσ² + 1 − ᾱ) I), the whole image one class."""
    a = schedule.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    x = x_t.double()
    log_p = torch.stack(
        [
            -((x - a.sqrt() * m) ** 2).sum((1, 2, 3)) / (2 * (a * SIGMA**2 + 1 - a)).flatten()
            for m in MEANS
        ],
        1,
    )  # fmt: skip  (B, K)
    post = log_p.softmax(1)
    eps = torch.stack([conditional_eps(schedule, x, t, torch.full_like(t, c)) for c in range(K)])
    return torch.einsum("bk,kbchw->bchw", post, eps)


def guided_eps(schedule, x_t, t, y, w):
    """Ho & Salimans eq. 6, written out: (1 + w)·ε(x_t, y) − w·ε(x_t, ∅)."""
    return (1 + w) * conditional_eps(schedule, x_t, t, y) - w * mixture_eps(schedule, x_t, t)


class CFGOracle(GaussianOracle):
    """The exact ε-predictor of a network trained with label dropout: label y < K gives the
    class's denoiser, the null label K the mixture's. ``null`` replaces the latter (a wrong
    unconditional denoiser, for comparison); ``seen`` records the labels it is called with."""

    num_classes, null_label = K, True

    def __init__(self, schedule, null=None):
        super().__init__(schedule, "eps")
        self.null, self.seen = null or mixture_eps, []

    def forward(self, x_t, t, y):
        self.seen.append(y.clone())
        cond = conditional_eps(self.schedule, x_t, t, y.clamp(max=K - 1))
        null = self.null(self.schedule, x_t, t)
        return torch.where((y == K).view(-1, 1, 1, 1), null, cond).float() + 0 * self.dummy


def make(T=200, null=None, **kw):
    schedule = NoiseSchedule(num_timesteps=T)
    kw = {"label_dropout": 0.2, "clip_x0": False, **kw}
    return DDPM(CFGOracle(schedule, null), schedule, **kw)


def test_wrapper_and_guided_eps_are_the_closed_form():
    """The shared wrapper at s = 1 + w, and the DDPM's guided ε at w, equal eq. 6 of the exact
    conditional and mixture denoisers, at every w (−1: the mixture's, unconditional)."""
    model = make()
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(12, 1, 8, 8, generator=gen) * 0.8
    t = torch.randint(0, 200, (12,), generator=gen)
    y = torch.arange(12) % K
    for w in (-1.0, 0.5, 1.0, 3.0):
        expected = guided_eps(model.schedule, x_t, t, y, w).float()
        wrapped = classifier_free_guidance(model.unet, 1 + w, {"y": K})(x_t, t, y=y)
        torch.testing.assert_close(wrapped, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.guided_eps(w)(x_t, t, y=y), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_at_w_runs_the_sampler_on_the_closed_form(sampler):
    """``sample(scale=w)`` is the sampler run on eq. 6 of the exact denoisers (same x_T and
    noise): the guided ε reaches the loop once, with the null label K and s = 1 + w."""
    model = make()
    x_T = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    steps = model.timesteps(10, sampler=sampler)

    def exact(x, t, y):
        return guided_eps(model.schedule, x, t, y, 2.0).float()

    expected = run_sampler(sampler, exact, model.schedule, x_T, steps, eta=0.0,
                           generator=torch.Generator().manual_seed(2), y=y)  # fmt: skip
    got = model.sample(6, sampler=sampler, steps=10, labels=y, scale=2.0, x_T=x_T,
                       generator=torch.Generator().manual_seed(2))  # fmt: skip
    torch.testing.assert_close(got, expected.clamp(-1, 1), rtol=0, atol=1e-4)


def test_w0_is_the_plain_conditional_sampler_exactly_and_w_minus_1_the_unconditional():
    """w = 0: bit-equal to the class-conditional DDPM trained without dropout, one network call
    a step on the batch itself (no ∅ rows); w = −1: the mixture denoiser's samples."""
    guided, plain = make(clip_x0=True), make(clip_x0=True, label_dropout=0.0)
    kw = dict(steps=8, labels=[2, 0, 1], sampler="ddpm")
    a = guided.sample(6, scale=0.0, generator=torch.Generator().manual_seed(3), **kw)
    b = plain.sample(6, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(guided.unet.seen) == 8 and all(
        len(y) == 6 and (y < K).all() for y in guided.unet.seen
    )

    x_T = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    uncond = make(label_dropout=0.0)
    expected = run_sampler("ddim", lambda x, t: mixture_eps(uncond.schedule, x, t).float(),
                           uncond.schedule, x_T, uncond.timesteps(10), eta=0.0)  # fmt: skip
    got = make().sample(6, steps=10, scale=-1.0, x_T=x_T)
    torch.testing.assert_close(got, expected.clamp(-1, 1), rtol=0, atol=1e-4)


def test_training_step_drops_the_share_p_uncond_of_labels_to_null():
    """The labels the network sees in a training step: a share p_uncond of them ∅ = K (within
    4 standard errors), the rest the batch's own."""
    model = make(label_dropout=0.2)
    model.log = lambda *a, **k: None
    model.optimizers = lambda: SimpleNamespace(param_groups=[{"lr": 0.0}])
    labels = torch.arange(20000) % K
    x0 = MEANS[labels].float().view(-1, 1, 1, 1) + SIGMA * torch.randn(20000, 1, 8, 8)
    torch.manual_seed(5)
    model.training_step((x0, labels), 0)
    (seen,) = model.unet.seen
    dropped = seen == K
    share, se = dropped.float().mean().item(), (0.2 * 0.8 / 20000) ** 0.5
    assert share == pytest.approx(0.2, abs=4 * se)
    assert torch.equal(seen[~dropped], labels[~dropped])


def test_dropped_rows_train_the_unconditional_mixture_denoiser():
    """On the rows whose label was dropped the loss is least for E[ε | x_t], the mixture's
    denoiser: below the best single Gaussian's (same mean and variance as the data) and below
    the true class's denoiser of a guessed class; on kept rows it is the conditional optimum."""

    def moment_matched(schedule, x_t, t):  # the optimum for x0 ~ N(m, v I) of the data's m, v
        a = schedule.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        m, v = MEANS.mean(), MEANS.var(unbiased=False) + SIGMA**2
        return (1 - a).sqrt() * (x_t.double() - a.sqrt() * m) / (a * v + 1 - a)

    def class_one(schedule, x_t, t):
        return conditional_eps(schedule, x_t, t, torch.ones_like(t))

    torch.manual_seed(6)
    n = 20000
    labels = torch.arange(n) % K
    x0 = MEANS[labels].float().view(-1, 1, 1, 1) + SIGMA * torch.randn(n, 1, 8, 8)
    gen = torch.Generator().manual_seed(7)
    t, noise = torch.randint(0, 200, (n,), generator=gen), torch.randn(x0.shape, generator=gen)
    losses = {}
    for name, null in (("mixture", None), ("gaussian", moment_matched), ("class 1", class_one)):
        model = make(null=null, label_dropout=0.3)
        y = model.drop_labels({"y": labels}, torch.Generator().manual_seed(8))["y"]
        losses[name] = model.loss_terms(x0, t, noise, y=y)["simple"]
    dropped = y == K
    assert 0.28 < dropped.float().mean() < 0.32
    drop = {name: loss[dropped].mean().item() for name, loss in losses.items()}
    assert drop["mixture"] < 0.97 * drop["gaussian"] and drop["mixture"] < 0.9 * drop["class 1"]
    a = model.schedule.alphas_cumprod.double()[t[~dropped]]
    optimum = (a * SIGMA**2 / (a * SIGMA**2 + 1 - a)).mean().item()  # per-pixel E Var(ε | x_t, y)
    assert losses["mixture"][~dropped].mean().item() == pytest.approx(optimum, rel=0.02)


def test_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="label_dropout=0.1 drops class labels.*unconditional"):
        DDPM(tiny_unet(), label_dropout=0.1)
    with pytest.raises(ValueError, match="null_label=false"):
        DDPM(tiny_unet(num_classes=3, null_label=False), label_dropout=0.1)
    with pytest.raises(ValueError, match=r"label_dropout must be in \[0, 1\)"):
        DDPM(tiny_unet(num_classes=3), label_dropout=1.0)
    with pytest.raises(ValueError, match="trained without label_dropout"):
        DDPM(tiny_unet(num_classes=3), guidance_weight=2.0)
    with pytest.raises(ValueError, match="takes no scale"):
        make(label_dropout=0.0).sample(2, steps=2, scale=1.0)
    with pytest.raises(ValueError, match="w must be >= -1"):
        make().sample(2, steps=2, scale=-2.0)


def test_generation_declares_w_and_counts_two_calls_a_guided_step():
    model = make(guidance_weight=1.5)
    assert "classifier-free guidance w" in model.generation.scale
    assert model.nfe("ddim", 10) == 20 and make().nfe("ddim", 10) == 10
    assert make(label_dropout=0.0).generation.scale is None
    # the default w is the one validation grids, predict and eval draw at
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    default = model.sample(3, steps=4, x_T=x_T)
    torch.testing.assert_close(default, make().sample(3, steps=4, x_T=x_T, scale=1.5))
