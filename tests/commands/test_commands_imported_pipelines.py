"""The methods built on a pretrained model take an imported one through the CLI, unchanged: PDAE
and consistency distillation on an imported diffusers DDPM, LDM's stage 2 on an imported
diffusers VAE, and ``eval`` scores each (tiny random-weight diffusers models, 3-channel)."""

import json

import pytest
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusion_apps.checkpoint import load_module
from diffusion_apps.methods import PDAE, ConsistencyDistillation, LatentDiffusion
from tests.conftest import CONFIGS, run_cli_in
from tests.factories import TINY_SD_VAE, randomize_norms_around_one_

QUICK = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
         "--trainer.num_sanity_val_steps", "0",
         "--trainer.enable_progress_bar", "false"]  # fmt: skip
# A 100-image val split in batches of 25: eval reconstructs all of it with PDAE twice (DDIM
# inversion + decoding); the default 500 in batches of 8 took 80% of the test's time.
RGB16 = ["--data.init_args.channels", "3", "--data.init_args.val_fraction", "0.02",
         "--data.init_args.batch_size", "25"]  # fmt: skip


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A 16px RGB DDPM and a 32px RGB VAE (f = 2, 4 latent channels) from diffusers folders,
    imported, then the three methods trained on them for 2 steps."""
    root = tmp_path_factory.mktemp("imported")
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    scheduler = DDPMScheduler(num_train_timesteps=100)
    DDPMPipeline(randomize_norms_around_one_(unet, 0), scheduler).save_pretrained(root / "ddpm")
    vae = DiffusersVAE(**TINY_SD_VAE)
    randomize_norms_around_one_(vae, 1).save_pretrained(root / "vae")
    tiny, ddpm, first_stage = CONFIGS / "tiny", str(root / "ddpm.ckpt"), str(root / "vae.ckpt")
    run_cli_in(
        root,
        ["import", "--source", "diffusers", "--weights", str(root / "ddpm"), "--out", ddpm],
        ["import", "--source", "diffusers-vae", "--weights", str(root / "vae"),
         "--out", first_stage],
        ["fit", "--config", str(tiny / "consistency.yaml"), "--model.init_args.teacher", ddpm,
         *RGB16, *QUICK],
        ["fit", "--config", str(tiny / "pdae.yaml"), "--model.init_args.ddpm", ddpm,
         "--model.init_args.encoder.init_args.in_channels", "3", *RGB16, *QUICK],
        ["fit", "--config", str(tiny / "ldm.yaml"), "--model.init_args.first_stage", first_stage,
         "--model.init_args.unet.init_args.in_channels", "4",
         "--model.init_args.unet.init_args.image_size", "16",
         "--model.init_args.unet.init_args.attention_resolutions", "[8]",
         "--data.init_args.image_size", "32", *RGB16, *QUICK],
    )  # fmt: skip
    return root


def last(root, name: str):
    return root / "runs" / f"tiny_{name}" / "version_0" / "checkpoints" / "last.ckpt"


def test_each_method_trained_on_the_imported_model(imported):
    consistency = load_module(last(imported, "consistency"), ConsistencyDistillation)
    pdae = load_module(last(imported, "pdae"), PDAE)
    ldm = load_module(last(imported, "ldm"), LatentDiffusion)
    assert consistency.sample_shape == pdae.sample_shape == (3, 16, 16)
    assert ldm.scale_factor.item() == pytest.approx(0.18215)  # the VAE's, not re-measured
    assert ldm.sample(2, steps=2, labels=[1, 2]).shape == (2, 3, 32, 32)


def test_eval_scores_each(imported):
    ckpts = ",".join(str(last(imported, n)) for n in ("consistency", "ldm", "pdae"))
    run_cli_in(
        imported,
        ["eval", "--ckpt_paths", ckpts, "--num_samples", "4", "--batch_size", "4",
         "--samplers", "ddim:2,consistency:1", "--precision", "32", "--out_dir", "report"],
    )  # fmt: skip
    rows = json.loads((imported / "report" / "eval.json").read_text())["rows"]
    floors = [r for r in rows if r["method"] == "FLOOR"]
    rows = [r for r in rows if r["method"] != "FLOOR"]
    assert len(floors) == len({r["reference"] for r in rows}) >= 2  # one per data, not MNIST's
    assert {(r["method"], r["sampler"]) for r in rows} == {
        ("ConsistencyDistillation", "consistency"), ("LatentDiffusion", "ddim"),
        ("PDAE", "reconstruct, inferred x_T"), ("PDAE", "reconstruct, random x_T"),
        ("PDAE", "linear probe"),
    }  # fmt: skip
