"""Classifier guidance: the noisy classifier's training setup, and guided sampling of a frozen
DDPM (Algorithm 2's ε shift checked against autograd; the exact two-Gaussian check of both
algorithms is in tests/diffusion/test_diffusion_guidance.py)."""

import shutil

import pytest
import torch

from diffusion_apps.checkpoint import load_module
from diffusion_apps.cli import main
from diffusion_apps.methods import DDPM, ClassifierGuidedDDPM, NoisyClassifier
from diffusion_apps.methods.guided import NOISE_LEVELS, noise_level_range
from tests.conftest import CONFIGS, run_cli_in
from tests.factories import tiny_encoder, tiny_unet

DDPM_CKPT = "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"
CLASSIFIER_CKPT = "runs/tiny_guided_classifier/version_0/checkpoints/last.ckpt"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny DDPM, then a tiny noisy classifier for it, both through the CLI."""
    return run_cli_in(
        tmp_path_factory.mktemp("guided"),
        ["fit", "--config", str(CONFIGS / "tiny" / "ddpm.yaml")],
        ["fit", "--config", str(CONFIGS / "tiny" / "guided_classifier.yaml")],
    )


@pytest.fixture
def guided(run_dir):
    ddpm = load_module(run_dir / DDPM_CKPT, DDPM)
    return ClassifierGuidedDDPM(ddpm, load_module(run_dir / CLASSIFIER_CKPT, NoisyClassifier))


def test_the_schedule_comes_from_the_ddpm_checkpoint(guided):
    assert guided.classifier.schedule.num_timesteps == 100  # the tiny DDPM's T, not the default
    assert torch.equal(
        guided.classifier.schedule.alphas_cumprod, guided.ddpm.schedule.alphas_cumprod
    )


def test_validation_logs_accuracy_per_noise_level(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "runs/tiny_guided_classifier/version_0"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/loss", "val/acc_low", "val/acc_mid", "val/acc_high", "train/acc"} <= tags
    for level in ("low", "mid", "high"):
        assert all(0 <= e.value <= 1 for e in events.Scalars(f"val/acc_{level}"))


@pytest.mark.parametrize("T", [100, 1000, 1001])
def test_the_noise_levels_split_the_timesteps_into_thirds(T):
    ranges = [noise_level_range(level, T) for level in NOISE_LEVELS]
    assert ranges[0][0] == 0 and ranges[-1][1] == T
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous
    assert all(abs((hi - lo) - T / 3) < 1 for lo, hi in ranges)


def test_the_classifier_checkpoint_stands_alone(run_dir, tmp_path, monkeypatch):
    moved = tmp_path / "classifier.ckpt"
    shutil.copy(run_dir / CLASSIFIER_CKPT, moved)
    monkeypatch.chdir(tmp_path)  # where the DDPM checkpoint it names does not exist
    classifier = load_module(moved, NoisyClassifier)
    assert classifier.schedule.num_timesteps == 100


def test_guided_sampling_leaves_the_ddpm_untouched(guided):
    before = {k: v.clone() for k, v in guided.ddpm.state_dict().items()}
    labels = torch.tensor([3, 8])
    for sampler in ("ddpm", "ddim"):
        gen = torch.Generator().manual_seed(0)
        x = guided.sample(2, labels=labels, scale=10.0, sampler=sampler, steps=5, generator=gen)
        assert x.shape == (2, 1, 16, 16) and x.abs().max() <= 1
    after = guided.ddpm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in guided.ddpm.parameters())
    assert all(p.grad is None for p in guided.classifier.parameters())


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_scale_zero_is_the_unguided_ddpm(guided, sampler):
    labels = torch.tensor([0, 1, 2])
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    unguided = guided.ddpm.sample(3, sampler=sampler, steps=5, generator=gen())
    assert torch.equal(
        guided.sample(3, labels=labels, scale=0.0, sampler=sampler, steps=5, generator=gen()),
        unguided,
    )
    assert not torch.equal(
        guided.sample(3, labels=labels, scale=5.0, sampler=sampler, steps=5, generator=gen()),
        unguided,
    )


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_ode_sampler_guidance_is_algorithm_2(guided, sampler):
    """ε' = ε̃ − s √(1 − ᾱ_t) ∇ log softmax(f_φ(x_t, t))_y, the gradient taken here by hand, and
    ε̃ = (x_t − √ᾱ_t clamp(x̂_0))/√(1 − ᾱ_t) the DDPM's ε with its x̂_0 clamped (clip_x0)."""
    x = 3 * torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t, y, s = torch.tensor([40, 90]), torch.tensor([1, 7]), 3.0
    eps_fn = guided.guided_eps(s, sampler, guided.ddpm.timesteps(5))
    x_req = x.clone().requires_grad_()
    log_p = guided.classifier(x_req, t).log_softmax(-1)[torch.arange(2), y].sum()
    (g,) = torch.autograd.grad(log_p, x_req)
    alpha_bar = guided.ddpm.schedule.alpha_bar(t).view(2, 1, 1, 1)
    signal, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    with torch.no_grad():
        x0 = ((x - sigma * guided.ddpm.eps(x, t)) / signal).clamp(-1, 1)
        assert (x0.abs() == 1).float().mean() > 0.1  # the clamp is at work
        expected = (x - signal * x0) / sigma - s * sigma * g
        torch.testing.assert_close(eps_fn(x, t, y=y), expected, atol=1e-5, rtol=1e-5)


def test_respaced_sampling_shows_the_classifier_original_timesteps(guided):
    seen = []
    hook = guided.classifier.classifier.register_forward_pre_hook(
        lambda _, args: seen.append(args[1].unique())
    )
    try:
        guided.sample(
            1, labels=[4], scale=1.0, sampler="ddpm", steps=5, generator=torch.Generator()
        )
    finally:
        hook.remove()
    assert sorted(torch.cat(seen).tolist()) == guided.ddpm.timesteps(5).tolist()


def test_moving_the_guided_model_moves_where_its_parts_sample(guided):
    """The DDPM draws x_T on its ``device``; a plain nn.Module wrapper left that on the CPU
    after ``.to("cuda")`` (found on an H100). The meta device shows the same without a GPU."""
    guided.to("meta")
    assert guided.ddpm.device.type == guided.classifier.device.type == "meta"
    assert guided.ddpm.unet.out_conv.weight.device.type == "meta"


def test_bad_input_is_named(guided, run_dir, tmp_path):
    with pytest.raises(ValueError, match=r"classes in \[0, 10\)"):
        guided.sample(1, labels=[10])
    unet = tiny_encoder(out_dim=10, num_res_blocks=2, attention_resolutions=(16,))
    with pytest.raises(ValueError, match="time_conditioned=True"):
        NoisyClassifier(unet, str(run_dir / DDPM_CKPT))
    other = load_module(run_dir / CLASSIFIER_CKPT, NoisyClassifier)
    other.schedule.alphas_cumprod.mul_(0.5)
    with pytest.raises(ValueError, match="another noise schedule"):
        ClassifierGuidedDDPM(guided.ddpm, other)
    three = DDPM(tiny_unet(num_classes=3), guided.ddpm.schedule)  # class-conditional, 3 classes
    with pytest.raises(ValueError, match="classifier tells 10 classes.*DDPM takes 3"):
        ClassifierGuidedDDPM(three, guided.classifier)
    ckpt, out = str(run_dir / DDPM_CKPT), ["--out_dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="--labels needs --classifier_path"):
        main(["sample", "--ckpt_path", ckpt, "--labels", "[3]", *out])
    guided_by = ["sample", "--ckpt_path", ckpt, "--classifier_path"]
    with pytest.raises(SystemExit, match=r"^error: .*classes in \[0, 10\)"):
        main([*guided_by, str(run_dir / CLASSIFIER_CKPT), "--labels", "[3, 12]", *out])
    with pytest.raises(SystemExit, match="^error: checkpoint not found: .*absent.ckpt"):
        main([*guided_by, str(tmp_path / "absent.ckpt"), *out])
    with pytest.raises(
        SystemExit, match="^error: .*holds a DDPM checkpoint, but a NoisyClassifier"
    ):
        main([*guided_by, ckpt, *out])
    assert not list(tmp_path.glob("*.png"))


def test_sample_command_draws_guided_digits(run_dir, tmp_path):
    ckpt, classifier = str(run_dir / DDPM_CKPT), str(run_dir / CLASSIFIER_CKPT)
    args = ["--num_samples", "3", "--labels", "[3, 8]", "--scale", "2", "--steps", "3"]
    main(["sample", "--ckpt_path", ckpt, "--classifier_path", classifier, *args,
          "--out_dir", str(tmp_path)])  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "000000.png", "000001.png", "000002.png", "grid.png",
    ]  # fmt: skip


def test_spacing_reaches_the_guided_sampler(guided):
    """``spacing`` sets the timesteps of the sampler and of the guidance, like the DDPM's
    ``timestep_spacing``; DPM-Solver++ takes ``logsnr`` unless told otherwise."""
    labels = torch.tensor([2, 7])

    def draw(sampler, **kw):
        gen = torch.Generator().manual_seed(3)
        return guided.sample(
            2, labels=labels, scale=2.0, sampler=sampler, steps=4, generator=gen, **kw
        )

    assert torch.equal(draw("dpmpp_2m"), draw("dpmpp_2m", spacing="logsnr"))
    assert not torch.allclose(draw("dpmpp_2m"), draw("dpmpp_2m", spacing="uniform"))
    quad, uniform = draw("ddpm", spacing="quad"), draw("ddpm")
    guided.ddpm.timestep_spacing = "quad"
    assert torch.equal(draw("ddpm"), quad) and not torch.allclose(quad, uniform)


def official_diffusion(ddpm, steps):
    """guided-diffusion's own SpacedDiffusion on the DDPM's betas and respaced timesteps."""
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion.respace import SpacedDiffusion

    variance = {"beta": gd.ModelVarType.FIXED_LARGE, "beta_tilde": gd.ModelVarType.FIXED_SMALL}
    return SpacedDiffusion(
        use_timesteps=ddpm.timesteps(steps).tolist(),
        betas=ddpm.schedule.betas.double().numpy(),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=variance[ddpm.variance],
        loss_type=gd.LossType.MSE,
    )


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guidance_with_clipping_is_guided_diffusions(guided, sampler):
    """With clip_x0 (the tiny DDPM's setting) at s = 5, our guided DDIM (Algorithm 2) and
    ancestral (Algorithm 1) samples equal guided-diffusion's ``ddim_sample``/``p_sample`` loops
    on the same networks: x̂_0 is clamped first, the shift (ε − s√(1−ᾱ)g, or μ + sΣg) comes
    after and is not clamped again. The old order (shift, then clamp) missed by ~0.1."""
    ddpm, steps, scale = guided.ddpm, 3, 5.0
    assert ddpm.clip_x0
    official = official_diffusion(ddpm, steps)
    labels = torch.tensor([3, 8, 1, 0])

    def model(x, t, y=None):
        return ddpm.eps(x, t)

    def cond_fn(x, t, y):  # classifier_sample.py's cond_fn, written out
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(guided.classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    torch.manual_seed(11)  # the official loop draws from the global stream, ours from a generator
    x = torch.randn(4, *ddpm.sample_shape)
    with torch.no_grad():
        for i in reversed(range(steps)):
            t = torch.full((4,), i, dtype=torch.long)
            step = official.ddim_sample if sampler == "ddim" else official.p_sample
            x = step(model, x, t, clip_denoised=True, cond_fn=cond_fn, model_kwargs={"y": labels})
            x = x["sample"]
    gen = torch.Generator().manual_seed(11)
    ours = guided.sample(4, labels=labels, scale=scale, sampler=sampler, steps=steps, generator=gen)
    torch.testing.assert_close(ours, x.clamp(-1, 1), rtol=0, atol=2e-4)  # sample() clamps


def test_guided_sampling_starts_from_a_given_x_T(guided):
    """DDIM is deterministic given x_T: the generator no longer matters, the start does."""
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    draw = lambda x, seed: guided.sample(  # noqa: E731
        2, labels=[1, 2], scale=2.0, sampler="ddim", steps=3, x_T=x,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    assert torch.equal(draw(x_T, 0), draw(x_T, 1))
    assert not torch.allclose(draw(x_T, 0), draw(-x_T, 0))
