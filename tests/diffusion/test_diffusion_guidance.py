"""Guidance wrappers: algebraic identities, then exact sampling of a two-Gaussian mixture.

Mixture: y ∈ {0, 1} equally likely, x0 | y ~ N(m_y, s² I) with m_1 = −m_0. Then q(x_t | y) =
N(√ᾱ m_y, v I), v = ᾱ s² + 1 − ᾱ, so log p(y | x_t) = softmax_y(−‖x_t − √ᾱ m_y‖²/2v), the exact
unconditional predictor is ε* = −√(1 − ᾱ) ∇ log q(x_t), and ∇ log p(y | x_t) =
√ᾱ (m_y − E[m | x_t])/v.
With s = 1, ε* − √(1 − ᾱ) ∇ log p(y | x_t) = −√(1 − ᾱ) ∇ log q(x_t | y) is the exact conditional
predictor, so guided samplers must return N(m_y, s² I).
"""

import math

import pytest
import torch

from diffusion_apps.diffusion import (
    NoiseSchedule,
    classifier_free_guidance,
    classifier_log_prob_grad,
    ddim_sample,
    ddpm_sample,
    eps_shift_guidance,
    mean_shift_guidance,
)

SCHEDULE = NoiseSchedule("linear", 1000)
ALL = torch.arange(1000)  # every timestep: the full chain
MEANS = torch.tensor([[1.5, 1.0], [-1.5, -1.0]])  # m_0, m_1
STD = 0.5


def alpha_bar_closed_form() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def log_likelihoods(x_t, t):
    """−‖x_t − √ᾱ m_y‖²/2v for both classes, (B, 2): logits of p(y | x_t)."""
    a = SCHEDULE.alpha_bar(t)[:, None]
    v = a * STD**2 + 1 - a
    return -((x_t[:, None, :] - a[:, None].sqrt() * MEANS) ** 2).sum(-1) / (2 * v)


def mixture_eps(x_t, t, **_):
    a = SCHEDULE.alpha_bar(t)[:, None]
    posterior_mean = log_likelihoods(x_t, t).softmax(-1) @ MEANS  # E[m | x_t]
    score = -(x_t - a.sqrt() * posterior_mean) / (a * STD**2 + 1 - a)
    return -(1 - a).sqrt() * score


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def constant_grad(g):
    return lambda x_t, t, **_: g.expand_as(x_t)


# --- identities ----------------------------------------------------------------------------------


def test_scale_zero_is_identity():
    x, t = randn(6, 2), torch.tensor([0, 1, 250, 500, 750, 999])
    grad = classifier_log_prob_grad(log_likelihoods)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    expected = mixture_eps(x, t)
    assert torch.equal(eps_shift_guidance(mixture_eps, grad, SCHEDULE, 0.0)(x, t, y=y), expected)
    for variance in ("beta", "beta_tilde"):
        guided = mean_shift_guidance(mixture_eps, grad, SCHEDULE, 0.0, variance, timesteps=ALL)
        assert torch.equal(guided(x, t, y=y), expected)


def test_eps_shift_is_algorithm_2():
    g, t, scale = torch.tensor([0.3, -2.0]), torch.tensor([0, 10, 500, 999]), 2.5
    guided = eps_shift_guidance(lambda x, t: torch.zeros_like(x), constant_grad(g), SCHEDULE, scale)
    a = alpha_bar_closed_form()[t, None]
    expected = -scale * (1 - a).sqrt() * g
    torch.testing.assert_close(guided(randn(4, 2), t).double(), expected, rtol=1e-3, atol=1e-7)


def test_mean_shift_with_posterior_variance_is_pdae_c_t():
    """PDAE: c_t = −√α_t (1 − ᾱ_{t−1})/√(1 − ᾱ_t); ᾱ in float32 limits 1 − ᾱ_t near t = 0 to
    ~1e-3 relative precision."""
    g, t, scale = torch.tensor([0.3, -2.0]), torch.tensor([0, 1, 10, 500, 999]), 0.7
    guided = mean_shift_guidance(
        lambda x, t: torch.zeros_like(x),
        constant_grad(g),
        SCHEDULE,
        scale,
        "beta_tilde",
        timesteps=ALL,
    )
    a = alpha_bar_closed_form()
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    c_t = -(a / a_prev).sqrt() * (1 - a_prev) / (1 - a).sqrt()
    expected = scale * c_t[t, None] * g
    torch.testing.assert_close(guided(randn(5, 2), t).double(), expected, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_mean_shift_moves_the_respaced_ddpm_mean_by_sigma_g(variance):
    """Algorithm 1 on the subsequence (t_lo, t_hi): guidance only at t_hi, ε_θ = 0, shared noise.
    The step t_hi → t_lo moves by s Σ g, and the last step x̂0 = x_{t_lo}/√ᾱ_{t_lo} scales it."""
    t_lo, t_hi, scale, g = 200, 600, 1.5, torch.tensor([0.4, -1.0])
    timesteps = torch.tensor([t_lo, t_hi])

    def grad_fn(x_t, t, **_):
        return g * (t == t_hi)[:, None]

    zero = lambda x, t: torch.zeros_like(x)
    guided = mean_shift_guidance(zero, grad_fn, SCHEDULE, scale, variance, timesteps=timesteps)
    x_T = randn(3, 2)
    runs = [
        ddpm_sample(
            fn,
            SCHEDULE,
            x_T,
            timesteps=timesteps,
            variance=variance,
            generator=torch.Generator().manual_seed(0),
        )
        for fn in (zero, guided)
    ]
    a = alpha_bar_closed_form()
    beta = 1 - a[t_hi] / a[t_lo]
    sigma2 = beta if variance == "beta" else beta * (1 - a[t_lo]) / (1 - a[t_hi])
    expected = scale * sigma2 * g.double() / a[t_lo].sqrt()
    torch.testing.assert_close(
        (runs[1] - runs[0]).double(), expected.expand(3, 2), rtol=1e-3, atol=1e-6
    )


def test_classifier_gradient_of_linear_classifier_under_no_grad():
    """logits = W x + b ⇒ ∇ log softmax_y = W_y − Σ_k p_k W_k."""
    weight, bias = randn(3, 4, seed=1), randn(3, seed=2)
    classifier = lambda x, t: x @ weight.T + bias
    x, y = randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        grad = classifier_log_prob_grad(classifier)(x, torch.zeros(5, dtype=torch.long), y=y)
    probs = classifier(x, None).softmax(-1)
    torch.testing.assert_close(grad, weight[y] - probs @ weight)
    assert not grad.requires_grad


def test_mixture_classifier_gradient_matches_closed_form():
    x, t, y = 2 * randn(6, 2), torch.tensor([0, 100, 300, 500, 700, 999]), torch.tensor([0, 1] * 3)
    grad = classifier_log_prob_grad(log_likelihoods)(x, t, y=y)
    a = SCHEDULE.alpha_bar(t)[:, None]
    posterior_mean = log_likelihoods(x, t).softmax(-1) @ MEANS
    expected = a.sqrt() * (MEANS[y] - posterior_mean) / (a * STD**2 + 1 - a)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_classifier_free_guidance_batches_once_and_is_exact_at_0_and_1():
    calls = []

    def eps_fn(x_t, t, y, context, flag):
        calls.append(len(x_t))
        assert flag == "kept"
        return 0.5 * x_t + y[:, None].float() + context.sum(-1, keepdim=True) + t[:, None]

    x, t = randn(4, 2), torch.tensor([5, 6, 7, 8])
    cond = {"y": torch.tensor([1, 2, 3, 4]), "context": randn(4, 3, seed=1), "flag": "kept"}
    null = {"y": torch.tensor(10)}  # 0-dim null label, broadcast; context has no null: repeated
    eps_cond, eps_null = eps_fn(x, t, **cond), eps_fn(x, t, **{**cond, "y": torch.full((4,), 10)})
    calls.clear()
    for w, expected in [(0.0, eps_null), (1.0, eps_cond)]:
        assert torch.equal(classifier_free_guidance(eps_fn, w, null)(x, t, **cond), expected)
    out = classifier_free_guidance(eps_fn, 3.0, null)(x, t, **cond)
    torch.testing.assert_close(out, eps_null + 3.0 * (eps_cond - eps_null))
    assert calls == [8, 8, 8]


# --- exact sampling of the mixture --------------------------------------------------------------

N = 10_000
LABELS = torch.arange(N) % 2


def assert_class_conditional(x, assert_gaussian):
    for label in (0, 1):
        assert_gaussian(x[torch.eq(LABELS, label)], MEANS[label], torch.full((2,), STD))


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_mean_shift_ddpm_samples_the_class_conditional(variance, assert_gaussian):
    grad = classifier_log_prob_grad(log_likelihoods)
    guided = mean_shift_guidance(mixture_eps, grad, SCHEDULE, 1.0, variance, timesteps=ALL)
    x = ddpm_sample(
        guided,
        SCHEDULE,
        randn(N, 2),
        variance=variance,
        y=LABELS,
        generator=torch.Generator().manual_seed(1),
    )
    assert_class_conditional(x, assert_gaussian)


def test_eps_shift_ddim_samples_the_class_conditional(assert_gaussian):
    """All 1000 steps: η = 0 has an O(1/S) variance bias (test_diffusion_samplers), ~0.5% here."""
    guided = eps_shift_guidance(mixture_eps, classifier_log_prob_grad(log_likelihoods), SCHEDULE)
    x = ddim_sample(guided, SCHEDULE, randn(N, 2), y=LABELS)
    assert_class_conditional(x, assert_gaussian)


def test_unguided_ddpm_samples_the_mixture():
    grad = classifier_log_prob_grad(log_likelihoods)
    guided = mean_shift_guidance(mixture_eps, grad, SCHEDULE, 0.0, timesteps=ALL)
    x = ddpm_sample(
        guided, SCHEDULE, randn(N, 2), y=LABELS, generator=torch.Generator().manual_seed(1)
    )
    in_mode_0 = (x @ MEANS[0] > 0).double().mean().item()
    assert abs(in_mode_0 - 0.5) < 4 * 0.5 / math.sqrt(N)
    mixture_std = (STD**2 + MEANS[0] ** 2).sqrt()
    assert torch.all(x.mean(0).abs() < 4 * mixture_std / math.sqrt(N))
