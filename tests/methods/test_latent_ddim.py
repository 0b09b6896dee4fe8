"""The latent DDIM: recovers a Gaussian latent set; its statistics survive the checkpoint."""

import pytest
import torch

from diffusion_apps.checkpoint import load_module
from diffusion_apps.cli import main
from diffusion_apps.diffusion import NoiseSchedule
from diffusion_apps.methods import DDPM, LatentDDIM
from diffusion_apps.nn import SkipMLP
from tests.conftest import CONFIGS, run_cli_in
from tests.methods.ddpm_arguments import assert_ddpm_arguments, keyword_only_ddpm

MEAN = torch.tensor([1.0, -2.0])
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]])


def test_skip_mlp_is_zero_at_init_and_checks_its_input():
    net = SkipMLP(dim=3, hidden=8, num_layers=3, time_dim=4)
    z, t = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 999])
    assert torch.equal(net(z, t), torch.zeros(5, 3))  # zero output layer: starts at ε̂ = 0
    with pytest.raises(ValueError, match=r"expected z of shape \(B, 3\)"):
        net(torch.randn(5, 4), t)


def test_latent_ddpm_recovers_a_gaussian_latent_set():
    """The skip MLP trained with DiffAE's latent recipe (constant β, L1, ε-prediction) on
    z ~ N(μ, Σ) samples that mean and covariance back."""
    torch.manual_seed(0)
    model = DDPM(
        SkipMLP(dim=2, hidden=64, num_layers=4, time_dim=16),
        NoiseSchedule("constant", 1000, constant_beta=0.008),
        clip_x0=False,
        loss="l1",
        sample_steps=200,
    )
    opt = torch.optim.Adam(model.unet.parameters(), lr=1e-2)
    latents = MEAN + torch.randn(20000, 2) @ torch.linalg.cholesky(COV).T  # the "training set"
    mu, sigma = latents.mean(0), latents.std(0)  # normalised per dimension, as LatentDDIM does
    for _ in range(2000):
        z = latents[torch.randint(0, len(latents), (256,))]
        loss = model.diffusion_loss((z - mu) / sigma)
        opt.zero_grad()
        loss.backward()
        opt.step()
    samples = model.draw(4000, generator=torch.Generator().manual_seed(1)) * sigma + mu
    assert samples.shape == (4000, 2)
    torch.testing.assert_close(samples.mean(0), MEAN, atol=0.1, rtol=0)
    # A 2,000-step fit still shrinks the variance ~10% (less with more training): 0.2 of slack.
    torch.testing.assert_close(torch.cov(samples.T), COV, atol=0.2, rtol=0)


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A tiny DiffAE, then the tiny latent stage on it, both through the CLI; the latent
    checkpoint names the DiffAE one by its path relative to the run directory."""
    return run_cli_in(
        tmp_path_factory.mktemp("latent"),
        ["fit", "--config", str(CONFIGS / "tiny" / "diffae.yaml")],
        ["fit", "--config", str(CONFIGS / "tiny" / "diffae_latent.yaml")],
    )


def load_latent(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir)
    return load_module("runs/tiny_diffae_latent/version_0/checkpoints/last.ckpt", LatentDDIM)


def test_statistics_are_the_mean_and_std_of_the_codes(latent_run, monkeypatch):
    """measure_statistics gives the per-dimension mean and unbiased std of Enc(x0) over the
    batches it is handed, and only the first ``stats_batches`` of them."""
    module = load_latent(latent_run, monkeypatch)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(5, 1, 16, 16, generator=g) * 2 - 1, None) for _ in range(3)]
    z = torch.cat([module.autoencoder.encode(x) for x, _ in batches]).double()
    module.measure_statistics(batches)
    torch.testing.assert_close(module.z_mean.double(), z.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(module.z_std.double(), z.std(0), atol=1e-6, rtol=1e-4)
    module.stats_batches = 1
    module.measure_statistics(batches)
    torch.testing.assert_close(module.z_mean.double(), z[:5].mean(0), atol=1e-6, rtol=1e-5)


def test_codes_are_normalised_for_diffusion_and_samples_denormalised(latent_run, monkeypatch):
    """With μ, σ set: diffused(x) = (Enc(x) − μ)/σ. With ε̂ ≡ 0 every DDIM step keeps
    x̂_0 = x_t/√ᾱ_t, so the normalised sample is x_T/√ᾱ_τ (τ the first sampling timestep,
    ᾱ_τ = (1 − β)^{τ+1} for the constant β = 0.05) and ``sample_latents`` = σ·x_T/√ᾱ_τ + μ."""
    module = load_latent(latent_run, monkeypatch)
    mu, sigma = torch.linspace(-1, 1, 16), torch.linspace(0.5, 2, 16)
    module.z_mean.copy_(mu)
    module.z_std.copy_(sigma)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = module.autoencoder.encode(x)
    torch.testing.assert_close(module.diffused(x), (z - mu) / sigma)
    with torch.no_grad():
        for p in module.unet.parameters():
            p.zero_()
    x_T = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    tau = int(module.timesteps(5).max())
    expected = sigma * x_T / (1 - 0.05) ** ((tau + 1) / 2) + mu
    got = module.sample_latents(3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_statistics_round_trip_through_the_checkpoint(latent_run, monkeypatch):
    """The checkpoint holds the μ, σ measured before training, over the whole train split:
    measuring them again with the loaded encoder gives the same numbers."""
    from diffusion_apps.data import ImageDataModule

    module = load_latent(latent_run, monkeypatch)
    assert bool(module.stats_ready)
    saved_mean, saved_std = module.z_mean.clone(), module.z_std.clone()
    data = ImageDataModule(image_size=16, batch_size=8)  # the tiny config's data
    data.setup("fit")
    # The train loader shuffles and drops its last 4 of 4,500 images, a different 4 each time:
    # that moves μ and σ by ~1e-4 of their size, far below any wrong or unsaved statistic.
    module.measure_statistics(data.train_dataloader())
    torch.testing.assert_close(saved_mean, module.z_mean, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(saved_std, module.z_std, atol=1e-4, rtol=1e-3)
    z = torch.randn(4, 16)
    torch.testing.assert_close(module.denormalize(module.normalize(z)), z)


def test_latent_samples_are_decoded_images(latent_run, monkeypatch):
    module = load_latent(latent_run, monkeypatch)
    gen = torch.Generator().manual_seed(0)
    images = module.sample(3, generator=gen)
    assert images.shape == (3, 1, 16, 16) and images.abs().max() <= 1
    codes = module.sample_latents(3, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (3, 16)
    # The eval report's NFE: latent-net steps plus the decoder's DDIM steps.
    assert module.nfe("ddim", 7) == 7 + 5  # tiny config: decode_steps 5
    assert all(not p.requires_grad for p in module.autoencoder.parameters())


def test_the_latent_checkpoint_stands_alone(latent_run, tmp_path, monkeypatch):
    """It saves the autoencoder's config beside its weights: moved where the DiffAE checkpoint
    it names does not exist, it loads and samples exactly as before."""
    import shutil

    module = load_latent(latent_run, monkeypatch)
    moved = tmp_path / "latent.ckpt"
    shutil.copy(latent_run / "runs/tiny_diffae_latent/version_0/checkpoints/last.ckpt", moved)
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / module.hparams.autoencoder).exists()
    alone = load_module(moved, LatentDDIM)
    same = [m.sample(2, generator=torch.Generator().manual_seed(0)) for m in (module, alone)]
    assert torch.equal(*same)


def test_ddpm_arguments_are_forwarded_by_keyword(latent_run, monkeypatch):
    monkeypatch.chdir(latent_run)
    kw = dict(sampler="ddpm", sample_steps=9, num_val_samples=3, loss="mse", lr=3e-4,
              weight_decay=0.02, warmup_steps=7, adam_betas=(0.8, 0.9), compile=True)  # fmt: skip
    net = SkipMLP(dim=16, hidden=16, num_layers=2)
    with keyword_only_ddpm():
        model = LatentDDIM(net, "runs/tiny_diffae/version_0/checkpoints/last.ckpt", **kw)
    fixed = dict(prediction="eps", eta=0.0, timestep_spacing="uniform", variance="beta")
    assert_ddpm_arguments(model, **kw, **fixed, clip_x0=False)


def test_an_autoencoder_that_cannot_encode_is_refused(in_tmp):
    main(["fit", "--config", str(CONFIGS / "tiny" / "ddpm.yaml"), "--trainer.max_steps", "1"])
    ddpm = "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"
    with pytest.raises(ValueError, match="holds a DDPM, which has no encode"):
        LatentDDIM(SkipMLP(dim=16, hidden=16, num_layers=2), ddpm)


def test_turning_off_a_shift_a_diffae_does_not_have_is_refused(latent_run, monkeypatch):
    monkeypatch.chdir(latent_run)
    net = SkipMLP(dim=16, hidden=16, num_layers=2)
    diffae = "runs/tiny_diffae/version_0/checkpoints/last.ckpt"
    with pytest.raises(ValueError, match="turns off PDAE.s learned shift, but .* holds a DiffAE"):
        LatentDDIM(net, diffae, unshifted_fraction=0.3)


def test_fast_dev_run_of_the_tiny_latent_config(latent_run, monkeypatch):
    monkeypatch.chdir(latent_run)
    config = str(CONFIGS / "tiny" / "diffae_latent.yaml")
    main(["fit", "--config", config, "--trainer.fast_dev_run", "true"])
