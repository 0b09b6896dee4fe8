"""Classifier guidance with clipping against guided-diffusion's own code (guided-diffusion-sdk),
on the two-Gaussian mixture of test_diffusion_guidance (exact ε and ∇ log p(y | x_t)).

guided-diffusion clamps the model's x̂_0 first (``p_mean_variance``) and guides after, without a
second clamp: ``condition_score`` (DDIM, Algorithm 2) re-derives ε from the clamped x̂_0 and shifts
it by −s√(1 − ᾱ_t)g; ``condition_mean`` (ancestral, Algorithm 1) adds sΣ_t g to the mean of the
clamped x̂_0. Ours is ``clip_denoised`` inside the guidance wrapper.
"""

import pytest
import torch
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion

from diffusion_apps.diffusion import (
    classifier_log_prob_grad,
    clip_denoised,
    ddim_sample,
    ddpm_sample,
    eps_shift_guidance,
    mean_shift_guidance,
)
from tests.diffusion.test_diffusion_guidance import SCHEDULE, log_likelihoods, mixture_eps

TIMESTEPS = torch.tensor([0, 250, 500, 750])
SCALE = 5.0
N = 2000
VARIANCE = {"beta": gd.ModelVarType.FIXED_LARGE, "beta_tilde": gd.ModelVarType.FIXED_SMALL}


def official_loop(sampler: str, variance: str, x: torch.Tensor, labels: torch.Tensor, seed: int):
    diffusion = SpacedDiffusion(
        use_timesteps=TIMESTEPS.tolist(),
        betas=SCHEDULE.betas.double().numpy(),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=VARIANCE[variance],
        loss_type=gd.LossType.MSE,
    )
    grad = classifier_log_prob_grad(log_likelihoods)
    cond_fn = lambda x_t, t, y: SCALE * grad(x_t, t, y)  # noqa: E731 (guided-diffusion's scale)
    step = diffusion.ddim_sample if sampler == "ddim" else diffusion.p_sample
    torch.manual_seed(seed)  # p_sample's noise: the stream our generator of the same seed draws
    for i in reversed(range(len(TIMESTEPS))):
        t = torch.full((len(x),), i, dtype=torch.long)
        x = step(mixture_eps, x, t, clip_denoised=True, cond_fn=cond_fn, model_kwargs={"y": labels})
        x = x["sample"]
    return x


def ours(sampler: str, variance: str, x: torch.Tensor, labels: torch.Tensor, seed: int, old=False):
    """Clamp, then guide (``old``: guide, then clamp, the order before this test existed)."""
    grad = classifier_log_prob_grad(log_likelihoods)
    model = mixture_eps if old else clip_denoised(mixture_eps, SCHEDULE)
    if sampler == "ddim":
        guided = eps_shift_guidance(model, grad, SCHEDULE, SCALE)
        return ddim_sample(guided, SCHEDULE, x, timesteps=TIMESTEPS, clip_x0=old, y=labels)
    guided = mean_shift_guidance(model, grad, SCHEDULE, SCALE, variance, timesteps=TIMESTEPS)
    generator = torch.Generator().manual_seed(seed)
    return ddpm_sample(guided, SCHEDULE, x, timesteps=TIMESTEPS, variance=variance,
                       clip_x0=old, generator=generator, y=labels)  # fmt: skip


@pytest.mark.parametrize(
    ("sampler", "variance"), [("ddim", "beta"), ("ddpm", "beta"), ("ddpm", "beta_tilde")]
)
def test_clipped_guidance_equals_guided_diffusion(sampler, variance):
    x_T = torch.randn(N, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(N) % 2
    official = official_loop(sampler, variance, x_T, labels, seed=3)
    torch.testing.assert_close(
        ours(sampler, variance, x_T, labels, 3), official, rtol=0, atol=1e-4
    )  # fmt: skip  (float32 tables on both sides)
    old = ours(sampler, variance, x_T, labels, 3, old=True)
    assert (old - official).abs().max() > 0.05  # the old order is another sampler at s = 5


def test_guidance_coefficients_keep_float64():
    """float64 samples get float64 coefficients (float32 ones capped agreement at ~1e-8)."""
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t, g = torch.tensor([0, 3, 250, 500, 999]), torch.tensor([0.3, -2.0], dtype=torch.float64)
    alpha_bar = SCHEDULE.alphas_cumprod.double()[t, None]
    zero = lambda x_t, t, **_: torch.zeros_like(x_t)  # noqa: E731
    constant = lambda x_t, t, **_: g.expand_as(x_t)  # noqa: E731
    shifted = eps_shift_guidance(zero, constant, SCHEDULE, 2.0)(x, t)
    torch.testing.assert_close(shifted, -2.0 * (1 - alpha_bar).sqrt() * g, rtol=1e-13, atol=0)
    ts = torch.arange(1000)
    shifted = mean_shift_guidance(zero, constant, SCHEDULE, 2.0, "beta_tilde", timesteps=ts)(x, t)
    a = SCHEDULE.alphas_cumprod.double()
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    c_t = -(a / a_prev).sqrt() * (1 - a_prev) / (1 - a).sqrt()  # PDAE's c_t = Σ-shift, β̃
    torch.testing.assert_close(shifted, 2.0 * c_t[t, None] * g, rtol=1e-12, atol=1e-300)
    x0 = ((x - (1 - alpha_bar).sqrt() * x) / alpha_bar.sqrt()).clamp(-1, 1)
    expected = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    identity = lambda x_t, t, **_: x_t  # noqa: E731  (ε̂ = x_t)
    torch.testing.assert_close(clip_denoised(identity, SCHEDULE)(x, t), expected,
                               rtol=1e-12, atol=1e-12)  # fmt: skip


def test_the_fixed_large_shift_at_t0_is_guided_diffusions():
    """guided-diffusion's fixed-large variance at the first index is β̃'_1, not β'_0."""
    zero = lambda x_t, t, **_: torch.zeros_like(x_t)  # noqa: E731
    one = lambda x_t, t, **_: torch.ones_like(x_t)  # noqa: E731
    x, t = torch.zeros(1, 1, dtype=torch.float64), torch.tensor([0])
    shift = mean_shift_guidance(zero, one, SCHEDULE, 1.0, "beta", timesteps=TIMESTEPS)(x, t)
    a = SCHEDULE.alphas_cumprod.double()[TIMESTEPS]
    sigma2 = (1 - a[1] / a[0]) * (1 - a[0]) / (1 - a[1])
    # Δε = −Σ √α'_0 √(1 − ᾱ_{t_0})/β'_0 with α'_0 = ᾱ_{t_0}, β'_0 = 1 − ᾱ_{t_0}
    torch.testing.assert_close(shift, -sigma2 * (a[0] / (1 - a[0])).sqrt().view(1, 1))
