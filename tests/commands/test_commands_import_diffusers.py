"""``import --source diffusers`` / ``diffusers-vae``: tiny random-weight diffusers models saved as
the Hub holds them (``save_pretrained`` folders) become checkpoints of ours that compute what
diffusers computes, and that ``sample`` and LDM's stage 2 take."""

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusion_apps.checkpoint import load_module
from diffusion_apps.cli import main
from diffusion_apps.methods import DDPM, AutoencoderKL, LatentDiffusion
from diffusion_apps.nn import UNet
from tests.factories import TINY_SD_VAE, randomize_norms_around_one_

IMPORT = ["import", "--source"]


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """google/ddpm-cifar10-32's layout at a tiny width, saved as a DDPMPipeline folder."""
    root = tmp_path_factory.mktemp("diffusers")
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6,
    )  # fmt: skip
    scheduler = DDPMScheduler(num_train_timesteps=200, beta_schedule="linear")
    DDPMPipeline(randomize_norms_around_one_(unet, 0), scheduler).save_pretrained(root / "pipeline")
    main(
        [
            *IMPORT,
            "diffusers",
            "--weights",
            str(root / "pipeline"),
            "--out",
            str(root / "ddpm.ckpt"),
        ]
    )
    return root, unet, scheduler


def test_the_imported_unet_and_schedule_are_diffusers(pipeline):
    root, unet, scheduler = pipeline
    ddpm = load_module(root / "ddpm.ckpt", DDPM)
    assert isinstance(ddpm.unet, UNet) and ddpm.variance == "beta_tilde"  # fixed_small
    torch.testing.assert_close(
        ddpm.schedule.alphas_cumprod, scheduler.alphas_cumprod, atol=1e-6, rtol=0
    )
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 190])
    with torch.no_grad():
        assert relative(ddpm.eps(x, t), unet(x, t).sample) < 1e-5


def test_sample_takes_the_imported_ddpm(pipeline, tmp_path):
    root, _, _ = pipeline
    main(["sample", "--ckpt_path", str(root / "ddpm.ckpt"), "--num_samples", "2", "--steps", "4",
          "--precision", "32", "--out_dir", str(tmp_path)])  # fmt: skip
    assert (tmp_path / "grid.png").is_file()


def test_the_imported_vae_is_diffusers_and_lets_stage_two_train_on_it(tmp_path):
    vae = DiffusersVAE(**TINY_SD_VAE)
    randomize_norms_around_one_(vae, 2).save_pretrained(tmp_path / "vae")
    ckpt = tmp_path / "vae.ckpt"
    main([*IMPORT, "diffusers-vae", "--weights", str(tmp_path / "vae"), "--out", str(ckpt)])
    ours = load_module(ckpt, AutoencoderKL)
    assert ours.scaling_factor == pytest.approx(vae.config.scaling_factor)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        assert relative(ours.encode(x).mode(), mean) < 1e-5
        assert relative(ours.decode(mean), vae.decode(mean).sample) < 1e-5
    unet = UNet(in_channels=4, image_size=16, base_channels=32, channel_mult=(1,),
                num_res_blocks=1, attention_resolutions=(), num_groups=8)  # fmt: skip
    ldm = LatentDiffusion(unet, str(ckpt))
    assert bool(ldm.scale_ready) and ldm.scale_factor.item() == pytest.approx(0.18215)


def test_a_missing_folder_or_file_is_named(tmp_path):
    with pytest.raises(SystemExit, match="error: .*no folder here and cannot be downloaded"):
        main(
            [*IMPORT, "diffusers", "--weights", "nobody/nothing-here", "--out", str(tmp_path / "x")]
        )
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="error: .*has no weights: place diffusion_pytorch_model"):
        main(
            [
                *IMPORT,
                "diffusers",
                "--weights",
                str(tmp_path / "unet"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
    assert not (tmp_path / "x").exists()
