"""diffusers UNet2DModel folders and DDPMScheduler configs → our UNet and DDPM, checked against
diffusers itself: equal outputs of tiny random models of each published google/ddpm-* layout
(saved with ``save_pretrained`` and read back from the folder), equal parameter counts and shapes
of the full published layouts (meta device), equal ᾱ_t of the schedules."""

import json

import pytest
import torch

from diffusion_apps.diffusion import NoiseSchedule
from diffusion_apps.interop.diffusers_unet import (
    UnsupportedConfig,
    convert_unet,
    ddpm_options,
    unet_options,
)
from diffusion_apps.nn import UNet
from tests.factories import randomize_

diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# The published config.json files (their private keys dropped): google/ddpm-cifar10-32 (diffusers
# 0.0.4: no attention_head_dim, so diffusers' default 8 applies) and google/ddpm-church-256 (0.3.0;
# celebahq-256, ema-church-256, bedroom-256 and cat-256 share its layout).
CIFAR10 = dict(
    act_fn="silu", block_out_channels=[128, 256, 256, 256], center_input_sample=False,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, in_channels=3, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-06, norm_num_groups=32, out_channels=3, sample_size=32,
    time_embedding_type="positional",
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
)  # fmt: skip
CHURCH = dict(
    sample_size=256, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", freq_shift=1, flip_sin_to_cos=False,
    down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    block_out_channels=[128, 128, 256, 256, 512, 512], layers_per_block=2,
    mid_block_scale_factor=1, downsample_padding=0, act_fn="silu", attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-06,
)  # fmt: skip
PUBLISHED = {"ddpm-cifar10-32": CIFAR10, "ddpm-church-256": CHURCH}

# The same layouts shrunk: widths (32, 64[, 64]), one ResBlock a level, 32 groups.
TINY = dict(
    in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=32, norm_eps=1e-6,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None,
)  # fmt: skip
TINY_CIFAR10 = TINY | dict(
    sample_size=16, block_out_channels=[32, 64],
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
)  # fmt: skip
TINY_CHURCH = TINY | dict(
    sample_size=16, block_out_channels=[32, 64, 64],
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
)  # fmt: skip
LAYOUTS = {
    "cifar10": TINY_CIFAR10,
    "church": TINY_CHURCH,
    "scale_shift": TINY_CHURCH | dict(resnet_time_scale_shift="scale_shift"),  # bare mid attention
    "scale_shift_mid_norm": TINY_CIFAR10
    | dict(resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32),
    "no_mid_attention": TINY_CHURCH | dict(add_attention=False),
    "heads_of_8": TINY_CIFAR10 | dict(attention_head_dim=8),
    "adm_like": TINY_CIFAR10 | dict(downsample_padding=1, flip_sin_to_cos=True, freq_shift=0),
    "classes": TINY_CIFAR10 | dict(num_class_embeds=5),
    "two_blocks_dropout": TINY_CIFAR10 | dict(layers_per_block=2, dropout=0.1),
}


def max_relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def saved_folder(config: dict, path) -> tuple[dict, dict]:
    """A random UNet2DModel of ``config`` (zero-inits re-randomised; the attention's weights
    larger, so that its softmax is far from uniform and its output counts), saved with
    save_pretrained and read back as the folder's config.json and safetensors state dict."""
    theirs = randomize_(diffusers.UNet2DModel(**config), 0.05, seed=1).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".attentions." in name and not name.endswith("bias"):
                p.mul_(8)
    theirs.save_pretrained(path)
    folder_config = json.loads((path / "config.json").read_text())
    state = safetensors_torch.load_file(path / "diffusion_pytorch_model.safetensors")
    return folder_config, state, theirs


def our_unet(config: dict, state: dict) -> UNet:
    ours = UNet(**unet_options(config)).eval()
    ours.load_state_dict(convert_unet(state, ours), strict=True)
    return ours


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_outputs_equal_diffusers(layout, tmp_path):
    torch.manual_seed(0)
    config, state, theirs = saved_folder(LAYOUTS[layout], tmp_path)
    ours = our_unet(config, state)
    x, t = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 17, 500, 999])
    y = torch.tensor([0, 1, 2, 4, 3]) if "num_class_embeds" in LAYOUTS[layout] else None
    with torch.no_grad():
        expected = theirs(x, t, class_labels=y).sample
        assert max_relative(ours(x, t, y=y), expected) < 1e-5
        for step in (3, 250):  # one timestep for the batch, as samplers call it
            scalar = theirs(x, step, class_labels=y).sample
            assert max_relative(ours(x, torch.tensor(step), y=y), scalar) < 1e-5


def test_the_comparison_sees_each_option(tmp_path):
    """Each DDPM-specific choice changes the output far beyond the tolerance: the equality above
    is not blind to it."""
    config, state, theirs = saved_folder(TINY_CHURCH | dict(attention_head_dim=8), tmp_path)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    with torch.no_grad():
        expected = theirs(x, t).sample
        for change in [
            dict(sin_first=False), dict(freq_shift=0), dict(norm_eps=1e-3),
            dict(downsample_padding="symmetric"), dict(num_head_channels=16),
        ]:  # fmt: skip
            ours = UNet(**unet_options(config) | change).eval()
            ours.load_state_dict(convert_unet(state, ours))
            assert max_relative(ours(x, t), expected) > 1e-3, change


def test_old_attention_names_and_conv_shaped_weights(tmp_path):
    """Pre-0.14 checkpoints name the attention query / key / value / proj_attn (the hub's
    google/ddpm-* weights); 1×1-conv-shaped weights are squeezed."""
    config, state, theirs = saved_folder(TINY_CIFAR10, tmp_path)
    old = {}
    for key, value in state.items():
        for new, legacy in [("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                            ("to_out.0", "proj_attn")]:  # fmt: skip
            if f".{new}." in key:
                key = key.replace(f".{new}.", f".{legacy}.")
                value = value[..., None, None] if value.dim() == 2 else value
        old[key] = value
    assert any(".query." in key for key in old)
    ours, x, t = our_unet(config, old), torch.randn(2, 3, 16, 16), torch.tensor([5, 900])
    with torch.no_grad():
        assert max_relative(ours(x, t), theirs(x, t).sample) < 1e-5


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_layouts_have_diffusers_parameters(name):
    """The full published layouts on the meta device: the same parameter count, and every
    converted tensor has our parameter's shape."""
    with torch.device("meta"):
        theirs = diffusers.UNet2DModel(**PUBLISHED[name])
        ours = UNet(**unet_options(PUBLISHED[name]))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    converted = convert_unet(theirs.state_dict(), ours)
    assert {k: v.shape for k, v in converted.items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }
    assert count == {"ddpm-cifar10-32": 35_746_307, "ddpm-church-256": 113_673_219}[name]


def test_published_options():
    """What the import writes for google/ddpm-cifar10-32: the original DDPM's choices."""
    options = unet_options(CIFAR10)
    assert options == dict(
        in_channels=3, out_channels=3, image_size=32, base_channels=128, channel_mult=(1, 2, 2, 2),
        num_res_blocks=2, attention_resolutions=(16,), num_head_channels=8, dropout=0.0,
        num_groups=32, scale_shift_norm=False, norm_eps=1e-6, sin_first=True, freq_shift=1,
        downsample_padding="asymmetric",
    )  # fmt: skip
    church = unet_options(CHURCH)
    assert church["attention_resolutions"] == (16,) and church["num_heads"] == 1
    assert church["channel_mult"] == (1, 1, 2, 2, 4, 4)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]), r"down_block_types\[1\]"),
        (dict(up_block_types=["UpBlock2D", "UpBlock2D"]), "up_block_types=.*must mirror"),
        (dict(up_block_types=["UpBlock2D"]), "one entry per level"),
        (dict(time_embedding_type="fourier"), "time_embedding_type='fourier'"),
        (dict(center_input_sample=True), "center_input_sample"),
        (dict(downsample_padding=2), "downsample_padding=2"),
        (dict(downsample_type="resnet"), "downsample_type='resnet'"),
        (dict(mid_block_scale_factor=1.414), "mid_block_scale_factor"),
        (dict(act_fn="gelu"), "act_fn='gelu'"),
        (dict(class_embed_type="timestep"), "class_embed_type"),
        (dict(attention_head_dim=24), "attention_head_dim=24"),
        (dict(attn_norm_num_groups=8), "attn_norm_num_groups"),
        (dict(time_embedding_dim=100), "time_embedding_dim=100"),
        (dict(sample_size=None), "sample_size=None"),
        (dict(sample_size=[16, 32]), "not square"),
        (dict(block_out_channels=[32, 48]), None),  # a fractional width: expressible
        (dict(block_out_channels=[32, 0]), "block_out_channels"),
        (dict(block_out_channels=[]), "block_out_channels"),
        (dict(attention_head_dim=[8, 8]), "attention_head_dim=.8, 8. must be None or"),
        (dict(cross_attention_dim=64), r"unknown key\(s\) \['cross_attention_dim'\]"),
    ],
)
def test_unsupported_unet_configs_are_named(change, match):
    if match is None:
        UNet(**unet_options(TINY_CIFAR10 | change | dict(norm_num_groups=16)))
        return
    with pytest.raises(UnsupportedConfig, match=match):
        unet_options(TINY_CIFAR10 | change)


def test_unmapped_keys_are_named():
    ours = UNet(**unet_options(TINY_CIFAR10))
    with pytest.raises(KeyError, match="down_blocks.0.resnets.0.norm3.weight"):
        convert_unet({"down_blocks.0.resnets.0.norm3.weight": torch.zeros(1)}, ours)
    with pytest.raises(KeyError, match="q, k and v"):
        convert_unet({"down_blocks.1.attentions.0.to_q.weight": torch.zeros(64, 64)}, ours)


SCHEDULERS = {
    "google/ddpm-*": dict(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        num_train_timesteps=1000,
        clip_sample=True,
        variance_type="fixed_small",
        trained_betas=None,
    ),  # fmt: skip
    "linear, T = 500": dict(num_train_timesteps=500, beta_end=0.03),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=4000),
    "defaults": {},
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedules_equal_diffusers(name):
    config = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1"} | SCHEDULERS[name]
    options = ddpm_options(config)
    assert options["schedule"]["class_path"] == "diffusion_apps.diffusion.NoiseSchedule"
    ours = NoiseSchedule(**options["schedule"]["init_args"])
    theirs = diffusers.DDPMScheduler(**SCHEDULERS[name])
    assert ours.num_timesteps == len(theirs.alphas_cumprod)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.betas, theirs.betas, rtol=1e-5, atol=1e-7)


def test_scheduler_options():
    google = ddpm_options(SCHEDULERS["google/ddpm-*"])
    assert google["schedule"]["init_args"] == dict(
        kind="linear", num_timesteps=1000, beta_start=0.0001, beta_end=0.02
    )
    assert (google["prediction"], google["variance"], google["clip_x0"]) == (
        "eps",
        "beta_tilde",
        True,
    )
    for theirs, ours in [("epsilon", "eps"), ("sample", "x0"), ("v_prediction", "v")]:
        assert ddpm_options(dict(prediction_type=theirs))["prediction"] == ours
    for theirs, ours in [("fixed_small", "beta_tilde"), ("fixed_large", "beta"),
                         ("learned_range", "learned")]:  # fmt: skip
        assert ddpm_options(dict(variance_type=theirs))["variance"] == ours
    assert ddpm_options(dict(clip_sample=False, clip_sample_range=3.0))["clip_x0"] is False


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(_class_name="DDIMScheduler"), "_class_name='DDIMScheduler'"),
        (dict(beta_schedule="sigmoid"), "beta_schedule='sigmoid'"),
        (dict(trained_betas=[0.1, 0.2]), "trained_betas"),
        (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
        (dict(thresholding=True), "thresholding"),
        (dict(clip_sample_range=2.0), "clip_sample_range=2.0"),
        (dict(variance_type="learned"), "variance_type='learned'"),
        (dict(prediction_type="flow"), "prediction_type='flow'"),
        (dict(num_train_timesteps=0), "num_train_timesteps=0"),
        (dict(beta_strat=0.1), r"unknown key\(s\) \['beta_strat'\]"),
    ],
)
def test_unsupported_scheduler_configs_are_named(change, match):
    with pytest.raises(UnsupportedConfig, match=match):
        ddpm_options(change)
