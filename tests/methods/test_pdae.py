"""PDAE: c_t and λ_t against closed forms, the frozen DDPM, G_ψ ≡ 0 as plain DDIM, the shared
down pass, trajectory interpolation, the latent stage, and the configs."""

import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_apps.checkpoint import load_module
from diffusion_apps.diffusion import NoiseSchedule, ddim_invert, ddim_sample, slerp
from diffusion_apps.methods import DDPM, PDAE, LatentDDIM
from diffusion_apps.methods.pdae import loss_weight, shift_coefficient
from tests.conftest import CONFIGS, run_cli_in
from tests.factories import randomize_, tiny_encoder
from tests.methods.ddpm_arguments import assert_ddpm_arguments, keyword_only_ddpm

DDPM_CKPT = "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"
PDAE_CKPT = "runs/tiny_pdae/version_0/checkpoints/last.ckpt"
LATENT_CKPT = "runs/tiny_pdae_latent/version_0/checkpoints/last.ckpt"
QUIET = ["--trainer.enable_progress_bar", "false"]
STEPS_30 = ["--trainer.max_steps", "30", "--trainer.val_check_interval", "30"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny DDPM, a tiny PDAE on it (30 steps), and the PDAE's latent DDIM, via the CLI."""
    tiny = CONFIGS / "tiny"
    return run_cli_in(
        tmp_path_factory.mktemp("pdae"),
        ["fit", "--config", str(tiny / "ddpm.yaml"), *QUIET],
        ["fit", "--config", str(tiny / "pdae.yaml"), *STEPS_30, *QUIET],
        ["fit", "--config", str(tiny / "pdae_latent.yaml"), *QUIET],
    )


@pytest.fixture
def fresh(run_dir):
    """An untrained PDAE on the tiny DDPM: G_ψ ≡ 0 (zero-initialised output)."""
    torch.manual_seed(0)
    return PDAE(tiny_encoder(), str(run_dir / DDPM_CKPT), sample_steps=4, encode_steps=4).eval()


def randomized_estimator(model):
    randomize_(model.estimator, 0.05, seed=1)
    return model


def digits(n):
    torch.manual_seed(2)
    return torch.rand(n, 1, 16, 16) * 2 - 1


class ConstantG(torch.nn.Module):
    """G_ψ(x_t, z, t) = g, one fixed (C, H, W) tensor whatever its inputs."""

    def __init__(self, g):
        super().__init__()
        self.g = g

    def forward(self, features, z):
        return self.g.expand(len(z), *self.g.shape)


class QuadraticG(torch.nn.Module):
    """G_ψ(x_t, z, t) = g·‖z − c‖²: the mean of two codes' G is not the G of their mean."""

    def __init__(self, g, c):
        super().__init__()
        self.g, self.c = g, c

    def forward(self, features, z):
        return (z - self.c).square().sum(1).view(-1, 1, 1, 1) * self.g


@pytest.fixture(params=["constant", "random"])
def shifted(request, fresh):
    """A PDAE with a non-zero G_ψ: a constant g of both signs, or a small random head."""
    if request.param == "random":
        return randomized_estimator(fresh)
    g = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(4)) * 0.5
    fresh.estimator = ConstantG(g)
    return fresh


def alpha_bars(schedule):
    """(ᾱ_t, ᾱ_{t−1}) for every t, ᾱ_t = Π_{s≤t} (1 − β_s) in float64, ᾱ_{−1} = 1."""
    abar = torch.cumprod(1 - schedule.betas.double(), 0)
    return abar, torch.cat([abar.new_ones(1), abar[:-1]])


def written_out_eps(model, ddpm, codes, weights):
    """ε'(x_t, t) = ε_θ(x_t, t) − √(1 − ᾱ_t)·Σ_k w_k G_ψ(x_t, z_k, t), ε_θ the DDPM's own."""
    abar, _ = alpha_bars(model.schedule)

    def eps(x_t, t):
        f = model.unet.down_features(x_t, t)
        g = sum(w * model.estimator(f, z) for z, w in zip(codes, weights, strict=True))
        return ddpm.eps(x_t, t) - (1 - abar[t]).sqrt().float().view(-1, 1, 1, 1) * g

    return eps


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_shift_coefficient_moves_the_posterior_mean_by_beta_tilde(kind):
    """μ(ε) = (x_t − β_t/√(1−ᾱ_t)·ε)/√α_t, so ε + c_t·G moves μ by −β_t c_t/(√α_t √(1−ᾱ_t))·G,
    (float32 tables: 1e-3 relative)
    which must be β̃_t·G = β_t (1−ᾱ_{t−1})/(1−ᾱ_t)·G; at t = 0 (ᾱ_{−1} = 1) c_0 = 0."""
    s = NoiseSchedule(kind, 1000)
    t = torch.arange(1000)
    betas = s.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    c = shift_coefficient(s, t).double()
    moved = -betas * c / ((1 - betas).sqrt() * (1 - abar).sqrt())
    torch.testing.assert_close(moved, betas * (1 - abar_prev) / (1 - abar), rtol=1e-3, atol=0)
    assert c[0] == 0 and (c[1:] < 0).all()


@pytest.mark.parametrize("gamma", [0.1, 0.5])
def test_loss_weight_is_snr_to_the_gamma_over_one_plus_snr(gamma):
    """SNR^γ/(1 + SNR) with SNR = ᾱ/(1−ᾱ) equals ᾱ^γ (1−ᾱ)^{1−γ}."""
    s = NoiseSchedule("linear", 1000)
    t = torch.tensor([0, 10, 500, 999])
    abar = torch.cumprod(1 - s.betas.double(), 0)[t]
    expected = abar**gamma * (1 - abar) ** (1 - gamma)
    torch.testing.assert_close(loss_weight(s, t, gamma).double(), expected, rtol=1e-3, atol=0)


def test_with_a_zero_estimator_pdae_is_the_plain_ddim_sampler(fresh, run_dir):
    ddpm = load_module(run_dir / DDPM_CKPT, DDPM)
    x0, ts = digits(3), fresh.timesteps(4)
    z = fresh.encode(x0)
    x_T = fresh.encode_stochastic(x0, z)
    assert torch.equal(x_T, ddim_invert(ddpm.eps, ddpm.schedule, x0, timesteps=ts))
    plain = ddim_sample(ddpm.eps, ddpm.schedule, x_T, timesteps=ts).clamp(-1, 1)
    assert torch.equal(fresh.decode(z, x_T), plain)


def test_the_loss_with_a_zero_estimator_is_the_weighted_ddpm_error(fresh):
    """With G_ψ ≡ 0: E_t[λ_t ‖ε − ε_θ(x_t, t)‖²], recomputed from the same draws."""
    x0 = digits(6)
    loss = fresh.diffusion_loss(x0, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(0, fresh.schedule.num_timesteps, (6,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        eps = fresh.unet(fresh.schedule.q_sample(x0, t, noise), t)
    abar = fresh.schedule.alphas_cumprod[t]
    weight = abar**0.1 * (1 - abar) ** 0.9
    expected = (weight * (noise - eps).square().mean((1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected)


def test_the_sampling_eps_is_the_ddpm_eps_shifted_by_g(shifted, run_dir):
    """ε'(x_t, t, z) = ε_θ(x_t, t) − √(1 − ᾱ_t)·G_ψ(x_t, z, t), the shift of PDAE's sampler."""
    ddpm = load_module(run_dir / DDPM_CKPT, DDPM)
    x_t, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 40, 99])
    z = shifted.encode(digits(3))
    with torch.no_grad():
        expected = written_out_eps(shifted, ddpm, [z], [1.0])(x_t, t)
        torch.testing.assert_close(shifted.code_eps()(x_t, t, z=z), expected)
        assert (expected - ddpm.eps(x_t, t)).abs().mean() > 1e-3  # G moves it


@pytest.mark.parametrize("fraction, unshifted_steps", [(0.3, 2), (0.5, 4), (0.0, 0)])
def test_latent_decoding_drops_the_shift_in_the_last_steps(
    shifted, run_dir, fraction, unshifted_steps
):
    """PDAE.decode(p) is DDIM written out over S = 10 steps i = S, …, 1 with ε' while
    i ≥ ⌊p·S⌋ and ε_θ alone after (the official ``stop_percent``): ⌊p·S⌋ − 1 steps unshifted."""
    ddpm = load_module(run_dir / DDPM_CKPT, DDPM)
    abar, _ = alpha_bars(shifted.schedule)
    ts = shifted.timesteps(10).tolist()
    z, x_T = shifted.encode(digits(2)), torch.randn(2, 1, 16, 16)
    x = x_T
    with torch.no_grad():
        decoded = shifted.decode(z, x_T, 10, unshifted_fraction=fraction)
        guided = written_out_eps(shifted, ddpm, [z], [1.0])
        for i, t in zip(range(10, 0, -1), reversed(ts), strict=True):
            tt = torch.full((2,), t)
            eps = guided(x, tt) if i >= int(fraction * 10) else ddpm.eps(x, tt)
            x0 = (x - (1 - abar[t]).sqrt().float() * eps) / abar[t].sqrt().float()
            prev = abar[ts[ts.index(t) - 1]].float() if t != ts[0] else torch.tensor(1.0)
            x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    assert sum(i < int(fraction * 10) for i in range(1, 11)) == unshifted_steps
    torch.testing.assert_close(decoded, x.clamp(-1, 1), atol=1e-5, rtol=1e-4)
    if unshifted_steps:  # G moves the last steps too: the switch changes the decoding
        assert (decoded - shifted.decode(z, x_T, 10)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="unshifted_fraction must be in"):
        shifted.decode(z, x_T, 10, unshifted_fraction=1.0)


def test_the_loss_with_a_nonzero_estimator_is_pdaes_weighted_error(shifted):
    """λ_t ‖ε − ε_θ(x_t, t) − c_t·G_ψ(x_t, z, t)‖², c_t = −√α_t (1 − ᾱ_{t−1})/√(1 − ᾱ_t) and
    λ_t = ᾱ_t^γ (1 − ᾱ_t)^{1−γ}, written out from the betas and the same draws."""
    x0 = digits(6)
    loss = shifted.diffusion_loss(x0, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(0, shifted.schedule.num_timesteps, (6,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    abar, abar_prev = (a[t] for a in alpha_bars(shifted.schedule))
    c = -(abar / abar_prev).sqrt() * (1 - abar_prev) / (1 - abar).sqrt()
    with torch.no_grad():
        x_t = shifted.schedule.q_sample(x0, t, noise)
        eps = shifted.unet(x_t, t)
        g = shifted.estimator(shifted.unet.down_features(x_t, t), shifted.encoder(x0))
    error = noise - eps - c.float().view(-1, 1, 1, 1) * g
    weight = (abar**0.1 * (1 - abar) ** 0.9).float()
    torch.testing.assert_close(loss, (weight * error.square().mean((1, 2, 3))).mean())


@pytest.fixture(scope="module")
def v_ddpm_ckpt(run_dir, tmp_path_factory):
    """The tiny DDPM's checkpoint with its config saying ``prediction: v``: the same weights,
    whose output now reads as v̂."""
    ckpt = torch.load(run_dir / DDPM_CKPT, weights_only=True)
    ckpt["hyper_parameters"]["prediction"] = "v"
    path = tmp_path_factory.mktemp("v_ddpm") / "v.ckpt"
    torch.save(ckpt, path)
    return path


def test_on_a_v_predicting_ddpm_pdae_shifts_its_eps(v_ddpm_ckpt):
    """With a DDPM that outputs v̂, ε_θ = √ᾱ_t·v̂ + √(1 − ᾱ_t)·x_t (from x_t = √ᾱ x0 + √(1−ᾱ) ε
    and v = √ᾱ ε − √(1−ᾱ) x0), in the loss and in the sampling ε', not the raw output."""
    torch.manual_seed(0)
    model = PDAE(tiny_encoder(), str(v_ddpm_ckpt), sample_steps=4, encode_steps=4).eval()
    model = randomized_estimator(model)
    assert model.prediction == "v"
    x0 = digits(6)
    loss = model.diffusion_loss(x0, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(0, model.schedule.num_timesteps, (6,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    abar, abar_prev = (a[t].view(-1, 1, 1, 1) for a in alpha_bars(model.schedule))
    c = -(abar / abar_prev).sqrt() * (1 - abar_prev) / (1 - abar).sqrt()
    with torch.no_grad():
        x_t = model.schedule.q_sample(x0, t, noise)
        eps = (abar.sqrt() * model.unet(x_t, t) + (1 - abar).sqrt() * x_t).float()
        z = model.encoder(x0)
        g = model.estimator(model.unet.down_features(x_t, t), z)
        shifted = model.code_eps()(x_t, t, z=z)
    error = noise - eps - c.float() * g
    weight = (abar**0.1 * (1 - abar) ** 0.9).float().flatten()
    torch.testing.assert_close(loss, (weight * error.square().mean((1, 2, 3))).mean())
    torch.testing.assert_close(shifted, eps - (1 - abar).sqrt().float() * g)


def test_trajectory_interpolation_mixes_g_not_the_codes(run_dir, fresh):
    """The middle frame (w = 1/2) is DDIM from slerp(x_T^a, x_T^b, w) on ε_θ − √(1 − ᾱ_t)·
    ((1 − w) G_ψ(·, z_a) + w G_ψ(·, z_b)), each x_T the inversion over the ``steps`` (6)
    subsequence it is decoded on; not the decoding of the lerp of z_a and z_b (G quadratic in z,
    0 at z_a: the mean of the two G is g/2, the G of the mean code g/4)."""
    model, ddpm = fresh, load_module(run_dir / DDPM_CKPT, DDPM)
    x_a, x_b = digits(4).chunk(2)
    z_a, z_b = model.encode(x_a), model.encode(x_b)
    g = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(4))
    model.estimator = QuadraticG(g / (z_b - z_a).square().sum(1).view(-1, 1, 1, 1), z_a)
    ts = model.timesteps(6)
    with torch.no_grad():
        x_T = [
            ddim_invert(written_out_eps(model, ddpm, [z], [1.0]), ddpm.schedule, x, timesteps=ts)
            for x, z in ((x_a, z_a), (x_b, z_b))
        ]
        x_T = slerp(*x_T, 0.5)
        mixed = written_out_eps(model, ddpm, [z_a, z_b], [0.5, 0.5])
        expected = ddim_sample(mixed, ddpm.schedule, x_T, timesteps=ts).clamp(-1, 1)
        lerped = model.decode(torch.lerp(z_a, z_b, 0.5), x_T, steps=6)
    frames = model.interpolate_trajectory(x_a, x_b, num=3, steps=6)
    torch.testing.assert_close(frames[:, 1], expected, atol=1e-5, rtol=0)
    assert (frames[:, 1] - lerped).abs().max() > 1e-3


def test_the_ddpm_gets_no_gradient(fresh):
    fresh.train()
    assert not fresh.unet.training and fresh.encoder.training
    fresh.diffusion_loss(digits(4)).backward()
    assert all(p.grad is None and not p.requires_grad for p in fresh.unet.parameters())
    assert fresh.estimator.out_conv.weight.grad.abs().sum() > 0


def test_training_leaves_the_ddpm_bit_identical(run_dir):
    pdae = load_module(run_dir / PDAE_CKPT, PDAE)
    ddpm = load_module(run_dir / DDPM_CKPT, DDPM)
    frozen, original = pdae.unet.state_dict(), ddpm.unet.state_dict()
    assert frozen.keys() == original.keys()
    assert all(torch.equal(frozen[k], original[k]) for k in original)
    assert pdae.estimator.out_conv.weight.abs().sum() > 0  # while G_ψ did train


def test_tensorboard_shows_reconstructions_and_both_interpolations(run_dir):
    events = EventAccumulator(str(run_dir / "runs/tiny_pdae/version_0"), {"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    for prefix in ("reconstructions", "interpolations", "trajectory interpolations"):
        assert any(tag.startswith(prefix) for tag in tags), (prefix, tags)


def test_eps_and_shift_share_one_down_pass_per_step(fresh):
    model = randomized_estimator(fresh)
    calls = []
    hook = model.unet.down.conv_in.register_forward_hook(lambda *_: calls.append(1))
    try:
        x0 = digits(2)
        model.decode(model.encode(x0), torch.randn_like(x0), steps=4)
    finally:
        hook.remove()
    assert len(calls) == 4


def test_trajectory_interpolation_ends_at_each_reconstruction(fresh):
    model = randomized_estimator(fresh)
    x_a, x_b = digits(4).chunk(2)
    frames = model.interpolate_trajectory(x_a, x_b, num=3)
    assert frames.shape == (2, 3, 1, 16, 16)
    torch.testing.assert_close(frames[:, 0], model.reconstruct(x_a))
    torch.testing.assert_close(frames[:, -1], model.reconstruct(x_b))
    assert not torch.allclose(frames[:, 1], frames[:, 0])


def test_ddpm_arguments_are_forwarded_by_keyword(run_dir):
    """The DDPM's schedule and spacing, PDAE's own sampling and optimiser options."""
    kw = dict(sample_steps=9, clip_x0=True, num_val_samples=3, lr=3e-4, weight_decay=0.02,
              warmup_steps=7, adam_betas=(0.8, 0.9), compile=True)  # fmt: skip
    with keyword_only_ddpm():
        model = PDAE(tiny_encoder(), str(run_dir / DDPM_CKPT), **kw)
    ddpm = load_module(run_dir / DDPM_CKPT, DDPM)
    fixed = dict(prediction="eps", sampler="ddim", eta=0.0, variance="beta", loss="mse")
    assert_ddpm_arguments(model, **kw, **fixed, timestep_spacing=ddpm.timestep_spacing)
    assert torch.equal(model.schedule.alphas_cumprod, ddpm.schedule.alphas_cumprod)


def test_bad_parts_are_named(run_dir):
    ddpm = str(run_dir / DDPM_CKPT)
    timed = tiny_encoder(time_conditioned=True)
    with pytest.raises(ValueError, match="time_conditioned=False"):
        PDAE(timed, ddpm)
    with pytest.raises(ValueError, match="not an unconditional UNet"):
        PDAE(tiny_encoder(), str(run_dir / LATENT_CKPT))  # a LatentDDIM: an MLP on codes
    with pytest.raises(ValueError, match="z of shape"):
        PDAE(tiny_encoder(), ddpm).decode(torch.zeros(2, 8), torch.zeros(2, 1, 16, 16))


def test_the_latent_stage_is_diffaes_and_its_checkpoint_stands_alone(run_dir, tmp_path):
    """LatentDDIM samples PDAE codes; its checkpoint rebuilds the PDAE and that PDAE's DDPM
    from the configs saved inside it, with neither file present."""
    moved = tmp_path / "moved"
    for ckpt in (DDPM_CKPT, PDAE_CKPT):
        (moved / ckpt).parent.mkdir(parents=True)
        shutil.move(run_dir / ckpt, moved / ckpt)
    try:
        latent = load_module(run_dir / LATENT_CKPT, LatentDDIM)
    finally:
        for ckpt in (DDPM_CKPT, PDAE_CKPT):
            shutil.move(moved / ckpt, run_dir / ckpt)
    assert isinstance(latent.autoencoder, PDAE)
    original = load_module(run_dir / PDAE_CKPT, PDAE)
    for name, value in original.state_dict().items():
        assert torch.equal(latent.autoencoder.state_dict()[name], value), name
    images = latent.sample(3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 16, 16) and images.abs().max() <= 1


def test_the_full_configs_run(in_tmp):
    """configs/pdae.yaml and configs/pdae_latent.yaml, one step each, on a one-step DDPM of
    configs/ddpm.yaml (the real sizes)."""
    one_step = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
    ddpm = "runs/ddpm/version_0/checkpoints/last.ckpt"
    pdae = "runs/pdae/version_0/checkpoints/last.ckpt"
    run_cli_in(
        in_tmp,
        ["fit", "--config", str(CONFIGS / "ddpm.yaml"), *one_step],
        ["fit", "--config", str(CONFIGS / "pdae.yaml"), "--model.init_args.ddpm", ddpm, *one_step],
        ["fit", "--config", str(CONFIGS / "pdae_latent.yaml"), "--trainer.fast_dev_run", "true",
         "--model.init_args.autoencoder", pdae, "--model.init_args.stats_batches", "2"],
    )  # fmt: skip
    assert (in_tmp / pdae).is_file()


def test_clipped_decoding_clamps_before_the_shift(run_dir):
    """With clip_x0, decoding clamps ε_θ's x̂_0 and then shifts by −√(1−ᾱ_t)·G without clamping
    again (guided-diffusion's order for a guidance shift), here written out step by step; the
    other order (shift, then clamp) gives other images."""
    torch.manual_seed(0)
    model = PDAE(tiny_encoder(), str(run_dir / DDPM_CKPT), sample_steps=4, clip_x0=True).eval()
    model = randomized_estimator(model)
    x0 = digits(2)
    z, x_T = model.encode(x0), 3 * torch.randn(2, 1, 16, 16)
    a = model.schedule.alphas_cumprod.double().tolist()
    ts = model.timesteps(4).tolist()

    def loop(clamp_first: bool):
        x = x_T
        for i in reversed(range(len(ts))):
            a_t, a_prev = a[ts[i]], (a[ts[i - 1]] if i else 1.0)
            sigma, t = (1 - a_t) ** 0.5, torch.full((2,), ts[i])
            with torch.no_grad():
                features = model.unet.down_features(x, t)
                eps, g = model.unet.up_from(features), model.estimator(features, z)
            if clamp_first:
                x0_hat = ((x - sigma * eps) / a_t**0.5).clamp(-1, 1)
                eps = (x - a_t**0.5 * x0_hat) / sigma - sigma * g
                x0_hat = (x - sigma * eps) / a_t**0.5
            else:
                x0_hat = ((x - sigma * (eps - sigma * g)) / a_t**0.5).clamp(-1, 1)
                eps = (x - a_t**0.5 * x0_hat) / sigma
            x = a_prev**0.5 * x0_hat + (1 - a_prev) ** 0.5 * eps
        return x.clamp(-1, 1)

    ours, official = model.decode(z, x_T), loop(clamp_first=True)
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-4)
    assert (loop(clamp_first=False) - official).abs().max() > 1e-2
