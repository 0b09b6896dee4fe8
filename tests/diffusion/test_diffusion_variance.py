"""Learned variance in closed form: v = ±1 are the two fixed variances, [ε, v] outputs keep their v
through every wrapper and the ODE samplers read ε only, and the L_vlb pieces are the Gaussian
identities they stand for."""

import math

import pytest
import torch

from diffusion_apps.diffusion import (
    NoiseSchedule,
    classifier_free_guidance,
    clip_denoised,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    discretized_gaussian_log_likelihood,
    dpm_solver_pp_2m,
    eps_shift_guidance,
    mean_shift_guidance,
    normal_kl,
    split_output,
    timestep_subsequence,
    vlb_terms,
)
from diffusion_apps.diffusion.samplers import respaced_variance
from diffusion_apps.diffusion.timesteps import subsequence_tables
from diffusion_apps.diffusion.variance import learned_log_variance, log_variance_bounds

SCHEDULE = NoiseSchedule("cosine", 1000)
TIMESTEPS = timestep_subsequence(1000, 25)


def eps_model(x_t, t, **_):
    """Some ε of x_t and t (C channels)."""
    return torch.sin(x_t) + (t.to(x_t) / 1000).view(-1, *[1] * (x_t.ndim - 1))


def with_v(v_fn):
    """The [ε, v] model of ``eps_model`` and v = v_fn(x_t, t)."""
    return lambda x_t, t, **cond: torch.cat([eps_model(x_t, t), v_fn(x_t, t)], dim=1)


def constant_v(value: float):
    return with_v(lambda x_t, t: torch.full_like(x_t, value))


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_split_output_tells_eps_from_eps_and_v():
    x = randn(2, 3, 4, 4)
    eps, v = split_output(torch.cat([x, -x], 1), x)
    assert torch.equal(eps, x) and torch.equal(v, -x)
    assert split_output(x, x) == (x, None)
    with pytest.raises(ValueError, match="2·3 channels"):
        split_output(randn(2, 5, 4, 4), x)


def test_bounds_are_the_respaced_fixed_variances():
    """v = 1 gives β'_i, v = −1 gives β̃'_i, at i = 0 clipped to β̃'_1 (guided-diffusion's
    ``posterior_log_variance_clipped``), v = 0 their geometric mean."""
    _, alpha_bar, alpha_bar_prev = subsequence_tables(SCHEDULE, TIMESTEPS)
    beta, beta_tilde = respaced_variance(alpha_bar, alpha_bar_prev, "beta_tilde")
    min_log, max_log = log_variance_bounds(alpha_bar, alpha_bar_prev)
    ones = torch.ones_like(beta)
    torch.testing.assert_close(learned_log_variance(ones, min_log, max_log).exp(), beta)
    torch.testing.assert_close(
        learned_log_variance(-ones, min_log, max_log).exp()[1:], beta_tilde[1:]
    )
    assert min_log[0] == min_log[1]
    torch.testing.assert_close(
        learned_log_variance(0 * ones, min_log, max_log).exp(),
        (beta * torch.cat([beta_tilde[1:2], beta_tilde[1:]])).sqrt(),
    )
    single = log_variance_bounds(alpha_bar[:1], alpha_bar_prev[:1])  # one step: no β̃'_1
    assert single[0] == single[1]


def draw(model, variance: str, x_T, timesteps, seed: int):
    """Ancestral samples of ``model`` from ``x_T`` with ``variance``, noise seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return ddpm_sample(
        model, SCHEDULE, x_T, timesteps=timesteps, variance=variance, generator=generator
    )


@pytest.mark.parametrize(("v", "fixed"), [(1.0, "beta"), (-1.0, "beta_tilde")])
def test_learned_sampling_with_v_at_a_bound_is_the_fixed_variance(v, fixed):
    """The last step adds no noise, so the t_0 clipping never shows: the samples are equal."""
    x_T = randn(64, 2, seed=1)
    learned = draw(constant_v(v), "learned", x_T, TIMESTEPS, seed=2)
    expected = draw(eps_model, fixed, x_T, TIMESTEPS, seed=2)
    torch.testing.assert_close(learned, expected, rtol=1e-5, atol=1e-6)


def test_learned_sampling_needs_v():
    with pytest.raises(ValueError, match=r"\[ε, v\]"):
        ddpm_sample(eps_model, SCHEDULE, randn(4, 2), timesteps=TIMESTEPS, variance="learned")


def test_the_noise_scale_is_elementwise():
    """Σ_θ varies per element: v = −1 on the first coordinate, +1 on the second; one step from
    t_1 to t_0 = 0 would add no noise, so take the two steps t_2 → t_1 → t_0 and compare each
    coordinate with its fixed-variance run."""
    v_fn = lambda x_t, t: torch.stack([-torch.ones_like(x_t[:, 0]), torch.ones_like(x_t[:, 1])], 1)  # noqa: E731
    x_T, ts = randn(32, 2, seed=3), TIMESTEPS[:3]
    mixed = draw(with_v(v_fn), "learned", x_T, ts, seed=4)
    torch.testing.assert_close(mixed[:, 0], draw(eps_model, "beta_tilde", x_T, ts, seed=4)[:, 0])
    torch.testing.assert_close(mixed[:, 1], draw(eps_model, "beta", x_T, ts, seed=4)[:, 1])


@pytest.mark.parametrize(("v", "fixed"), [(1.0, "beta"), (-1.0, "beta_tilde")])
def test_learned_mean_shift_with_v_at_a_bound_is_the_fixed_one(v, fixed):
    """Δε = −s Σ √α' √(1 − ᾱ)/β' g with Σ = Σ_θ(v): the fixed shift at t_i > t_0; at t_0 the
    learned bounds are β'_0 and β̃'_1 (the fixed large Σ is β̃'_1 there, the fixed small 0)."""
    g = lambda x_t, t, **_: torch.cos(x_t)  # noqa: E731
    x = randn(25, 2, seed=5, dtype=torch.float64)
    t = TIMESTEPS.flip(0)
    learned = mean_shift_guidance(constant_v(v), g, SCHEDULE, 2.0, "learned", timesteps=TIMESTEPS)(
        x, t
    )
    eps, v_out = split_output(learned, x)
    assert torch.equal(v_out, torch.full_like(x, v))
    fixed_eps = mean_shift_guidance(eps_model, g, SCHEDULE, 2.0, fixed, timesteps=TIMESTEPS)(x, t)
    torch.testing.assert_close(eps[:-1], fixed_eps[:-1], rtol=1e-12, atol=1e-12)
    _, a, a_prev = subsequence_tables(SCHEDULE, TIMESTEPS)
    sigma2 = (1 - a[0]) if v == 1 else (1 - a[1] / a[0]) * (1 - a[0]) / (1 - a[1])  # β'_0, β̃'_1
    shift = -2.0 * sigma2 * (a[0] / (1 - a[0])).sqrt() * torch.cos(x[-1])
    torch.testing.assert_close(eps[-1] - eps_model(x[-1:], t[-1:])[0], shift, rtol=1e-10, atol=0)


def test_wrappers_shift_eps_and_keep_v():
    x, t = randn(4, 2, 3, 3, seed=6), torch.tensor([0, 10, 500, 999])
    v_fn = lambda x_t, t: torch.tanh(x_t + 1)  # noqa: E731
    model, g = with_v(v_fn), (lambda x_t, t, **_: torch.cos(x_t))
    for wrapped, reference in [
        (
            eps_shift_guidance(model, g, SCHEDULE, 3.0),
            eps_shift_guidance(eps_model, g, SCHEDULE, 3.0),
        ),
        (clip_denoised(model, SCHEDULE), clip_denoised(eps_model, SCHEDULE)),
    ]:
        eps, v = split_output(wrapped(x, t), x)
        torch.testing.assert_close(eps, reference(x, t), rtol=0, atol=0)
        torch.testing.assert_close(v, v_fn(x, t), rtol=0, atol=0)


def test_classifier_free_guidance_keeps_the_conditional_v():
    def model(x_t, t, y):
        y = y.to(x_t).view(-1, 1, 1, 1)
        return torch.cat([eps_model(x_t, t) * (1 + y), torch.tanh(x_t) + y], dim=1)

    x, t, y = randn(3, 2, 2, 2, seed=7), torch.tensor([5, 50, 500]), torch.tensor([1, 2, 3])
    eps, v = split_output(classifier_free_guidance(model, 2.5, {"y": 0})(x, t, y=y), x)
    cond, null = model(x, t, y)[:, :2], model(x, t, torch.zeros_like(y))[:, :2]
    torch.testing.assert_close(eps, null + 2.5 * (cond - null))
    torch.testing.assert_close(v, model(x, t, y)[:, 2:])


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "invert"])
def test_ode_samplers_read_the_eps_half(sampler):
    run = {
        "ddim": lambda m, x: ddim_sample(m, SCHEDULE, x, timesteps=TIMESTEPS, clip_x0=True),
        "dpmpp_2m": lambda m, x: dpm_solver_pp_2m(m, SCHEDULE, x, timesteps=TIMESTEPS),
        "invert": lambda m, x: ddim_invert(m, SCHEDULE, x, timesteps=TIMESTEPS),
    }[sampler]
    x = randn(8, 2, seed=8)
    torch.testing.assert_close(run(constant_v(0.3), x), run(eps_model, x), rtol=0, atol=0)


def test_normal_kl_is_the_gaussian_kl():
    m1, m2, l1, l2 = randn(4, 10, seed=9, dtype=torch.float64)
    exact = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * l1).exp()),
        torch.distributions.Normal(m2, (0.5 * l2).exp()),
    )
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), exact, rtol=1e-12, atol=1e-12)


def test_discretised_likelihood_sums_to_one_over_the_256_bins():
    """The bins of 8-bit data tile the line (edge bins to ±∞): P sums to 1; each bin's mass is
    the exact Normal mass up to the tanh approximation of Φ (|error| < 2e-4)."""
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    mean, log_scale = (
        torch.tensor(0.3, dtype=torch.float64),
        torch.tensor(math.log(0.2), dtype=torch.float64),
    )
    log_p = discretized_gaussian_log_likelihood(bins, mean.expand(256), log_scale.expand(256))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    normal = torch.distributions.Normal(mean, log_scale.exp())
    edges = torch.cat(
        [torch.tensor([-math.inf]), (bins[1:] + bins[:-1]) / 2, torch.tensor([math.inf])]
    )
    exact = normal.cdf(edges[1:]) - normal.cdf(edges[:-1])
    assert (log_p.exp() - exact).abs().max() < 2e-4


def test_vlb_is_zero_for_the_true_posterior_and_the_decoder_nll_at_t0():
    """With ε̂ the true noise and v = −1, p_θ(x_{t−1} | x_t) is q(x_{t−1} | x_t, x_0): L_t = 0 for
    t > 0. At t = 0 the term is −log₂ P(x_0) per dimension under N(x̂_0, β_0)."""
    x0 = (
        torch.randint(0, 256, (5, 2, 4, 4), generator=torch.Generator().manual_seed(10)) / 127.5 - 1
    )
    t, noise = torch.tensor([0, 1, 40, 500, 999]), randn(5, 2, 4, 4, seed=11)
    x0, noise = x0.double(), noise.double()
    x_t = SCHEDULE.q_sample(x0, t, noise)
    v = -torch.ones_like(x0)
    terms = vlb_terms(SCHEDULE, x0, x_t, t, x0, v)
    assert terms[1:].abs().max() < 1e-9
    a = SCHEDULE.alphas_cumprod.double()
    beta_tilde_1 = (1 - a[1] / a[0]) * (1 - a[0]) / (1 - a[1])  # Σ_θ at t = 0 with v = −1
    nll = -discretized_gaussian_log_likelihood(
        x0[0], x0[0], 0.5 * beta_tilde_1.log().expand_as(x0[0])
    )
    torch.testing.assert_close(terms[0], nll.mean() / math.log(2))
