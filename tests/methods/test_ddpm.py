"""DDPM module against closed forms: Gaussian data has an exact optimal denoiser."""

import pytest
import torch
from torch import nn

from diffusion_apps.diffusion import NoiseSchedule, min_snr_weight, timestep_subsequence
from diffusion_apps.methods import DDPM
from tests.factories import randomize_, tiny_unet

MU, SIGMA = 0.2, 0.2  # |x| > 1 (clamped by sample()) has probability 3e-5


class GaussianOracle(nn.Module):
    """The exact optimal predictor for x0 ~ N(MU, SIGMA² I), in any parametrisation.

    E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ μ)/(ᾱσ² + 1 − ᾱ); x0 and v follow from x_t = √ᾱ x0 + √(1−ᾱ) ε.
    """

    def __init__(self, schedule: NoiseSchedule, prediction: str, size: int = 8):
        super().__init__()
        self.schedule, self.prediction = schedule, prediction
        self.in_channels, self.image_size = 1, size
        self.sample_shape = (1, size, size)
        self.dummy = nn.Parameter(torch.zeros(()))  # so the module has something to optimise

    def forward(self, x_t, t):
        return self.optimum(x_t, t, MU)

    def optimum(self, x_t, t, mu):
        """The optimal prediction for x0 ~ N(mu, SIGMA² I)."""
        a = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1).double()
        x = x_t.double()
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * SIGMA**2 + 1 - a)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction]
        return out.float() + 0 * self.dummy


def make(prediction="eps", T=200, **kw):
    schedule = NoiseSchedule(num_timesteps=T)
    return DDPM(GaussianOracle(schedule, prediction), schedule, prediction=prediction, **kw)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_eps_converts_every_parametrisation(prediction):
    """With the oracle, eps() must give the same ε whatever the network predicts."""
    torch.manual_seed(0)
    x_t, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 50, 120, 199])
    expected = make("eps").eps(x_t, t)
    torch.testing.assert_close(make(prediction).eps(x_t, t), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_target_is_what_q_sample_used(prediction):
    """target(x0, t, ε) is ε, x0, or v = √ᾱ ε − √(1−ᾱ) x0 (Salimans & Ho 2022)."""
    model, x0, noise = make(prediction), torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t = torch.tensor([0, 10, 199])
    a = model.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]
    torch.testing.assert_close(model.target(x0, t, noise), expected)


def test_loss_of_the_optimal_denoiser_is_the_posterior_variance():
    """At the optimum, L_simple = E_t Var(ε | x_t) = E_t ᾱσ²/(ᾱσ² + 1 − ᾱ), t ~ U{0..T−1}."""
    torch.manual_seed(0)
    model = make("eps")
    x0 = MU + SIGMA * torch.randn(4096, 1, 8, 8)
    losses = torch.stack([model.diffusion_loss(x0) for _ in range(4)])
    a = model.schedule.alphas_cumprod.double()
    expected = (a * SIGMA**2 / (a * SIGMA**2 + 1 - a)).mean()
    # t is drawn per image: 16,384 draws, so the loss mean has ~1% sampling error.
    assert losses.mean().item() == pytest.approx(expected.item(), rel=0.03)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_loss_is_the_clipped_snr_weighted_x0_error(prediction):
    """Hang et al. 2023: with min_snr_gamma = γ the loss is E_t min(SNR_t, γ)·‖x0 − x̂0‖², the
    same x0-space objective whatever the network predicts (x̂0 from the written-out inverses of
    x_t = √ᾱ x0 + √(1−ᾱ) ε and v = √ᾱ ε − √(1−ᾱ) x0)."""
    gamma = 5.0
    model = make(prediction, min_snr_gamma=gamma)
    x0 = 0.1 + 0.7 * torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    loss = model.diffusion_loss(x0, torch.Generator().manual_seed(2))
    t, noise, x_t = model.noised(x0, torch.Generator().manual_seed(2))  # the same draws
    f = model.unet(x_t, t).double()
    a = model.schedule.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    x_t = x_t.double()
    x0_hat = {
        "eps": (x_t - (1 - a).sqrt() * f) / a.sqrt(),
        "x0": f,
        "v": a.sqrt() * x_t - (1 - a).sqrt() * f,
    }[prediction]
    snr = (a / (1 - a)).flatten()
    error = (x0.double() - x0_hat).square().flatten(1).mean(1)
    expected = (snr.clamp(max=gamma) * error).mean()
    assert (snr > gamma).any() and (snr < gamma).any()  # both sides of the clip are drawn
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_importance_sampled_t_follows_the_v_min_snr_weights(prediction):
    """t ~ p(t) = m_t/Σm, m_t = min(SNR_t, 5)/(SNR_t + 1) in every parametrisation: the draws'
    mean t and share of t >= 100 are p's own."""
    model = make(prediction, min_snr_gamma=5.0, timestep_sampling="importance")
    t, _, _ = model.noised(torch.zeros(200_000, 1, 1, 1), torch.Generator().manual_seed(0))
    a = model.schedule.alphas_cumprod.double()
    snr = a / (1 - a)
    m = snr.clamp(max=5.0) / (snr + 1)
    p = m / m.sum()
    steps = torch.arange(len(p), dtype=torch.float64)
    assert t.double().mean().item() == pytest.approx((p * steps).sum().item(), rel=0.01)
    assert (t >= 100).double().mean().item() == pytest.approx(p[100:].sum().item(), abs=0.005)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_importance_sampling_keeps_the_expected_min_snr_loss(prediction):
    """With the optimal denoiser of x0 ~ N(μ, σ²), E‖x0 − x̂0‖² at t is Var(x0 | x_t) =
    σ²(1−ᾱ)/(ᾱσ² + 1 − ᾱ), so the min-SNR loss is (1/T) Σ_t min(SNR_t, γ)·Var(x0 | x_t)
    under either draw of t."""
    gamma = 5.0
    model = make(prediction, min_snr_gamma=gamma, timestep_sampling="importance")
    gen = torch.Generator().manual_seed(3)
    x0 = MU + SIGMA * torch.randn(4096, 1, 8, 8, generator=gen)
    losses = torch.stack([model.diffusion_loss(x0, gen) for _ in range(4)])
    a = model.schedule.alphas_cumprod.double()
    posterior = SIGMA**2 * (1 - a) / (a * SIGMA**2 + 1 - a)
    expected = ((a / (1 - a)).clamp(max=gamma) * posterior).mean()
    # 16,384 draws of t: ~1% sampling error (eps: its weights w_t/m_t = m̄/ᾱ_t spread most)
    assert losses.mean().item() == pytest.approx(expected.item(), rel=0.02)


def test_importance_sampling_needs_the_min_snr_weights():
    with pytest.raises(ValueError, match="timestep_sampling='importance' .* set min_snr_gamma"):
        make(timestep_sampling="importance")
    with pytest.raises(ValueError, match="timestep_sampling must be one of .* got 'weighted'"):
        make(min_snr_gamma=5.0, timestep_sampling="weighted")


def test_importance_sampling_refuses_the_learned_variance():
    """L_hybrid's λ·T·E_t[L_t] is an average over uniform t: drawn by the min-SNR weights it
    would be a different, unweighted sum."""
    schedule = NoiseSchedule(num_timesteps=200)
    unet = tiny_unet(out_channels=2)
    with pytest.raises(ValueError, match="timestep_sampling='importance' .*variance='learned'"):
        DDPM(unet, schedule, variance="learned", min_snr_gamma=5.0,
             timestep_sampling="importance")  # fmt: skip


def test_min_snr_eps_weight_is_one_where_the_snr_is_zero():
    """min(SNR, γ)/SNR → 1 as SNR → 0 (pure noise, a zero-terminal-SNR schedule's last step):
    the weight stays finite instead of 0/0."""

    class ZeroSNR:
        def snr(self, t):
            return torch.zeros(len(t))

    w = min_snr_weight(ZeroSNR(), "eps", torch.tensor([999, 999]), 5.0)
    assert torch.equal(w, torch.ones(2))


def test_min_snr_gamma_must_be_positive():
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0 or null, got 0"):
        make(min_snr_gamma=0.0)


class BF16Output(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x, t).bfloat16()


def test_loss_is_computed_in_fp32_under_bf16_autocast():
    """bf16-mixed: the network may answer in bf16, the squared error is summed in fp32."""
    model = make("eps")
    oracle = model.unet
    x0 = MU + SIGMA * torch.randn(512, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = model.diffusion_loss(x0, torch.Generator().manual_seed(1))
    model.unet = BF16Output(oracle)
    with torch.autocast("cpu", torch.bfloat16):
        mixed = model.diffusion_loss(x0, torch.Generator().manual_seed(1))
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(exact.item(), rel=1e-2)  # bf16 rounding of ε̂ only


@pytest.mark.parametrize(
    ("sampler", "steps", "spacing"),
    [("ddpm", 1000, "uniform"), ("ddim", 1000, "uniform"), ("dpmpp_2m", 20, "logsnr")],
)
def test_sample_draws_the_data_distribution(sampler, steps, spacing):
    """sample() with the exact denoiser and T = 1000 returns N(μ, σ²) images (DPM-Solver++, a
    second-order ODE solver, in 20 "logsnr" steps; see tests/diffusion/test_diffusion_dpm_solver).

    Tolerance: 5 standard errors, plus 3% of σ² for the variance (the discretisation bias;
    the samplers' own tests show it shrinking with steps).
    """
    model = make("eps", T=1000, clip_x0=False, timestep_spacing=spacing)
    gen = torch.Generator().manual_seed(0)
    x = model.sample(256, sampler=sampler, steps=steps, generator=gen)
    assert x.shape == (256, 1, 8, 8)
    n = x.numel()  # 16,384 scalars: s.e. of the mean 0.0016, of the variance 0.0004
    assert x.mean().item() == pytest.approx(MU, abs=5 * SIGMA / n**0.5)
    assert x.var().item() == pytest.approx(
        SIGMA**2, abs=5 * SIGMA**2 * (2 / n) ** 0.5 + 0.03 * SIGMA**2
    )


def test_sample_is_clamped_to_the_data_range():
    """Without clip_x0 the draw leaves [−1, 1] from a far-out x_T; sample() clamps it."""
    model, x_T = make("eps", clip_x0=False), 10 * torch.randn(8, 1, 8, 8)
    assert model.draw(8, steps=5, x_T=x_T).abs().max() > 1  # the clamp has work to do
    x = model.sample(8, steps=5, x_T=x_T)
    assert x.min() >= -1 and x.max() <= 1


def test_compile_option_compiles_the_networks_in_place():
    """``compile=True`` compiles each network once when the Trainer configures the model; the
    checkpoint keys stay those of the plain module."""
    unet = tiny_unet(image_size=8, channel_mult=(1,), num_res_blocks=2, attention_resolutions=())
    plain, compiled = DDPM(unet), DDPM(unet, compile=True)
    assert plain.networks() == [unet]  # the schedule holds no parameters
    plain.configure_model()
    assert getattr(unet, "_compiled_call_impl", None) is None
    keys = set(plain.state_dict())
    compiled.configure_model()
    impl = unet._compiled_call_impl
    assert impl is not None
    compiled.configure_model()  # called again on every fit/validate: compiles once
    assert unet._compiled_call_impl is impl and set(compiled.state_dict()) == keys


def test_dpm_solver_takes_logsnr_steps_unless_told():
    """On uniform t DPM-Solver++'s last step overshoots (worse than DDIM): ``dpmpp_2m`` gets
    log-SNR spacing by default, the other samplers the configured one; a given spacing wins."""
    model = make("eps", T=1000, timestep_spacing="uniform")
    seen = []

    def recorder(x_t, t, **_):
        seen.append(int(t[0]))
        return torch.zeros_like(x_t)

    def walked(sampler, **kw):
        seen.clear()
        model.draw(2, sampler, 10, eps_fn=recorder, **kw)
        return sorted(set(seen))

    logsnr = timestep_subsequence(1000, 10, "logsnr", model.schedule.alphas_cumprod).tolist()
    uniform = timestep_subsequence(1000, 10, "uniform").tolist()
    assert walked("dpmpp_2m") == logsnr != uniform
    assert walked("ddim") == uniform
    assert walked("dpmpp_2m", spacing="uniform") == uniform


# --- learned variance (Nichol & Dhariwal 2021) ---------------------------------------------------


class LearnedOracle(GaussianOracle):
    """[f, v]: the oracle's prediction and a constant v."""

    def __init__(self, schedule, prediction, v: float, size: int = 8):
        super().__init__(schedule, prediction, size)
        self.out_channels, self.v = 2, v

    def forward(self, x_t, t):
        out = super().forward(x_t, t)
        return torch.cat([out, torch.full_like(out, self.v)], dim=1)


def test_learned_variance_needs_a_unet_with_twice_the_channels():
    with pytest.raises(ValueError, match="out_channels = 2·in_channels = 2·1, got out_channels=1"):
        DDPM(tiny_unet(), variance="learned")
    assert DDPM(tiny_unet(out_channels=2), variance="learned").variance == "learned"


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_eps_is_the_first_half_and_model_output_carries_v(prediction):
    schedule = NoiseSchedule(num_timesteps=200)
    model = DDPM(LearnedOracle(schedule, prediction, 0.25), schedule, prediction=prediction,
                 variance="learned")  # fmt: skip
    x_t, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 50, 120, 199])
    expected = make("eps").eps(x_t, t)
    torch.testing.assert_close(model.eps(x_t, t), expected, rtol=1e-4, atol=1e-4)
    out = model.model_output(x_t, t)
    torch.testing.assert_close(out, torch.cat([model.eps(x_t, t), torch.full_like(x_t, 0.25)], 1))
    model.variance = "beta"  # a 2C network sampled with a fixed variance: ε only
    torch.testing.assert_close(model.model_output(x_t, t), model.eps(x_t, t))


@pytest.mark.parametrize(("v", "fixed"), [(1.0, "beta"), (-1.0, "beta_tilde")])
def test_learned_ancestral_sampling_at_a_bound_is_the_fixed_variance(v, fixed):
    """v ≡ ±1 is Σ = β or β̃ (no noise at the last step, where they differ): the same samples;
    DDIM reads ε only."""
    schedule = NoiseSchedule(num_timesteps=200)
    learned = DDPM(LearnedOracle(schedule, "eps", v), schedule, variance="learned")
    for sampler, variance in (("ddpm", fixed), ("ddim", "beta")):
        kw = dict(sampler=sampler, steps=20, x_T=torch.randn(16, 1, 8, 8))
        mine = learned.sample(16, generator=torch.Generator().manual_seed(0), **kw)
        other = make("eps", variance=variance).sample(
            16, generator=torch.Generator().manual_seed(0), **kw
        )
        torch.testing.assert_close(mine, other, rtol=1e-5, atol=1e-6)


def learned_unet(seed=0):
    return randomize_(tiny_unet(out_channels=2), 0.1, seed=seed)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_hybrid_loss_terms_equal_guided_diffusion(kind, prediction):
    """loss_terms = guided-diffusion's ``training_losses`` (``LEARNED_RANGE``, ``LossType.MSE``) at
    the same t, ε and network: ``mse`` and ``vb`` (bits/dim; the decoder NLL at t = 0), and
    L_hybrid = mse + λ·T·vb = their ``loss`` at λ = 0.001, T = 1000. The official code gets the
    betas of our float32 ᾱ, β_t = 1 − ᾱ_t/ᾱ_{t−1}: the same process."""
    gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")
    schedule = NoiseSchedule(kind, 1000)
    unet = learned_unet()
    ddpm = DDPM(unet, schedule, prediction=prediction, variance="learned")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (6, 1, 16, 16), generator=g) / 127.5 - 1  # 8-bit data
    t, noise = torch.tensor([0, 1, 2, 100, 500, 999]), torch.randn(x0.shape, generator=g)
    a = schedule.alphas_cumprod.double()
    mean_type = {"eps": gd.ModelMeanType.EPSILON, "x0": gd.ModelMeanType.START_X}[prediction]
    official = gd.GaussianDiffusion(
        betas=(1 - a / torch.cat([a.new_ones(1), a[:-1]])).numpy(), model_mean_type=mean_type,
        model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.MSE,
    )  # fmt: skip
    with torch.no_grad():
        theirs = official.training_losses(lambda x, t: unet(x, t), x0, t, noise=noise)
        mine = ddpm.loss_terms(x0, t, noise)
    torch.testing.assert_close(mine["simple"], theirs["mse"], rtol=1e-6, atol=0)
    # At t = 999 the KL of two nearly equal Gaussians is ~1e-7 bits/dim, a difference of O(1)
    # float32 terms: its rounding (~1e-9, CPU-dependent) is the floor, not a relative 1e-5.
    torch.testing.assert_close(mine["vb"], theirs["vb"], rtol=1e-5, atol=1e-8)
    hybrid = mine["simple"] + ddpm.vlb_weight * 1000 * mine["vb"]
    torch.testing.assert_close(hybrid, theirs["loss"], rtol=1e-5, atol=0)


def test_hybrid_loss_trains_v_through_the_vlb_only():
    """The mean is stop-gradient'ed in L_vlb: ∂vb/∂f = 0, ∂vb/∂v ≠ 0; ∂L_simple/∂v = 0. And
    diffusion_loss = mean(simple) + λ·T·mean(vb) at the drawn t and ε."""
    unet = learned_unet()
    outputs = []
    unet.register_forward_hook(lambda module, args, out: outputs.append(out.retain_grad() or out))
    ddpm = DDPM(unet, variance="learned", vlb_weight=0.003)
    x0 = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    t, noise = torch.tensor([0, 3, 300, 900]), torch.randn(x0.shape)
    terms = ddpm.loss_terms(x0, t, noise)
    terms["vb"].sum().backward(retain_graph=True)
    grad = outputs[0].grad
    assert grad[:, :1].abs().max() == 0 and grad[:, 1:].abs().min() > 0
    outputs[0].grad = None
    terms["simple"].sum().backward()
    assert outputs[0].grad[:, 1:].abs().max() == 0
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    t, noise, _ = ddpm.noised(x0, gen())
    expected = ddpm.loss_terms(x0, t, noise)
    loss = ddpm.diffusion_loss(x0, gen())
    assert loss.item() == pytest.approx(
        (expected["simple"].mean() + 0.003 * 1000 * expected["vb"].mean()).item(), rel=1e-6
    )
