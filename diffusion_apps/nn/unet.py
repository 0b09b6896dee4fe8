"""The ADM UNet (Dhariwal & Nichol 2021) and the down / up paths it is built from.

One class covers every method: class labels (with a null label for classifier-free guidance),
a conditioning vector applied by adaptive group norm in every ResBlock (DiffAE's z_sem, PDAE's
z), and cross-attention to a context sequence (LDM). The encoder half (``EncoderUNet``) and
PDAE's ``GradientEstimator`` reuse these paths (nn/encoders.py). Its options also express every
released ADM / iDDPM layout (openai/guided-diffusion, openai/improved-diffusion), parameter for
parameter (tests/nn/test_nn_official_layouts.py), and the original DDPM's as diffusers publishes
it (google/ddpm-*: interop/diffusers_unet.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_apps.nn.checks import (
    check_architecture,
    check_bool,
    check_choices,
    check_conditioning,
    check_positive,
    check_t,
    check_x,
    level_channels,
    resolve_heads,
)
from diffusion_apps.nn.layers import (
    BlockSpec,
    GroupNorm,
    TimeEmbedding,
    Upsample,
    downsample,
    zero_,
)


class DownPath(nn.Module):
    """conv_in, the downsampling levels and the middle block (ResBlock, attention, ResBlock).

    The one builder shared by ``UNet`` and ``EncoderUNet``; its ``spec`` and layout let
    :class:`UpPath` mirror it.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        base_channels: int,
        channel_mult: Sequence[int | float],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        num_head_channels: int | None,
        dropout: float,
        num_groups: int,
        resblock_updown: bool,
        emb_dim: int | None,
        cond_dim: int | None = None,
        cond_shift: bool = False,
        context_dim: int | None = None,
        transformer_depth: int = 1,
        scale_shift_norm: bool = True,
        num_heads: int | None = None,
        num_heads_upsample: int | None = None,
        norm_eps: float = 1e-5,
        downsample_padding: Literal["symmetric", "asymmetric"] = "symmetric",
        middle_attention: bool = True,
        middle_attention_norm: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_positive(
            in_channels=in_channels, image_size=image_size, base_channels=base_channels,
            num_res_blocks=num_res_blocks, num_groups=num_groups, cond_dim=cond_dim,
            context_dim=context_dim, transformer_depth=transformer_depth,
        )  # fmt: skip
        head_dim, num_heads, num_heads_up = resolve_heads(
            num_head_channels, num_heads, num_heads_upsample
        )
        check_architecture(
            image_size, base_channels, channel_mult, attention_resolutions, head_dim,
            num_groups, dropout, num_heads, num_heads_up, middle_attention,
        )  # fmt: skip
        check_choices(norm_eps, downsample_padding, middle_attention, middle_attention_norm)
        check_bool(gradient_checkpointing=gradient_checkpointing)
        if cond_shift and cond_dim is None:
            raise ValueError("cond_shift=True requires cond_dim")
        self.spec = BlockSpec(
            emb_dim, cond_dim, cond_shift, dropout, num_groups, head_dim, context_dim,
            transformer_depth, scale_shift_norm, num_heads, num_heads_up, norm_eps,
            middle_attention, middle_attention_norm, gradient_checkpointing,
        )  # fmt: skip
        self.base_channels, self.channel_mult = base_channels, tuple(channel_mult)
        self.level_channels = level_channels(base_channels, channel_mult)  # int(mult · base)
        self.num_res_blocks, self.resblock_updown = num_res_blocks, resblock_updown
        self.attention_resolutions = tuple(attention_resolutions)

        ch, res = self.level_channels[0], image_size
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.skip_channels = [ch]  # channels of every tensor the up path concatenates
        for level, width in enumerate(self.level_channels):
            for _ in range(num_res_blocks):
                layers = [self.spec.res_block(ch, width)]
                ch = width
                if res in attention_resolutions:
                    layers.append(self.spec.attention(ch))
                self.blocks.append(self.spec.sequence(*layers))
                self.skip_channels.append(ch)
            if level < len(self.level_channels) - 1:
                if resblock_updown:
                    down = self.spec.res_block(ch, ch, "down")
                else:
                    down = downsample(ch, downsample_padding)
                self.blocks.append(self.spec.sequence(down))
                self.skip_channels.append(ch)
                res //= 2
        self.middle = self.spec.middle(ch)
        self.out_channels, self.out_resolution = ch, res

    def levels(
        self, x: Tensor, emb: Tensor | None = None, cond: Tensor | None = None,
        context: Tensor | None = None, skips: list[Tensor] | None = None,
    ) -> Tensor:  # fmt: skip
        """The last level's output, before the middle block; appends each skip tensor to
        ``skips`` if given."""
        h = self.conv_in(x)
        if skips is not None:
            skips.append(h)
        for block in self.blocks:
            h = block(h, emb, cond, context)
            if skips is not None:
                skips.append(h)
        return h

    def forward(
        self, x: Tensor, emb: Tensor | None = None, cond: Tensor | None = None,
        context: Tensor | None = None, skips: list[Tensor] | None = None,
    ) -> Tensor:  # fmt: skip
        """The middle block's output; appends each skip tensor to ``skips`` if given."""
        return self.middle(self.levels(x, emb, cond, context, skips), emb, cond, context)


class UpPath(nn.ModuleList):
    """The up path mirroring ``down``: num_res_blocks + 1 blocks per level, each consuming one
    skip tensor, the last block of every level but the top one ending in an upsample. Built
    with ``spec`` (``down.spec`` for the UNet; PDAE's gradient estimator conditions its own),
    whose up-path head count (``num_heads_upsample``) its attention blocks take."""

    def __init__(self, down: DownPath, spec: BlockSpec) -> None:
        super().__init__()
        skips = list(down.skip_channels)
        ch, res = down.out_channels, down.out_resolution
        for level, width in reversed(list(enumerate(down.level_channels))):
            for i in range(down.num_res_blocks + 1):
                layers = [spec.res_block(ch + skips.pop(), width)]
                ch = width
                if res in down.attention_resolutions:
                    layers.append(spec.attention(ch, up=True))
                if level > 0 and i == down.num_res_blocks:
                    up = spec.res_block(ch, ch, "up") if down.resblock_updown else Upsample(ch)
                    layers.append(up)
                    res *= 2
                self.append(spec.sequence(*layers))
        self.out_channels = ch

    def forward(
        self, h: Tensor, skips: list[Tensor], emb: Tensor | None = None,
        cond: Tensor | None = None, context: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Run the blocks from the middle block's output ``h``, popping ``skips`` (consumed)."""
        for block in self:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, cond, context)  # (B, C+C_s, H, W)
        return h


class DownFeatures(NamedTuple):
    """What a UNet's down path computed for (x, t): what the rest of the net, or a second head
    on the same features (PDAE's gradient estimator), needs."""

    h: Tensor  # the last level's output, before the middle block
    skips: list[Tensor]  # every skip tensor, in the order the down path made them
    emb: Tensor  # SiLU(time (+ label) embedding)
    cond: Tensor | None  # SiLU(cond)
    context: Tensor | None


def output_head(h: Tensor, norm: nn.Module, conv: nn.Module, patch_size: int) -> Tensor:
    """conv(SiLU(norm(h))), each position's p²C output channels unfolded back to its p×p patch
    of pixels (depth-to-space; p = ``patch_size``, 1: the output as it is)."""
    return F.pixel_shuffle(conv(F.silu(norm(h))), patch_size)


class UNet(nn.Module):
    """ADM-style UNet (Dhariwal & Nichol 2021) predicting eps (or x0/v) from (x_t, t).

    Args:
        in_channels: Image channels.
        out_channels: Output channels; defaults to ``in_channels``.
        image_size: Height and width of the (square) input.
        base_channels: The model width (official ``model_channels``): the sinusoidal time
            embedding has this many dims and its MLP 4x this.
        channel_mult: Width multiplier per level, ints or floats: level i (and conv_in, for
            i = 0) has int(channel_mult[i] · base_channels) channels (ADM 512x512: 0.5, 1, ...);
            the resolution halves between levels.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attention_resolutions: Resolutions (in pixels) that get an attention block.
        num_head_channels: Channels per attention head; default 32 unless ``num_heads``.
        num_heads: A fixed number of heads per attention block instead, of width
            channels // num_heads (official ``num_heads`` with ``num_head_channels=-1``).
        num_heads_upsample: Heads of the up path's attention blocks (official
            ``num_heads_upsample``); default ``num_heads``. The middle block has ``num_heads``.
        dropout: Dropout inside ResBlocks (and transformer feed-forwards).
        num_groups: GroupNorm groups.
        resblock_updown: Resample with ResBlocks instead of strided conv / upsample+conv.
        scale_shift_norm: ResBlocks inject the time embedding as a scale and shift of their
            output norm (official ``use_scale_shift_norm``), else add it before the norm.
        norm_eps: ε of every group norm (the original DDPM's and diffusers': 1e-6).
        sin_first, freq_shift: The sinusoidal time embedding's order and frequency spacing
            (:func:`~diffusion_apps.nn.layers.timestep_embedding`; the original DDPM's: True, 1).
        time_scale: The network sees t·time_scale (improved-diffusion's ``rescale_timesteps``).
        downsample_padding: How the strided downsampling conv pads: "symmetric" (ADM's) or
            "asymmetric" (bottom and right only: the original DDPM's).
        middle_attention: The middle block has an attention block (else two ResBlocks);
            ``middle_attention_norm``: that block group-normalises its input.
        num_classes: Adds a label embedding to the time embedding.
        null_label: A label-embedding row more, label ``num_classes``: the null label for
            classifier-free guidance. False: exactly ``num_classes`` rows (official ``label_emb``).
        cond_dim: Width of a conditioning vector applied by AdaGN in every ResBlock.
        cond_shift: Use PDAE's scale-and-shift AdaGN instead of DiffAE's scale-only one.
        context_dim: Width of a context sequence; attention blocks become spatial transformers.
        transformer_depth: Transformer blocks per spatial transformer.
        patch_size: The UNet runs on p×p patches folded into channels (space-to-depth, as in
            simple diffusion, Hoogeboom et al. 2023): x (B, C, H, W) enters as
            (B, p²C, H/p, W/p) and the output is unfolded back, so every level costs about
            1/p² of its FLOPs at p = 1. ``attention_resolutions`` count patches, not pixels.
        channels_last: Keep the weights, and so every activation, in channels-last (NHWC)
            memory: the same numbers in another layout. On our CPUs a wash (0.98-1.07x NCHW in
            fp32 and bf16; README, Performance); on GPUs usually a gain with bf16.
        gradient_checkpointing: In training, every ResBlock and attention block keeps only its
            inputs for backward and recomputes its forward there (ADM's ``use_checkpoint``):
            activation memory for about one more forward pass; the same outputs and gradients.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 32,
        base_channels: int = 64,
        channel_mult: Sequence[int | float] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_head_channels: int | None = None,
        num_heads: int | None = None,
        num_heads_upsample: int | None = None,
        dropout: float = 0.0,
        num_groups: int = 32,
        resblock_updown: bool = False,
        scale_shift_norm: bool = True,
        norm_eps: float = 1e-5,
        sin_first: bool = False,
        freq_shift: float = 0.0,
        time_scale: float = 1.0,
        downsample_padding: Literal["symmetric", "asymmetric"] = "symmetric",
        middle_attention: bool = True,
        middle_attention_norm: bool = True,
        num_classes: int | None = None,
        null_label: bool = True,
        cond_dim: int | None = None,
        cond_shift: bool = False,
        context_dim: int | None = None,
        transformer_depth: int = 1,
        patch_size: int = 1,
        channels_last: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes, out_channels=out_channels, patch_size=patch_size)
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        self.in_channels, self.image_size = in_channels, image_size
        self.out_channels, self.base_channels = out_channels or in_channels, base_channels
        self.num_classes, self.cond_dim, self.context_dim = num_classes, cond_dim, context_dim
        self.null_label, self.patch_size = bool(null_label), patch_size

        emb_dim = 4 * base_channels
        self.time_embed = TimeEmbedding(base_channels, sin_first, freq_shift, time_scale)
        rows = num_classes + self.null_label if num_classes else 0  # the null label: one more
        self.label_embed = nn.Embedding(rows, emb_dim) if rows else None
        self.down = DownPath(
            in_channels * patch_size**2, image_size // patch_size, base_channels, channel_mult,
            num_res_blocks, attention_resolutions, num_head_channels, dropout, num_groups,
            resblock_updown, emb_dim, cond_dim, cond_shift, context_dim, transformer_depth,
            scale_shift_norm, num_heads, num_heads_upsample, norm_eps, downsample_padding,
            middle_attention, middle_attention_norm, gradient_checkpointing,
        )  # fmt: skip

        self.up = UpPath(self.down, self.down.spec)
        ch = self.up.out_channels
        self.out_norm = GroupNorm(num_groups, ch, norm_eps)
        self.out_conv = zero_(nn.Conv2d(ch, self.out_channels * patch_size**2, 3, padding=1))
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one input: (C, H, W)."""
        return (self.in_channels, self.image_size, self.image_size)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        cond: Tensor | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Predict from x (B, in_channels, H, W) at timesteps t (B,).

        Args:
            x: Noisy images.
            t: Timesteps, integer or float.
            y: Labels (B,) in [0, num_classes] (``num_classes`` - 1 without ``null_label``);
                required iff built with ``num_classes``.
            cond: Conditioning vectors (B, cond_dim); required iff built with ``cond_dim``.
            context: Context sequences (B, L, context_dim); required iff built with it.

        Returns:
            Tensor of shape (B, out_channels, H, W).
        """
        return self.up_from(self.down_features(x, t, y, cond, context))

    def down_features(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        cond: Tensor | None = None,
        context: Tensor | None = None,
    ) -> DownFeatures:
        """The first half of :meth:`forward` (same arguments): the fold into patches (space-to-
        depth, ``patch_size`` > 1), the embeddings and the down levels."""
        check_x(x, self.in_channels, self.image_size)
        t = check_t(t, x.shape[0])
        check_conditioning(self, x.shape[0], y, cond, context)
        # The network runs in its weights' dtype (bf16-true) whatever the sampler's state is in.
        dtype = self.down.conv_in.weight.dtype
        x, cond, context = (v if v is None else v.to(dtype) for v in (x, cond, context))
        x = F.pixel_unshuffle(x, self.patch_size)
        emb = self.time_embed(t)
        if self.label_embed is not None:
            emb = emb + self.label_embed(y)
        # Every ResBlock projects SiLU(emb) and SiLU(cond): activate once here, not per block.
        emb = F.silu(emb)
        cond = F.silu(cond) if cond is not None else None
        skips: list[Tensor] = []
        h = self.down.levels(x, emb, cond, context, skips)
        return DownFeatures(h, skips, emb, cond, context)

    def up_from(self, f: DownFeatures) -> Tensor:
        """The second half of :meth:`forward`: middle block, up path, output (``f`` unchanged)."""
        h = self.down.middle(f.h, f.emb, f.cond, f.context)
        h = self.up(h, list(f.skips), f.emb, f.cond, f.context)
        return output_head(h, self.out_norm, self.out_conv, self.patch_size)
