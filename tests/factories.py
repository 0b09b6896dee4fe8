"""Tiny networks shared by the tests, their inputs, and random weights for them.

Every builder takes keyword overrides for any argument of the class it builds. The networks'
output convs start at zero (output ≡ 0), so tests that need a network to compute something
give it random weights with :func:`randomize_` first.
"""

import torch
from torch import Tensor, nn

from diffusion_apps.nn import EncoderUNet, UNet

# -- tests/nn: a two-channel 8×8 UNet, attention at 8×8 and in the middle block ---------------

TINY_NN = dict(
    in_channels=2,
    image_size=8,
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    num_head_channels=4,
    num_groups=2,
)
B = 3  # the batch of unet_inputs
CONDITIONINGS = {
    "none": {},
    "class": dict(num_classes=4),
    "diffae": dict(cond_dim=6),
    "pdae": dict(cond_dim=6, cond_shift=True),
    "ldm": dict(context_dim=5, transformer_depth=2),
    "all": dict(num_classes=4, cond_dim=6, cond_shift=True, context_dim=5),
}
ARCHS = {
    "tiny": {},
    "updown": dict(resblock_updown=True),
    "three_levels": dict(
        image_size=16, channel_mult=(1, 2, 2), attention_resolutions=(8, 4), num_res_blocks=2
    ),
    "no_attention_levels": dict(attention_resolutions=(), out_channels=4),
    # the options of the official ADM / iDDPM layouts: additive time embedding, fixed head
    # counts (2 down and in the middle, 4 up), fractional channel_mult (8, 16 channels)
    "adm_options": dict(
        scale_shift_norm=False,
        num_head_channels=None,
        num_heads=2,
        num_heads_upsample=4,
        base_channels=16,
        channel_mult=(0.5, 1),
    ),
}


def unet_inputs(model: UNet, batch: int = B, seed: int = 0) -> dict:
    """Random (x, t, and whatever conditioning ``model`` was built with)."""
    g = torch.Generator().manual_seed(seed)
    s, c = model.image_size, model.in_channels
    kw = dict(
        x=torch.randn(batch, c, s, s, generator=g), t=torch.randint(0, 1000, (batch,), generator=g)
    )
    if model.num_classes:
        kw["y"] = torch.randint(0, model.num_classes + 1, (batch,), generator=g)
    if model.cond_dim:
        kw["cond"] = torch.randn(batch, model.cond_dim, generator=g)
    if model.context_dim:
        kw["context"] = torch.randn(batch, 3, model.context_dim, generator=g)
    return kw


# -- tests/methods: one-channel 16×16 networks, one ResBlock per level, 8-channel heads ----------

TINY_METHODS = dict(
    in_channels=1,
    image_size=16,
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    num_head_channels=8,
    num_groups=2,
)


def tiny_unet(**overrides) -> UNet:
    """A UNet on TINY_METHODS with attention at 8×8."""
    return UNet(**{**TINY_METHODS, "attention_resolutions": (8,), **overrides})


def tiny_encoder(**overrides) -> EncoderUNet:
    """DiffAE's and PDAE's semantic encoder on TINY_METHODS: no attention levels, a 16-d code,
    no time embedding."""
    kw = dict(attention_resolutions=(), out_dim=16, time_conditioned=False)
    return EncoderUNet(**{**TINY_METHODS, **kw, **overrides})


# -- random weights ---------------------------------------------------------------------------


def randomize_(module: nn.Module, std: float, seed: int | None = None) -> nn.Module:
    """Overwrite every parameter (zero-initialised ones included) with N(0, std²) noise, drawn
    after ``torch.manual_seed(seed)`` if a seed is given, else from the global generator as it
    stands; returns ``module``."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


# -- patches, written out without torch's pixel_(un)shuffle ----------------------------------


def fold_patches(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) → (B, p²C, H/p, W/p): channel c·p² + i·p + j of a position is pixel (i, j)
    of channel c in its p×p patch."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * p * p, h // p, w // p)


def unfold_patches(y: Tensor, p: int) -> Tensor:
    """The inverse of :func:`fold_patches`."""
    b, cpp, h, w = y.shape
    c = cpp // (p * p)
    return y.reshape(b, c, p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * p, w * p)


# Stable Diffusion's VAE layout at a tiny width (f = 2, 4 latent channels, 32 px): the
# constructor arguments of a diffusers AutoencoderKL.
TINY_SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
    layers_per_block=1, norm_num_groups=32, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)  # fmt: skip


def randomize_norms_around_one_(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Every weight and bias N(0, std²), but group norms' γ N(1, std²): random weights for
    another codebase's network whose outputs ours must match (its zero-initialised output convs
    would make them trivially equal), small enough that nothing saturates. In eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            norm_scale = p.dim() == 1 and name.endswith("weight")  # only norms' γ are 1-D
            p.copy_(std * torch.randn(p.shape, generator=gen) + float(norm_scale))
    return module.eval()
