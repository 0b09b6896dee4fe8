"""Every released ADM (openai/guided-diffusion) and iDDPM (openai/improved-diffusion) layout is a
UNet / EncoderUNet option set: equal parameter counts and, after loading the official weights
through the test mapping below, equal outputs.

improved-diffusion's UNetModel is guided-diffusion's with num_head_channels=-1, the legacy
attention order and no resblock_updown (same modules, same state-dict keys), so its layouts are
built here with ``guided_diffusion.unet.UNetModel`` too.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from guided_diffusion import script_util as gs
from guided_diffusion import unet as gu
from torch import nn

from diffusion_apps.nn import EncoderUNet, UNet
from diffusion_apps.nn.layers import ResBlock

# -- the options of ours equivalent to an official model ---------------------------------------


def our_options(official: nn.Module, image_size: int) -> dict:
    """UNet / EncoderUNet keyword arguments of the official UNetModel / EncoderUNetModel."""
    res = [m for m in official.modules() if isinstance(m, gu.ResBlock)]
    if official.num_head_channels != -1:
        heads = dict(num_head_channels=official.num_head_channels)
    else:
        heads = dict(num_heads=official.num_heads)
        if isinstance(official, gu.UNetModel):
            heads["num_heads_upsample"] = official.num_heads_upsample
    kw = dict(
        in_channels=official.in_channels,
        image_size=image_size,
        base_channels=official.model_channels,
        channel_mult=tuple(official.channel_mult),
        num_res_blocks=official.num_res_blocks,
        attention_resolutions=tuple(image_size // ds for ds in official.attention_resolutions),
        resblock_updown=any(m.updown for m in res),
        scale_shift_norm=res[0].use_scale_shift_norm,
        **heads,
    )
    if isinstance(official, gu.UNetModel):
        return dict(
            kw, out_channels=official.out_channels, num_classes=official.num_classes,
            null_label=False,
        )  # fmt: skip
    pool = {"adaptive": "avg", "attention": "attention"}[official.pool]
    return dict(kw, out_dim=official.out_channels, pool=pool)


def ours_like(official: nn.Module, image_size: int) -> nn.Module:
    cls = UNet if isinstance(official, gu.UNetModel) else EncoderUNet
    return cls(**our_options(official, image_size))


# -- a test-only state-dict mapping (the real converter is diffusion_apps.interop) --------------

RESBLOCK = {
    "in_layers.0": "in_norm", "in_layers.2": "in_conv", "emb_layers.1": "emb_proj",
    "out_layers.0": "out_norm", "out_layers.3": "out_conv", "skip_connection": "skip",
}  # fmt: skip


def our_key(k: str) -> str:
    k = re.sub(r"^input_blocks\.0\.0\.", "down.conv_in.", k)
    k = re.sub(r"^input_blocks\.(\d+)\.", lambda m: f"down.blocks.{int(m[1]) - 1}.", k)
    k = re.sub(r"^middle_block\.", "down.middle.", k)
    k = re.sub(r"^output_blocks\.", "up.", k)
    k = re.sub(r"^label_emb\.", "label_embed.", k)
    k = re.sub(r"^out\.0\.", "out_norm.", k)
    k = re.sub(r"^out\.2\.", "out_conv.", k)  # the UNet's output conv
    for theirs, ours in RESBLOCK.items():
        k = k.replace(f".{theirs}.", f".{ours}.")
    return k.replace(".qkv.", ".attn.qkv.").replace(".proj_out.", ".attn.out.").replace(".op.", ".")


def our_state_dict(official: nn.Module) -> dict[str, torch.Tensor]:
    """The official model's weights under our names: 1-D convs as linears, legacy-order qkv rows
    (head, {q,k,v}, d) as ours ({q,k,v}, head, d), the attention pool's positions as (L, C)
    and its qkv split into q and kv."""
    legacy = {
        name + ".qkv.": m.num_heads
        for name, m in official.named_modules()
        if isinstance(m, gu.AttentionBlock) and isinstance(m.attention, gu.QKVAttentionLegacy)
    }
    pooled = isinstance(official, gu.EncoderUNetModel)
    out = {}
    for k, v in official.state_dict().items():
        if v.ndim == 3:  # conv1d (O, I, 1)
            v = v[..., 0]
        if pooled and k.startswith("out."):
            if k == "out.2.positional_embedding":
                out["head.pos"] = v.t()
            elif k.startswith("out.2.qkv_proj."):
                C = v.shape[0] // 3
                out["head.q." + k.rsplit(".", 1)[1]] = v[:C]
                out["head.kv." + k.rsplit(".", 1)[1]] = v[C:]
            elif k.startswith("out.2.c_proj."):
                out["head.out." + k.rsplit(".", 1)[1]] = v
            elif k.startswith("out.3."):  # adaptive pool's 1x1 conv
                out["head." + k[6:]] = v.flatten(1) if v.ndim == 4 else v
            else:
                out[our_key(k)] = v
            continue
        prefix = next((p for p in legacy if k.startswith(p)), None)
        if prefix is not None:
            heads = legacy[prefix]
            v = v.reshape(heads, 3, -1, *v.shape[1:]).transpose(0, 1).reshape(v.shape)
        out[our_key(k)] = v
    return out


def randomize_fan_in_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights with unit-variance activations (zero-initialised layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return module


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def assert_same_layout(official: nn.Module, ours: nn.Module) -> None:
    mapped = {k: tuple(v.shape) for k, v in our_state_dict(official).items()}
    assert mapped == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert n_params(ours) == n_params(official)


# -- the released layouts, full size, on the meta device (no memory, no init cost) -------------

NUM_CLASSES = 1000
ADM = dict(learn_sigma=True, attention_resolutions="32,16,8", resblock_updown=True,
           use_scale_shift_norm=True)  # fmt: skip


def sr_model(large: int, attention: str, **heads) -> nn.Module:
    kw = dict(num_heads=4, num_head_channels=-1, num_heads_upsample=-1) | heads  # defaults
    return gs.sr_create_model(
        large, 0, 192, 2, learn_sigma=True, class_cond=True, use_checkpoint=False,
        attention_resolutions=attention, use_scale_shift_norm=True, dropout=0,
        resblock_updown=True, use_fp16=False, **kw,
    )  # fmt: skip


def iddpm(image_size: int, channels: int, blocks: int, **kw) -> nn.Module:
    """improved-diffusion's create_model (its defaults: 4 heads, attention at 16 and 8)."""
    mult = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}[image_size]
    attention = kw.pop("attention_resolutions", (16, 8))
    return gu.UNetModel(
        image_size, 3 * (1 + kw.pop("super_res", False)), channels, 6, blocks,
        tuple(image_size // r for r in attention), channel_mult=mult,
        num_classes=NUM_CLASSES if kw.pop("class_cond", False) else None,
        num_heads=kw.pop("num_heads", 4), use_scale_shift_norm=kw.pop("use_scale_shift_norm", True),
    )  # fmt: skip


RELEASED = {  # the README flags of each released checkpoint
    "adm_64_cond": lambda: gs.create_model(
        64, 192, 3, class_cond=True, num_head_channels=64, use_new_attention_order=True, **ADM
    ),
    "adm_128_cond": lambda: gs.create_model(128, 256, 2, class_cond=True, num_heads=4, **ADM),
    "adm_256_cond": lambda: gs.create_model(
        256, 256, 2, class_cond=True, num_head_channels=64, **ADM
    ),
    "adm_256_uncond_and_lsun": lambda: gs.create_model(256, 256, 2, num_head_channels=64, **ADM),
    "adm_512_cond": lambda: gs.create_model(
        512, 256, 2, class_cond=True, num_head_channels=64, **ADM
    ),
    "adm_upsampler_64_256": lambda: sr_model(256, "32,16,8", num_heads=4),
    "adm_upsampler_128_512": lambda: sr_model(512, "32,16", num_head_channels=64),
    **{
        f"adm_classifier_{s}": (
            lambda s=s: gs.create_classifier(
                s, False, 128, 4 if s == 64 else 2, "32,16,8", True, True, "attention"
            )  # fmt: skip
        )
        for s in (64, 128, 256, 512)
    },
    "iddpm_cifar10": lambda: iddpm(32, 128, 3),
    "iddpm_imagenet64_uncond": lambda: iddpm(64, 128, 3),
    "iddpm_imagenet64_cond": lambda: iddpm(64, 192, 3, class_cond=True),
    "iddpm_upsampler_256": lambda: iddpm(256, 192, 2, class_cond=True, super_res=True),
    "iddpm_lsun_bedroom": lambda: iddpm(
        256, 128, 2, num_heads=1, use_scale_shift_norm=False, attention_resolutions=(16,)
    ),
}


@pytest.mark.parametrize("name", RELEASED)
def test_every_released_layout_has_the_official_parameters(name):
    with torch.device("meta"):
        official = RELEASED[name]()
        size = official.image_size if hasattr(official, "image_size") else int(name.split("_")[-1])
        ours = ours_like(official, size)
    assert_same_layout(official, ours)


# -- tiny layouts, every option value: the official outputs after loading its weights ---------

TINY = dict(
    image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
    attention_resolutions=(1, 2), channel_mult=(1, 2), num_head_channels=8,
    use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True,
)  # fmt: skip
HEADS = dict(num_head_channels=-1, num_heads=2)  # 16- and 32-wide heads at widths 32 and 64
LEGACY = dict(use_new_attention_order=False)  # iDDPM's, and ADM's but for the 64x64 model
TINY_LAYOUTS = {
    "head_channels_labels": dict(num_classes=10),
    "head_channels_legacy": dict(LEGACY, num_classes=10),
    "no_scale_shift_norm": dict(use_scale_shift_norm=False),
    "num_heads": dict(HEADS),
    "num_heads_legacy_no_updown": dict(HEADS, **LEGACY, resblock_updown=False, num_classes=10),
    "num_heads_upsample": dict(HEADS, **LEGACY, num_heads_upsample=4),
    "iddpm_lsun_like": dict(
        LEGACY, num_head_channels=-1, num_heads=1, use_scale_shift_norm=False, resblock_updown=False
    ),
    "fractional_mult": dict(LEGACY, model_channels=64, channel_mult=(0.5, 1), num_classes=10),
}


def close_to(ours: torch.Tensor, official: torch.Tensor) -> None:
    assert official.abs().max() > 0.1  # the comparison is not of (near) zeros
    torch.testing.assert_close(ours, official, rtol=1e-4, atol=1e-4 * official.abs().max().item())


@pytest.mark.parametrize("layout", TINY_LAYOUTS)
def test_tiny_unet_layouts_compute_the_official_outputs(layout):
    kw = {**TINY, **TINY_LAYOUTS[layout]}
    official = randomize_fan_in_(gu.UNetModel(**kw)).eval()
    ours = ours_like(official, kw["image_size"]).eval()
    assert n_params(ours) == n_params(official)
    ours.load_state_dict(our_state_dict(official), strict=True)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([3.0, 517.5])
    y = torch.tensor([0, 9]) if kw.get("num_classes") else None
    with torch.no_grad():
        close_to(ours(x, t, y), official(x, t, y=y))


TINY_ENCODERS = {
    "attention_pool_legacy": dict(LEGACY, pool="attention"),
    "adaptive_pool_num_heads_no_scale_shift_norm": dict(
        HEADS, pool="adaptive", use_scale_shift_norm=False
    ),
    "attention_pool_fractional_mult": dict(
        model_channels=64, channel_mult=(0.5, 1), pool="attention"
    ),
}


@pytest.mark.parametrize("layout", TINY_ENCODERS)
def test_tiny_encoder_layouts_compute_the_official_outputs(layout):
    kw = {**TINY, "out_channels": 5, "num_res_blocks": 2, **TINY_ENCODERS[layout]}
    official = randomize_fan_in_(gu.EncoderUNetModel(**kw)).eval()
    ours = ours_like(official, kw["image_size"]).eval()
    assert n_params(ours) == n_params(official)
    ours.load_state_dict(our_state_dict(official), strict=True)
    x, t = (
        torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
        torch.tensor([3, 800]),
    )
    with torch.no_grad():
        close_to(ours(x, t), official(x, t))


@pytest.mark.parametrize("resample", ["none", "up", "down"])
@pytest.mark.parametrize("scale_shift_norm", [True, False])
def test_resblock_is_the_official_one(scale_shift_norm, resample):
    official = gu.ResBlock(
        32, 48, dropout=0.0, out_channels=64, use_scale_shift_norm=scale_shift_norm,
        up=resample == "up", down=resample == "down",
    )  # fmt: skip
    ours = ResBlock(32, 64, emb_dim=48, resample=resample, scale_shift_norm=scale_shift_norm)
    randomize_fan_in_(official)
    ours.load_state_dict({our_key("." + k)[1:]: v for k, v in official.state_dict().items()})
    g = torch.Generator().manual_seed(1)
    x, emb = torch.randn(2, 32, 8, 8, generator=g), torch.randn(2, 48, generator=g)
    n_emb = 2 * 64 if scale_shift_norm else 64
    assert ours.emb_proj.out_features == n_emb and n_params(ours) == n_params(official)
    with torch.no_grad():
        close_to(ours(x, F.silu(emb)), official(x, emb))  # ours takes SiLU(emb)
