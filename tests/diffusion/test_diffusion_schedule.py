"""NoiseSchedule against closed forms computed independently in float64 Python/torch."""

import math

import pytest
import torch

from diffusion_apps.diffusion import NoiseSchedule


def cumprod(betas: list[float]) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), by a plain Python loop."""
    out, prod = [], 1.0
    for beta in betas:
        prod *= 1 - beta
        out.append(prod)
    return torch.tensor(out, dtype=torch.float64)


def linear_betas(start: float, end: float, T: int) -> list[float]:
    return [start + (end - start) * i / (T - 1) for i in range(T)]


def test_linear_schedule_matches_ddpm():
    schedule = NoiseSchedule("linear", 1000)
    expected = cumprod(linear_betas(1e-4, 0.02, 1000))
    torch.testing.assert_close(schedule.alphas_cumprod.double(), expected, rtol=1e-6, atol=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), expected[:-1]])
    torch.testing.assert_close(schedule.alphas_cumprod_prev.double(), prev, rtol=1e-6, atol=0)


def test_linear_schedule_rescales_by_1000_over_T():
    schedule = NoiseSchedule("linear", 100)
    expected = torch.tensor(linear_betas(1e-3, 0.2, 100), dtype=torch.float64)
    torch.testing.assert_close(schedule.betas.double(), expected, rtol=1e-6, atol=0)


def test_sqrt_linear_schedule_matches_latent_diffusion():
    schedule = NoiseSchedule("sqrt_linear", 1000, beta_start=0.0015, beta_end=0.0195)
    roots = linear_betas(math.sqrt(0.0015), math.sqrt(0.0195), 1000)
    expected = cumprod([r * r for r in roots])
    torch.testing.assert_close(schedule.alphas_cumprod.double(), expected, rtol=1e-6, atol=0)


def test_cosine_schedule_telescopes_and_clips():
    T, s = 1000, 0.008
    schedule = NoiseSchedule("cosine", T, cosine_s=s)

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = schedule.betas.double()
    assert betas.max().item() == pytest.approx(0.999)  # f(T) = 0, so the last β is clipped
    unclipped = int((betas < 0.999 - 1e-6).sum())
    assert unclipped == T - 1
    # Without clipping the product telescopes: ᾱ_t = f(t + 1) / f(0).
    expected = torch.tensor([f(t + 1) / f(0) for t in range(unclipped)], dtype=torch.float64)
    torch.testing.assert_close(
        schedule.alphas_cumprod[:unclipped].double(), expected, rtol=2e-5, atol=1e-7
    )


def test_constant_schedule():
    schedule = NoiseSchedule("constant", 50, constant_beta=0.008)
    expected = torch.tensor([0.992 ** (t + 1) for t in range(50)], dtype=torch.float64)
    torch.testing.assert_close(schedule.alphas_cumprod.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"kind": "quadratic"}, "kind"),
        ({"num_timesteps": 0}, "num_timesteps"),
        ({"beta_start": 0.0}, "beta_start"),
        ({"beta_end": 1.5}, "beta_end"),
        ({"num_timesteps": 10}, "beta_end"),  # 0.02 · 1000/10 = 2
        ({"kind": "sqrt_linear", "beta_start": -0.1}, "beta_start"),
        ({"kind": "constant", "constant_beta": 1.0}, "constant_beta"),
        ({"kind": "cosine", "cosine_s": -0.1}, "cosine_s"),
    ],
)
def test_bad_arguments_raise_naming_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        NoiseSchedule(**kwargs)


def test_single_step_schedule_is_valid():
    for kind in ("sqrt_linear", "cosine", "constant"):
        schedule = NoiseSchedule(kind, 1)
        assert schedule.alphas_cumprod.shape == (1,)
        assert 0 < schedule.betas.item() < 1


def test_buffers_are_not_saved_and_follow_to():
    schedule = NoiseSchedule()
    assert schedule.state_dict() == {}
    names = {name for name, _ in schedule.named_buffers()}
    assert names == {"betas", "alphas_cumprod", "alphas_cumprod_prev"}
    assert all(b.dtype == torch.float32 for b in schedule.buffers())
    schedule.to("meta")
    assert all(b.device.type == "meta" for b in schedule.buffers())


def test_repr_names_kind_and_length():
    text = repr(NoiseSchedule("cosine", 250))
    assert "kind='cosine'" in text and "num_timesteps=250" in text


def test_alpha_bar_and_snr():
    schedule = NoiseSchedule()
    t = torch.tensor([0, 10, 500, 999])
    expected = cumprod(linear_betas(1e-4, 0.02, 1000))[t]
    torch.testing.assert_close(schedule.alpha_bar(t).double(), expected, rtol=1e-6, atol=0)
    snr = expected / (1 - expected)
    torch.testing.assert_close(schedule.snr(t).double(), snr, rtol=5e-4, atol=0)


def test_q_sample_moments():
    schedule = NoiseSchedule()
    n, x0 = 200_000, 0.7
    t = torch.full((n,), 300)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 1, generator=generator)
    x_t = schedule.q_sample(torch.full((n, 1), x0), t, noise).double()
    alpha_bar = cumprod(linear_betas(1e-4, 0.02, 1000))[300].item()
    var = 1 - alpha_bar
    assert abs(x_t.mean().item() - math.sqrt(alpha_bar) * x0) < 4 * math.sqrt(var / n)
    assert abs(x_t.var().item() - var) < 4 * var * math.sqrt(2 / n)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_x0_eps_v_round_trips(kind):
    schedule = NoiseSchedule(kind).double()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 1, 100, 500, 900, 998])
    x_t = schedule.q_sample(x0, t, eps)
    torch.testing.assert_close(schedule.predict_x0(x_t, t, eps), x0)
    torch.testing.assert_close(schedule.predict_eps(x_t, t, x0), eps)
    v = schedule.velocity(x0, t, eps)
    a = schedule.alpha_bar(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    torch.testing.assert_close(schedule.x0_from_v(x_t, t, v), x0)
    torch.testing.assert_close(schedule.eps_from_v(x_t, t, v), eps)


def test_posterior_is_product_of_gaussians():
    """q(x_{t−1}|x_t, x0) ∝ N(x_t; √α_t x_{t−1}, β_t) · N(x_{t−1}; √ᾱ_{t−1} x0, 1 − ᾱ_{t−1})."""
    schedule = NoiseSchedule()
    betas = torch.tensor(linear_betas(1e-4, 0.02, 1000), dtype=torch.float64)
    alpha_bar = cumprod(betas.tolist())
    t = torch.tensor([1, 2, 50, 400, 999])
    generator = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    beta, a_prev = betas[t, None], alpha_bar[t - 1, None]
    precision = (1 - beta) / beta + 1 / (1 - a_prev)
    mean = ((1 - beta).sqrt() * x_t / beta + a_prev.sqrt() * x0 / (1 - a_prev)) / precision
    got_mean, got_var = schedule.posterior(x0.float(), x_t.float(), t)
    torch.testing.assert_close(got_var.double(), 1 / precision, rtol=1e-3, atol=0)
    torch.testing.assert_close(got_mean.double(), mean, rtol=1e-3, atol=1e-5)
    # At t = 0 the posterior is the point mass at x0. float32 ᾱ_0 = 0.9999 carries 1 − ᾱ_0 = β_0 to
    # about 3e-8 / 1e-4 relative precision, hence rtol 1e-3.
    mean0, var0 = schedule.posterior(x0.float(), x_t.float(), torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(mean0, x0.float(), rtol=1e-3, atol=1e-6)
    assert torch.all(var0 == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_tables_stay_float32_when_the_module_is_cast(dtype):
    """bf16-true / 16-true cast every floating buffer: ᾱ_0 … ᾱ_9 would round to exactly 1, so
    √(1 − ᾱ) = 0 and SNR = ∞. The tables keep their float32 values, on the new device."""
    reference = NoiseSchedule()
    schedule = NoiseSchedule().to(dtype)
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev"):
        assert getattr(schedule, name).dtype == torch.float32, name
        assert torch.equal(getattr(schedule, name), getattr(reference, name)), name
    t = torch.arange(10)
    assert torch.isfinite(schedule.snr(t)).all()


def test_coefficients_are_computed_before_the_cast_to_the_data_dtype():
    """A bf16 x_t at t = 0 still gets σ = √(1 − ᾱ_0) = 0.01, not √(1 − bf16(ᾱ_0)) = 0."""
    schedule = NoiseSchedule()
    t = torch.zeros(4, dtype=torch.long)
    x0 = torch.zeros(4, 3, dtype=torch.bfloat16)
    noise = torch.ones(4, 3, dtype=torch.bfloat16)
    x_t = schedule.q_sample(x0, t, noise)
    expected = math.sqrt(1e-4)  # β_0 = 1e-4
    assert x_t.dtype == torch.bfloat16
    torch.testing.assert_close(x_t.float(), torch.full((4, 3), expected), rtol=2**-7, atol=0)
    eps = schedule.predict_eps(x_t, t, x0)
    assert torch.isfinite(eps).all()
    torch.testing.assert_close(eps.float(), noise.float(), rtol=2**-6, atol=0)
