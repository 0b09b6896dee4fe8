"""Reconstruction metrics against closed forms: MSE on [0, 1], PSNR = 10 log10(1 / MSE)."""

import math

import pytest
import torch

from diffusion_apps.evaluation import ReconstructionMetrics


@pytest.fixture
def no_hub_weights(tmp_path):
    """An empty torch hub cache."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    yield tmp_path
    torch.hub.set_dir(previous)


def targets(n: int = 8, channels: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, channels, 32, 32, generator=g) * 1.6 - 0.8  # in [-0.8, 0.8]


def test_identical_images(no_hub_weights):
    metric = ReconstructionMetrics()
    x = targets()
    metric.update(x, x.clone())
    out = metric.compute()
    assert out["mse"] == 0 and out["psnr"] == math.inf and out["n"] == 8
    assert out["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert "lpips" not in out  # no AlexNet weights on disk


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_known_noise_level_gives_closed_form_mse_and_psnr(no_hub_weights):
    # ±0.1 on [-1, 1] is ±0.05 on [0, 1]: mse = 0.0025 exactly, psnr = 10 log10(400).
    x = targets(channels=3)
    sign = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    metric = ReconstructionMetrics()
    metric.update(x[:3] + 0.1 * sign[:3], x[:3])  # two batches accumulate like one
    metric.update(x[3:] + 0.1 * sign[3:], x[3:])
    out = metric.compute()
    assert out["mse"] == pytest.approx(0.0025, rel=1e-5)
    assert out["psnr"] == pytest.approx(10 * math.log10(400), rel=1e-5)
    assert 0 < out["ssim"] < 1
    metric.reset()
    with pytest.raises(RuntimeError, match="no images"):
        metric.compute()


def test_shape_mismatch_and_missing_lpips_file(no_hub_weights):
    with pytest.raises(ValueError, match="one \\(B, C, H, W\\)"):
        ReconstructionMetrics().update(torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 28, 28))
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        ReconstructionMetrics(lpips_weights_path=str(no_hub_weights / "missing.pth"))


@pytest.mark.slow
def test_lpips_from_a_local_alexnet_file(no_hub_weights):
    # A random AlexNet (240 MB) stands in for the ImageNet one: plumbing, not numbers.
    from torchvision.models import alexnet

    path = no_hub_weights / "alexnet.pth"
    torch.save(alexnet().state_dict(), path)
    metric = ReconstructionMetrics(lpips_weights_path=str(path))
    x = targets(4)
    metric.update(x, x)
    metric.update(x, -x)
    assert metric.compute()["lpips"] > 0
    assert torch.hub.get_dir() == str(no_hub_weights)  # the hub dir was restored


def test_a_perfect_reconstructor_scores_the_real_floor():
    """reconstruct(x) = x: the reconstruction row's fd_digits and accuracy are the real val split's
    against train, the floor row's numbers."""
    from diffusion_apps.data import ImageDataModule
    from diffusion_apps.evaluation import FeatureStats, real_floor
    from diffusion_apps.evaluation.autoencoding import reconstruction_rows
    from diffusion_apps.evaluation.reference import data_reference

    class Identity(torch.nn.Module):
        device = torch.device("cpu")

        def reconstruct(self, x):
            return x

    data = ImageDataModule(dataset="digits", image_size=32, channels=1, batch_size=100)
    data.setup("validate")
    features = FeatureStats("digits")
    data_reference(features, data, progress=False)
    (row,) = reconstruction_rows(Identity(), data, "identity", 0, 0, 1, features=features)
    floor = real_floor("digits")
    assert row.metrics["mse"] == 0 and row.num_samples == 500
    assert row.metrics["fd_digits"] == pytest.approx(floor["fd_digits"], rel=1e-4)
    assert row.metrics["accuracy"] == floor["accuracy"]
