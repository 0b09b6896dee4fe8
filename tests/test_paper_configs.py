"""configs/paper/: each network at the paper's size, counted against the paper or the official code.

References, strongest first: the official code built at the published flags on the meta device
(guided-diffusion-sdk for ADM, its classifier, and the UNet that DiffAE, PDAE's DDPM and LDM copy;
diffusers' AutoencoderKL for LDM's KL f = 4 first stage), then the paper's own count (DDPM's 35.7 M
and 114 M, LDM's 274 M). The flags below are written from the papers and READMEs, never read from
our configs, so a config that drifts from the paper fails here.
"""

import importlib

import pytest
import torch
import yaml
from torch import nn

from tests.conftest import CONFIGS

PAPER = CONFIGS / "paper"
guided_unet = pytest.importorskip("guided_diffusion.unet")
script_util = pytest.importorskip("guided_diffusion.script_util")
diffusers = pytest.importorskip("diffusers")


def build(spec: dict) -> nn.Module:
    """A ``class_path`` / ``init_args`` dict of a config, built (nested specs first)."""
    module, name = spec["class_path"].rsplit(".", 1)
    args = {k: build(v) if isinstance(v, dict) and "class_path" in v else v
            for k, v in spec.get("init_args", {}).items()}  # fmt: skip
    return getattr(importlib.import_module(module), name)(**args)


def network(config: str, part: str) -> nn.Module:
    """``model.init_args.<part>`` of ``configs/paper/<config>.yaml``, on the meta device."""
    spec = yaml.safe_load((PAPER / f"{config}.yaml").read_text())["model"]["init_args"][part]
    with torch.device("meta"):
        return build(spec)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def official(factory, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return factory(**kwargs)


def guided_resblocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, guided_unet.ResBlock)]


ADM64_FLAGS = dict(  # guided-diffusion README, 64x64_diffusion.pt
    image_size=64, num_channels=192, num_res_blocks=3, attention_resolutions="32,16,8",
    num_head_channels=64, resblock_updown=True, use_new_attention_order=True, dropout=0.1,
    class_cond=True, learn_sigma=True, use_scale_shift_norm=True, noise_schedule="cosine",
)  # fmt: skip


def adm64() -> nn.Module:
    args = script_util.model_and_diffusion_defaults() | ADM64_FLAGS
    with torch.device("meta"):
        return script_util.create_model_and_diffusion(**args)[0]


def adm64_classifier() -> nn.Module:
    return official(script_util.create_classifier, **script_util.classifier_defaults())


def diffae_ffhq128_decoder() -> int:
    """phizaz/diffae's BeatGANs autoencoder UNet: guided-diffusion's UNetModel at the FFHQ 128 shape
    plus one Linear(512, C) per ResBlock that scales by z_sem (``two_cond``, no 2x width)."""
    base = official(
        guided_unet.UNetModel, image_size=128, in_channels=3, model_channels=128, out_channels=3,
        num_res_blocks=2, attention_resolutions=(128 // 16,), dropout=0.1,
        channel_mult=(1, 1, 2, 3, 4), num_heads=1, use_scale_shift_norm=True, resblock_updown=True,
    )  # fmt: skip
    return count(base) + sum(512 * b.out_channels + b.out_channels for b in guided_resblocks(base))


def diffae_ffhq128_encoder() -> int:
    """DiffAE's semantic encoder: guided-diffusion's EncoderUNetModel (adaptive pool to 512) at
    mult (1,1,2,3,4,4) without its time input (the time MLP and every ResBlock's emb layers)."""
    enc = official(
        guided_unet.EncoderUNetModel, image_size=128, in_channels=3, model_channels=128,
        out_channels=512, num_res_blocks=2, attention_resolutions=(128 // 16,),
        channel_mult=(1, 1, 2, 3, 4, 4), num_heads=1, use_scale_shift_norm=True,
        resblock_updown=True, pool="adaptive",
    )  # fmt: skip
    time = count(enc.time_embed) + sum(count(b.emb_layers) for b in guided_resblocks(enc))
    return count(enc) - time


def diffae_celeba64_ddpm() -> int:
    """Diff-AE's CelebA 64 DDPM (templates.ddpm): width 64, mult (1,2,4,8), attention at 16."""
    return count(official(
        guided_unet.UNetModel, image_size=64, in_channels=3, model_channels=64, out_channels=3,
        num_res_blocks=2, attention_resolutions=(64 // 16,), dropout=0.1,
        channel_mult=(1, 2, 4, 8), num_heads=1, use_scale_shift_norm=True, resblock_updown=True,
    ))  # fmt: skip


def ldm_celebahq256_unet() -> int:
    """latent-diffusion's openaimodel UNet (guided-diffusion's, as copied) at celebahq-ldm-vq-4:
    width 224, mult (1,2,3,4), attention at downsampling 8, 4, 2, 32-channel heads."""
    return count(official(
        guided_unet.UNetModel, image_size=64, in_channels=3, model_channels=224, out_channels=3,
        num_res_blocks=2, attention_resolutions=(8, 4, 2), channel_mult=(1, 2, 3, 4),
        num_head_channels=32, use_scale_shift_norm=False,
    ))  # fmt: skip


def kl_f4() -> int:
    """latent-diffusion's kl-f4 first stage as diffusers' AutoencoderKL: ch 128, mult (1,2,4),
    2 ResBlocks, 3 latent channels."""
    return count(official(
        diffusers.AutoencoderKL, in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=3,
    ))  # fmt: skip


# (config, part) -> the official code's count, which ours must equal
EXACT = {
    ("adm_imagenet64", "unet"): lambda: count(adm64()),
    ("adm_classifier_imagenet64", "classifier"): lambda: count(adm64_classifier()),
    ("diffae_ffhq128", "unet"): diffae_ffhq128_decoder,
    ("diffae_ffhq128", "encoder"): diffae_ffhq128_encoder,
    ("ddpm_celeba64", "unet"): diffae_celeba64_ddpm,
    ("ldm_celebahq256", "unet"): ldm_celebahq256_unet,
    ("ldm_celebahq256_autoencoder", "autoencoder"): kl_f4,
}
PAPER_COUNTS = {  # the papers' own numbers, within 1%
    ("ddpm_cifar10", "unet"): 35.7e6,  # Ho et al. 2020, App. B
    ("ddpm_celebahq256", "unet"): 114e6,  # "our LSUN and CelebA-HQ models have 114 million"
    ("ldm_celebahq256", "unet"): 274e6,  # Rombach et al. 2022, Table 13 (CelebA-HQ LDM-4)
}


@pytest.mark.parametrize(("config", "part"), list(EXACT), ids=lambda v: str(v))
def test_count_equals_the_official_code(config, part):
    assert count(network(config, part)) == EXACT[config, part]()


@pytest.mark.parametrize(("config", "part"), list(PAPER_COUNTS), ids=lambda v: str(v))
def test_count_within_one_percent_of_the_paper(config, part):
    assert count(network(config, part)) == pytest.approx(PAPER_COUNTS[config, part], rel=0.01)


def test_every_paper_config_is_counted():
    """A new config in configs/paper/ joins the table (or is named here as building on one)."""
    builds_on = {"cd_cifar10": "ddpm_cifar10", "pdae_celeba64": "ddpm_celeba64",
                 "diffae_ffhq128_latent": "diffae_ffhq128"}  # fmt: skip
    counted = {c for c, _ in EXACT} | {c for c, _ in PAPER_COUNTS}
    assert {p.stem for p in PAPER.glob("*.yaml")} == counted | set(builds_on)
    assert set(builds_on.values()) <= counted


# -- one training step of each config, on CPU, from a folder of real-format images --------------

W32 = ["--model.init_args.unet.init_args.base_channels", "32"]
# config -> overrides: the width cut to fit a CPU step (the full shapes are counted above)
REDUCED = {
    "ddpm_cifar10": W32,
    "cd_cifar10": [],  # the student copies its teacher
    "ddpm_celebahq256": W32,
    "ddpm_celeba64": W32,
    "pdae_celeba64": ["--model.init_args.encoder.init_args.base_channels", "32"],
    "diffae_ffhq128": W32 + ["--model.init_args.encoder.init_args.base_channels", "32"],
    "diffae_ffhq128_latent": ["--model.init_args.net.init_args.hidden", "256"],
    "ldm_celebahq256_autoencoder": [
        "--model.init_args.autoencoder.init_args.base_channels", "32",
        "--model.init_args.autoencoder.init_args.num_head_channels", "128",
        "--model.init_args.discriminator.init_args.base_channels", "16",
    ],
    "ldm_celebahq256": W32,
    "adm_imagenet64": W32 + ["--model.init_args.unet.init_args.num_head_channels", "32"],
    "adm_classifier_imagenet64": [
        "--model.init_args.classifier.init_args.base_channels", "32",
        "--model.init_args.classifier.init_args.num_head_channels", "32",
    ],
}  # fmt: skip
# where the second config of a chain keeps the first's state in its own state dict
FROZEN_PREFIX = {
    "cd_cifar10": "teacher.",
    "pdae_celeba64": "",
    "diffae_ffhq128_latent": "autoencoder.",
    "ldm_celebahq256": "first_stage.",
}
CHAINS = [  # each after the ones it builds on (their checkpoints are its frozen parts)
    ["ddpm_cifar10", "cd_cifar10"],
    ["ddpm_celebahq256"],
    ["ddpm_celeba64", "pdae_celeba64"],
    ["diffae_ffhq128", "diffae_ffhq128_latent"],
    ["ldm_celebahq256_autoencoder", "ldm_celebahq256"],
    # class-conditional, from the labelled folder; the classifier takes the DDPM's schedule
    ["adm_imagenet64", "adm_classifier_imagenet64"],
]
LABELLED = {"adm_imagenet64", "adm_classifier_imagenet64"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """12 random 48x48 PNGs in ``plain/``, and the same in two class sub-folders (ImageNet's
    layout) in ``labelled/``."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for i in range(12):
        image = Image.fromarray(torch.randint(0, 256, (48, 48, 3), generator=gen).byte().numpy())
        for folder in (root / "plain", root / "labelled" / f"n0{i % 2}"):
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:02d}.png")
    return root


@pytest.mark.parametrize("chain", CHAINS, ids=lambda c: "+".join(c))
def test_one_training_step(chain, image_folder, in_tmp):
    """fit runs one optimizer step of each config at a CPU-sized width and batch 2, and the
    weights it writes are finite; what builds on an earlier stage holds that stage's weights."""
    from diffusion_apps.checkpoint import read_checkpoint
    from diffusion_apps.cli import main

    folder = image_folder / ("labelled" if chain[0] in LABELLED else "plain")
    data = ["--data.init_args.dataset", "folder", "--data.init_args.root", str(folder),
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0"]  # fmt: skip
    cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision",
           "32-true", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]  # fmt: skip
    saved = {}
    for name in chain:
        main(["fit", "--config", str(PAPER / f"{name}.yaml"), *cpu, *data, *REDUCED[name]])
        saved[name] = read_checkpoint(in_tmp / f"runs/{name}/version_0/checkpoints/last.ckpt")
        assert saved[name]["global_step"] == 1
        assert all(torch.isfinite(v).all() for v in saved[name]["state_dict"].values())
    if chain[-1] in FROZEN_PREFIX:  # the second holds the first's (EMA) weights, frozen: unchanged
        first, second = (saved[n]["state_dict"] for n in chain)
        prefix = FROZEN_PREFIX[chain[1]]
        shared = [k for k in first if prefix + k in second]
        assert 2 * len(shared) > len(first)  # its networks, if not its training-only parts
        assert all(torch.equal(second[prefix + k], first[k]) for k in shared)
