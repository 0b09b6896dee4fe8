"""Consistency distillation against closed forms of Gaussian data N(μ, s²) per pixel: its ODE in
σ has the exact flow map x̄_σ' = μ + (x̄_σ − μ)·√((s² + σ'²)/(s² + σ²)), its exact ε̂ is
σ(x̄ − μ)/(s² + σ²), and the exact consistency function is the flow map to σ_min."""

import math

import pytest
import torch

from diffusion_apps.checkpoint import CheckpointError, load_module, read_checkpoint
from diffusion_apps.methods import DDPM, ConsistencyDistillation
from diffusion_apps.methods.consistency import karras_timesteps
from tests.conftest import CONFIGS, run_cli_in

MU, S = 0.2, 0.1  # the data: well inside [−1, 1], so clamping never bites
CKPT = "runs/tiny_consistency/version_0/checkpoints/last.ckpt"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The tiny DDPM, then its tiny consistency distillation, both through the CLI."""
    return run_cli_in(
        tmp_path_factory.mktemp("consistency"),
        ["fit", "--config", str(CONFIGS / "tiny" / "ddpm.yaml")],
        ["fit", "--config", str(CONFIGS / "tiny" / "consistency.yaml")],
    )


@pytest.fixture
def model(run_dir):
    """The distilled module rebuilt from its checkpoint alone (``weights_only=True``)."""
    return load_module(run_dir / CKPT, ConsistencyDistillation)


def exact_eps(model):
    """ε̂ of the data, on the module's DDPM schedule: σ(x̄ − μ)/(s² + σ²) at x̄ = x_t/√ᾱ_t."""

    def eps(x_t, t):
        sigma = model._sigma(t, x_t)
        x_bar = x_t * (1 + sigma**2).sqrt()
        return sigma * (x_bar - MU) / (S**2 + sigma**2)

    return eps


def flow(x_bar, sigma_from, sigma_to):
    return MU + (x_bar - MU) * ((S**2 + sigma_to**2) / (S**2 + sigma_from**2)) ** 0.5


def consistency_eps(model):
    """The ε̂ whose consistency function is the exact flow map to σ_min (c_out = 0 there)."""
    sd, s_min = model.sigma_data, model.sigma_min

    def eps(x_t, t):
        sigma = model._sigma(t, x_t)
        x_bar = x_t * (1 + sigma**2).sqrt()
        norm = (sigma**2 + sd**2).sqrt()
        c_skip = sd**2 / ((sigma - s_min) ** 2 + sd**2)
        c_out = (sd * (sigma - s_min) / norm).clamp(min=1e-12)
        raw = (flow(x_bar, sigma, s_min) - c_skip * x_bar) / c_out
        return (sigma * x_bar / norm - sd * raw) / norm

    return eps


def data(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return MU + S * torch.randn(n, 1, 16, 16, generator=gen)


def test_boundary_condition_and_the_teacher_initialisation(model):
    """f(x̄, σ_min) = x̄ for any network; with σ_min = 0 the parametrisation is EDM's, and f of
    the teacher's ε̂ is its x̂_0: for the exact ε̂, the posterior mean μ + s²/(s² + σ²)(x̄ − μ)."""
    x_bar = data() + torch.randn(64, 1, 16, 16)
    t0 = torch.full((64,), int(model.timesteps[0]))
    torch.testing.assert_close(model.consistency(model.student, x_bar, t0), x_bar)
    model.teacher.eps = exact_eps(model)
    model.sigma_min = 0.0
    for t in (10, 60, 99):
        sigma = float(model.sigmas[t])
        x_bar = data() + sigma * torch.randn(64, 1, 16, 16)
        got = model.consistency(model.teacher, x_bar, torch.full((64,), t))
        expected = MU + S**2 / (S**2 + sigma**2) * (x_bar - MU)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1, sigma))


def test_teacher_steps_follow_the_exact_flow(model):
    """The DDIM step is the ODE's Euler step in σ, first order; Heun's is second order: over one
    schedule step, where the flow bends most (σ ≈ s), it is 6-20x closer to the exact flow."""
    model.teacher.eps = exact_eps(model)
    for hi in (2, 5, 10, 20, 40):
        s_hi, s_lo = float(model.sigmas[hi]), float(model.sigmas[hi - 1])
        x_bar = data() + s_hi * torch.randn(64, 1, 16, 16)
        exact = flow(x_bar, s_hi, s_lo)
        errors = {}
        for solver in ("ddim", "heun"):
            model.teacher_solver = solver
            got = model.teacher_step(x_bar, torch.full((64,), hi), torch.full((64,), hi - 1))
            errors[solver] = float((got - exact).abs().max())
        assert errors["heun"] < errors["ddim"] / 5, (hi, errors)


def test_the_exact_consistency_function_has_zero_loss_and_samples_the_data(model):
    """With an exact ODE step, and the exact consistency function as student and target, the CD
    loss vanishes; with the posterior mean (the teacher-initialised student) it does not. The
    one- and two-step samples of the exact consistency function are the data at σ_min,
    N(μ, s² + σ_min²) (σ_min = 0.032 on the tiny T = 100 schedule)."""
    sigma = model.sigmas

    def exact_step(x_bar, t_from, t_to):
        return flow(x_bar, model._sigma(t_from, x_bar), model._sigma(t_to, x_bar))

    model.teacher_step = exact_step
    model.target.eps = model.student.eps = consistency_eps(model)
    exact = float(model.consistency_loss(data(256), torch.Generator().manual_seed(0)))
    model.target.eps = model.student.eps = exact_eps(model)
    initial = float(model.consistency_loss(data(256), torch.Generator().manual_seed(0)))
    assert exact < 1e-3 * initial and initial > 0.1, (exact, initial)
    assert float(sigma[model.timesteps[0]]) == pytest.approx(model.sigma_min)

    model.student.eps = consistency_eps(model)
    for steps in (1, 2):
        x = model.sample(512, steps=steps, generator=torch.Generator().manual_seed(steps))
        n = x.numel()  # 131,072 values: s.e. of the mean 3e-4, of the variance 4e-5
        assert x.mean().item() == pytest.approx(MU, abs=5 * S / math.sqrt(n))
        assert x.var().item() == pytest.approx(S**2 + model.sigma_min**2, rel=0.02)


def test_target_network_is_an_ema_of_the_student(model):
    """θ⁻ ← μ θ⁻ + (1 − μ) θ after an optimiser step; the frozen teacher does not move."""
    student, target = model.student.unet.out_conv.weight, model.target.unet.out_conv.weight
    with torch.no_grad():
        student.fill_(1.0)
        target.fill_(0.0)
    teacher_before = model.teacher.unet.out_conv.weight.clone()
    model.update_target()
    torch.testing.assert_close(target, torch.full_like(target, 1 - model.target_decay))
    assert torch.equal(model.teacher.unet.out_conv.weight, teacher_before)


def test_training_keeps_the_teacher_and_logs(run_dir, model):
    """The teacher inside the distilled checkpoint is the DDPM checkpoint's, bit for bit; the
    student and the target moved away from it; the run logged its loss and 1- and 2-step
    sample grids."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ddpm = load_module(run_dir / "runs/tiny_ddpm/version_0/checkpoints/last.ckpt", DDPM)
    for a, b in zip(ddpm.state_dict().values(), model.teacher.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    pairs = zip(model.student.parameters(), ddpm.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    raw = read_checkpoint(run_dir / CKPT)["current_model_state"]  # θ⁻ followed θ at each step
    moved = [k for k in raw if k.startswith("target.") and raw[k].is_floating_point()]
    assert any(not torch.equal(raw[k], raw["teacher." + k[7:]]) for k in moved)
    events = EventAccumulator(str(run_dir / "runs/tiny_consistency/version_0"))
    events.Reload()
    assert {"train/loss", "val/loss"} <= set(events.Tags()["scalars"])
    assert {"samples (1 step)", "samples (2 step)"} <= set(events.Tags()["images"])


def test_sampling_points_and_arguments(model):
    ts = model.timesteps.tolist()  # the tiny config's 6 scales, T = 100
    assert ts[0] == 0 and ts[-1] == 99 and len(ts) == 6
    assert model.sampling_points(1).tolist() == [99]
    assert model.sampling_points(2).tolist() == [99, ts[3]]  # n = 6 − ⌊5/2⌋ (1-based)
    assert model.sampling_points(5).tolist() == ts[:0:-1]  # every point above σ_min
    assert model.sampling_points(3).tolist() == [99, ts[4], ts[2]]
    assert model.nfe("consistency", 4) == 4
    with pytest.raises(ValueError, match=r"steps must be in \[1, 5\]"):
        model.sample(2, steps=6)
    with pytest.raises(ValueError, match="'consistency', not 'ddim'"):
        model.sample(2, sampler="ddim")
    x = model.sample(3, steps=2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 16, 16) and x.abs().max() <= 1


def test_max_timestep_caps_the_discretisation(run_dir):
    teacher = str(run_dir / "runs/tiny_ddpm/version_0/checkpoints/last.ckpt")
    capped = ConsistencyDistillation(teacher, num_scales=6, max_timestep=50)
    assert capped.timesteps[0] == 0 and capped.timesteps[-1] == 50
    assert capped.sampling_points(1).tolist() == [50]
    with pytest.raises(ValueError, match=r"max_timestep must be in \[1, 99\]"):
        ConsistencyDistillation(teacher, max_timestep=100)


def test_karras_discretisation_of_the_ddpm_schedule():
    """Indices whose σ^{1/7} are evenly spaced from σ_0 to σ_{T−1} (up to rounding to an index)."""
    from diffusion_apps.diffusion import NoiseSchedule

    schedule = NoiseSchedule("linear", 1000)
    alpha_bar = schedule.alphas_cumprod
    ts = karras_timesteps(schedule.snr(torch.arange(1000)).rsqrt(), 18)
    assert ts[0] == 0 and ts[-1] == 999 and (ts.diff() > 0).all() and len(ts) == 18
    root = (((1 - alpha_bar) / alpha_bar) ** (1 / 14))[ts].double()  # σ^{1/7}
    even = torch.full((17,), float(root[-1] - root[0]) / 17, dtype=torch.float64)
    torch.testing.assert_close(root.diff(), even, rtol=0.05, atol=0)
    with pytest.raises(ValueError, match="num_scales"):
        karras_timesteps(torch.ones(3), 1)


def test_a_missing_teacher_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere.ckpt"):
        ConsistencyDistillation(str(tmp_path / "nowhere.ckpt"))
