"""guided-diffusion's own networks (guided-diffusion-sdk, openai's code) against ours built from
the same flags, with its state dict converted: every output channel equal to 1e-5 relative in
fp32. The official weights are re-randomised first (its zero-initialised convs would make the
outputs trivially equal)."""

import warnings

import pytest
import torch

from diffusion_apps.interop.guided_diffusion import (
    CLASSIFIER_DEFAULTS,
    GUIDED_DEFAULTS,
    IMPROVED_DEFAULTS,
    classifier_options,
    convert_classifier,
    convert_unet,
    legacy_attention,
    parse_flags,
    unet_options,
)
from diffusion_apps.nn import EncoderUNet, UNet

with warnings.catch_warnings():  # its fp16 helpers use deprecated torch.cuda.amp decorators
    warnings.simplefilter("ignore")
    from guided_diffusion import script_util
    from guided_diffusion import unet as official_unet

ADM_64 = (  # guided-diffusion's README, 64x64 class-conditional
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 64 "
    "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 "
    "--num_res_blocks 3 --resblock_updown True --use_new_attention_order True --use_fp16 True "
    "--use_scale_shift_norm True"
)
# the layout, narrow (its GroupNorm has 32 groups)
SMALL = "--num_channels 32 --num_head_channels 8 --num_res_blocks 1"
LAYOUTS = {
    "adm64": f"{ADM_64} {SMALL}",
    "unconditional": f"{ADM_64} {SMALL} --class_cond False --learn_sigma False",
    "no_updown": f"{ADM_64} {SMALL} --resblock_updown False",
    "legacy_attention": f"{ADM_64} {SMALL} --use_new_attention_order False",
    "no_scale_shift": f"{ADM_64} {SMALL} --use_scale_shift_norm False",
    "head_count": f"{ADM_64} {SMALL} --num_head_channels -1 --num_heads 2 "
    "--num_heads_upsample 4 --use_new_attention_order False",  # iDDPM's kind of attention
}


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen) + (1.0 if p.dim() == 1 else 0.0))
    return module


def official_model(flags: dict) -> torch.nn.Module:
    names = script_util.model_and_diffusion_defaults().keys() & set(
        script_util.create_model.__code__.co_varnames
    )
    fp32 = {k: flags[k] for k in names} | {"use_fp16": False}  # its fp16 casts the convs only
    return script_util.create_model(**fp32).eval()


def assert_close_relative(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-5) -> float:
    relative = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert relative < tol, relative
    return relative


def test_our_defaults_are_the_official_ones():
    assert script_util.model_and_diffusion_defaults() == GUIDED_DEFAULTS
    assert script_util.classifier_defaults() == CLASSIFIER_DEFAULTS


@pytest.mark.parametrize("source", ["guided-diffusion", "improved-diffusion"])
def test_use_checkpoint_is_our_gradient_checkpointing(source):
    defaults = GUIDED_DEFAULTS if source == "guided-diffusion" else IMPROVED_DEFAULTS
    on = unet_options(parse_flags("--use_checkpoint True", defaults), source)
    off = unet_options(parse_flags("--use_checkpoint False", defaults), source)
    assert on.pop("gradient_checkpointing") is True and on == off


@pytest.mark.parametrize("layout", LAYOUTS)
def test_converted_unet_computes_what_the_official_one_does(layout):
    flags = parse_flags(LAYOUTS[layout], GUIDED_DEFAULTS)
    theirs = randomize_(official_model(flags))
    ours = UNet(**unet_options(flags)).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    ours.load_state_dict(
        convert_unet(theirs.state_dict(), ours, legacy_attention(flags, "guided-diffusion"))
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 64, 64, generator=gen)
    t = torch.tensor([0, 417, 999])
    y = torch.tensor([3, 999, 0]) if flags["class_cond"] else None
    with torch.no_grad():
        expected = theirs(x, t, y)
        got = ours(x, t, y=y) if y is not None else ours(x, t)
    assert got.shape == expected.shape == (3, 6 if flags["learn_sigma"] else 3, 64, 64)
    assert_close_relative(got, expected)


@pytest.mark.parametrize("pool", ["attention", "adaptive"])
def test_converted_classifier_computes_what_the_official_one_does(pool):
    """The official classifier at a narrow width (its heads of 64 channels made 8)."""
    flags = parse_flags(f"--classifier_pool {pool} --classifier_depth 1", CLASSIFIER_DEFAULTS)
    options = classifier_options(flags) | dict(base_channels=32, num_head_channels=8)
    theirs = official_unet.EncoderUNetModel(
        image_size=64, in_channels=3, model_channels=32, out_channels=1000, num_res_blocks=1,
        attention_resolutions=(2, 4, 8), channel_mult=(1, 2, 3, 4), num_head_channels=8,
        use_scale_shift_norm=True, resblock_updown=True, pool=pool,
    ).eval()  # fmt: skip
    randomize_(theirs)
    ours = EncoderUNet(**options).eval()
    ours.load_state_dict(convert_classifier(theirs.state_dict(), ours))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([5, 800])
    with torch.no_grad():
        assert_close_relative(ours(x, t), theirs(x, t))


def test_the_released_64x64_layouts_have_the_official_parameter_counts():
    """Full width, built on the meta device: no memory, no time."""
    flags = parse_flags(ADM_64, GUIDED_DEFAULTS)
    with torch.device("meta"):
        ours, theirs = UNet(**unet_options(flags)), official_model(flags)
        ours_c = EncoderUNet(**classifier_options(parse_flags("", CLASSIFIER_DEFAULTS)))
        theirs_c = script_util.create_classifier(**script_util.classifier_defaults())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs) == 295_904_454
    assert count(ours_c) == count(theirs_c)


def test_bad_flags_are_named():
    with pytest.raises(ValueError, match="unknown flag '--num_chanels'; valid: .*num_channels"):
        parse_flags("--num_chanels 64", GUIDED_DEFAULTS)
    with pytest.raises(ValueError, match="--class_cond 'maybe' is not a bool"):
        parse_flags("--class_cond maybe", GUIDED_DEFAULTS)
    with pytest.raises(ValueError, match="'--image_size' has no value"):
        parse_flags("--image_size", GUIDED_DEFAULTS)
    with pytest.raises(ValueError, match="no default channel_mult for image_size 48"):
        unet_options(parse_flags("--image_size 48", GUIDED_DEFAULTS))


def test_an_improved_diffusion_model_sees_the_rescaled_timesteps():
    """iDDPM's CIFAR-10 flags (4,000 cosine steps, learned Σ, 4 heads in the legacy order,
    narrowed): its sampler feeds the network t·1000/T (``rescale_timesteps``), ours the index t
    to a UNet that rescales it. The official network is guided-diffusion's UNetModel with
    iDDPM's options (improved-diffusion is not on PyPI; its UNet is the same code)."""
    from diffusion_apps.interop.guided_diffusion import IMPROVED_DEFAULTS

    flags = parse_flags(
        "--image_size 32 --num_channels 32 --num_res_blocks 1 --learn_sigma True "
        "--dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine", IMPROVED_DEFAULTS,
    )  # fmt: skip
    theirs = official_unet.UNetModel(
        image_size=32, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
        attention_resolutions=(2, 4), dropout=0.3, channel_mult=(1, 2, 2, 2), num_heads=4,
        use_scale_shift_norm=True,
    )  # fmt: skip
    randomize_(theirs).eval()
    ours = UNet(**unet_options(flags, "improved-diffusion")).eval()
    assert legacy_attention(flags, "improved-diffusion")
    ours.load_state_dict(convert_unet(theirs.state_dict(), ours, legacy_attention=True))
    x, t = (
        torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)),
        torch.tensor([1, 3999]),
    )
    with torch.no_grad():
        assert_close_relative(ours(x, t), theirs(x, t * 1000 / 4000))
        assert not torch.allclose(ours(x, t), theirs(x, t), rtol=1e-3)  # the rescale matters
