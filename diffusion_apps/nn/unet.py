"""The ADM UNet (Dhariwal & Nichol 2021) and its encoder-only half.

One class covers every method: class labels (with a null label for classifier-free guidance),
a conditioning vector applied by adaptive group norm in every ResBlock (DiffAE's z_sem, PDAE's
z), and cross-attention to a context sequence (LDM). ``EncoderUNet`` reuses the same down path
as a noisy classifier (ADM) or a semantic encoder (DiffAE).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_apps.nn.layers import (
    AttentionBlock,
    AttentionPool2d,
    CondSequential,
    GroupNorm,
    ResBlock,
    SpatialTransformer,
    Upsample,
    downsample,
    timestep_embedding,
    zero_,
)


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} must be a positive integer")


def _validate(
    image_size: int, base_channels: int, channel_mult: Sequence[int],
    attention_resolutions: Sequence[int], num_head_channels: int, num_groups: int, dropout: float,
) -> None:  # fmt: skip
    """Raise ValueError, naming the option, for any configuration the network cannot build."""
    mult = tuple(channel_mult)
    if not mult or any(not isinstance(m, int) or m < 1 for m in mult):
        raise ValueError(f"channel_mult={mult} must be a non-empty sequence of positive integers")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} must lie in [0, 1)")
    factor = 2 ** (len(mult) - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size={image_size} is not divisible by 2**{len(mult) - 1}={factor} "
            f"required by channel_mult={mult}"
        )
    if base_channels % num_groups:  # then every level's base_channels * mult divides too
        raise ValueError(f"num_groups={num_groups} does not divide base_channels={base_channels}")
    resolutions = [image_size // 2**i for i in range(len(mult))]
    unreached = sorted(set(attention_resolutions) - set(resolutions))
    if unreached:
        raise ValueError(
            f"attention_resolutions={tuple(attention_resolutions)} contains {unreached}, "
            f"never reached by the net (resolutions {resolutions})"
        )
    # Attention runs at the chosen resolutions and always in the middle block.
    attn = dict(zip(resolutions, (base_channels * m for m in mult), strict=True))
    attn = {r: ch for r, ch in attn.items() if r in attention_resolutions or r == resolutions[-1]}
    for res, ch in attn.items():
        if ch % num_head_channels:
            raise ValueError(
                f"num_head_channels={num_head_channels} does not divide {ch} channels of the "
                f"attention at resolution {res}"
            )


class DownPath(nn.Module):
    """conv_in, the downsampling levels and the middle block (ResBlock, attention, ResBlock).

    The one builder shared by ``UNet`` and ``EncoderUNet``; ``make_res_block`` and
    ``make_attention`` let the UNet build its up path from the same options.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        num_head_channels: int,
        dropout: float,
        num_groups: int,
        resblock_updown: bool,
        emb_dim: int | None,
        cond_dim: int | None = None,
        cond_shift: bool = False,
        context_dim: int | None = None,
        transformer_depth: int = 1,
    ) -> None:
        super().__init__()
        _check_positive(
            in_channels=in_channels, image_size=image_size, base_channels=base_channels,
            num_res_blocks=num_res_blocks, num_head_channels=num_head_channels,
            num_groups=num_groups, cond_dim=cond_dim, context_dim=context_dim,
            transformer_depth=transformer_depth,
        )  # fmt: skip
        _validate(
            image_size, base_channels, channel_mult, attention_resolutions, num_head_channels,
            num_groups, dropout,
        )  # fmt: skip
        if cond_shift and cond_dim is None:
            raise ValueError("cond_shift=True requires cond_dim")
        self.emb_dim, self.cond_dim, self.cond_shift = emb_dim, cond_dim, cond_shift
        self.context_dim, self.transformer_depth = context_dim, transformer_depth
        self.dropout, self.num_groups, self.head_dim = dropout, num_groups, num_head_channels

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.skip_channels = [base_channels]  # channels of every tensor the up path concatenates
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [self.make_res_block(ch, base_channels * mult)]
                ch = base_channels * mult
                if res in attention_resolutions:
                    layers.append(self.make_attention(ch))
                self.blocks.append(CondSequential(*layers))
                self.skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                down = self.make_res_block(ch, ch, "down") if resblock_updown else downsample(ch)
                self.blocks.append(CondSequential(down))
                self.skip_channels.append(ch)
                res //= 2
        self.middle = CondSequential(
            self.make_res_block(ch, ch), self.make_attention(ch), self.make_res_block(ch, ch)
        )
        self.out_channels, self.out_resolution = ch, res

    def make_res_block(
        self, in_ch: int, out_ch: int, resample: Literal["none", "up", "down"] = "none"
    ) -> ResBlock:
        return ResBlock(
            in_ch, out_ch, self.emb_dim, self.cond_dim, self.cond_shift, self.dropout,
            self.num_groups, resample,
        )  # fmt: skip

    def make_attention(self, ch: int) -> nn.Module:
        if self.context_dim is None:
            return AttentionBlock(ch, self.head_dim, self.num_groups)
        return SpatialTransformer(
            ch, self.head_dim, self.context_dim, self.transformer_depth,
            self.num_groups, self.dropout,
        )  # fmt: skip

    def forward(
        self, x: Tensor, emb: Tensor | None = None, cond: Tensor | None = None,
        context: Tensor | None = None, skips: list[Tensor] | None = None,
    ) -> Tensor:  # fmt: skip
        """Return the middle block's output; append each skip tensor to ``skips`` if given."""
        h = self.conv_in(x)
        if skips is not None:
            skips.append(h)
        for block in self.blocks:
            h = block(h, emb, cond, context)
            if skips is not None:
                skips.append(h)
        return self.middle(h, emb, cond, context)


def _time_mlp(base_channels: int) -> nn.Sequential:
    """ADM time embedding MLP: base_channels -> 4·base_channels, with SiLU between."""
    dim = 4 * base_channels
    return nn.Sequential(nn.Linear(base_channels, dim), nn.SiLU(), nn.Linear(dim, dim))


def _check_x(x: Tensor, in_channels: int, image_size: int) -> None:
    if x.ndim != 4 or x.shape[1:] != (in_channels, image_size, image_size):
        raise ValueError(
            f"expected x of shape (B, {in_channels}, {image_size}, {image_size}), "
            f"got {tuple(x.shape)}"
        )


def _check_t(t: Tensor | None, batch: int) -> Tensor:
    if t is None:
        raise ValueError("t is required: this network is time-conditioned")
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"expected t of shape ({batch},), got {tuple(t.shape)}")
    return t


class UNet(nn.Module):
    """ADM-style UNet (Dhariwal & Nichol 2021) predicting eps (or x0/v) from (x_t, t).

    Args:
        in_channels: Image channels.
        out_channels: Output channels; defaults to ``in_channels``.
        image_size: Height and width of the (square) input.
        base_channels: Width of the first level; the time embedding is 4x this.
        channel_mult: Width multiplier per level; the resolution halves between levels.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attention_resolutions: Resolutions (in pixels) that get an attention block.
        num_head_channels: Channels per attention head.
        dropout: Dropout inside ResBlocks (and transformer feed-forwards).
        num_groups: GroupNorm groups.
        resblock_updown: Resample with ResBlocks instead of strided conv / upsample+conv.
        num_classes: Adds a label embedding with ``num_classes + 1`` rows to the time embedding;
            label ``num_classes`` is the null label for classifier-free guidance.
        cond_dim: Width of a conditioning vector applied by AdaGN in every ResBlock.
        cond_shift: Use PDAE's scale-and-shift AdaGN instead of DiffAE's scale-only one.
        context_dim: Width of a context sequence; attention blocks become spatial transformers.
        transformer_depth: Transformer blocks per spatial transformer.
        channels_last: Keep the weights, and so every activation, in channels-last (NHWC)
            memory: the same numbers in another layout. On our CPU it pays in fp32 only (+3-7%);
            under bf16 PyTorch's NHWC group norm is slow (README, Performance).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 32,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_head_channels: int = 32,
        dropout: float = 0.0,
        num_groups: int = 32,
        resblock_updown: bool = False,
        num_classes: int | None = None,
        cond_dim: int | None = None,
        cond_shift: bool = False,
        context_dim: int | None = None,
        transformer_depth: int = 1,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, out_channels=out_channels)
        self.in_channels, self.image_size = in_channels, image_size
        self.out_channels = out_channels or in_channels
        self.base_channels = base_channels
        self.num_classes, self.cond_dim, self.context_dim = num_classes, cond_dim, context_dim

        emb_dim = 4 * base_channels
        self.time_embed = _time_mlp(base_channels)
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.down = DownPath(
            in_channels, image_size, base_channels, channel_mult, num_res_blocks,
            attention_resolutions, num_head_channels, dropout, num_groups, resblock_updown,
            emb_dim, cond_dim, cond_shift, context_dim, transformer_depth,
        )  # fmt: skip

        # Up path mirrors the down path: num_res_blocks + 1 blocks per level, each consuming one
        # skip tensor, the last block of every level but the top one ending in an upsample.
        skips = list(self.down.skip_channels)
        ch, res = self.down.out_channels, self.down.out_resolution
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [self.down.make_res_block(ch + skips.pop(), base_channels * mult)]
                ch = base_channels * mult
                if res in attention_resolutions:
                    layers.append(self.down.make_attention(ch))
                if level > 0 and i == num_res_blocks:
                    up = self.down.make_res_block(ch, ch, "up") if resblock_updown else Upsample(ch)
                    layers.append(up)
                    res *= 2
                self.up.append(CondSequential(*layers))
        self.out_norm = GroupNorm(num_groups, ch)
        self.out_conv = zero_(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one input: (C, H, W)."""
        return (self.in_channels, self.image_size, self.image_size)

    def _check_conditioning(
        self, batch: int, y: Tensor | None, cond: Tensor | None, context: Tensor | None
    ) -> None:
        for name, value, option, setting in (
            ("y", y, "num_classes", self.num_classes),
            ("cond", cond, "cond_dim", self.cond_dim),
            ("context", context, "context_dim", self.context_dim),
        ):
            if setting is None and value is not None:
                raise ValueError(f"{name} was given but the UNet was built without {option}")
            if setting is not None and value is None:
                raise ValueError(f"the UNet was built with {option}={setting}: {name} is required")
        if y is not None:
            n = self.num_classes
            if y.shape != (batch,) or y.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"expected int y of shape ({batch},), got {y.dtype} {y.shape}")
            # The range check syncs with the device, so on accelerators it runs only in training;
            # sampling loops (eval mode) stay asynchronous.
            if (self.training or y.device.type == "cpu") and (y.min() < 0 or y.max() > n):
                raise ValueError(f"labels y must lie in [0, num_classes={n}] ({n}: null label)")
        if cond is not None and cond.shape != (batch, self.cond_dim):
            raise ValueError(f"expected cond of shape ({batch}, {self.cond_dim}), got {cond.shape}")
        if context is not None and (
            context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.context_dim
        ):
            raise ValueError(
                f"expected context of shape ({batch}, L, {self.context_dim}), "
                f"got {tuple(context.shape)}"
            )

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
            y: Labels (B,) in [0, num_classes]; required iff built with ``num_classes``.
            cond: Conditioning vectors (B, cond_dim); required iff built with ``cond_dim``.
            context: Context sequences (B, L, context_dim); required iff built with it.

        Returns:
            Tensor of shape (B, out_channels, H, W).
        """
        _check_x(x, self.in_channels, self.image_size)
        t = _check_t(t, x.shape[0])
        self._check_conditioning(x.shape[0], y, cond, context)
        emb = self.time_embed(timestep_embedding(t, self.base_channels).to(x.dtype))
        if self.label_embed is not None:
            emb = emb + self.label_embed(y)
        # Every ResBlock projects SiLU(emb) and SiLU(cond): activate once here, not per block.
        emb = F.silu(emb)
        cond = F.silu(cond) if cond is not None else None

        skips: list[Tensor] = []
        h = self.down(x, emb, cond, context, skips)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, cond, context)  # (B, C+C_s, H, W)
        return self.out_conv(F.silu(self.out_norm(h)))


class EncoderUNet(nn.Module):
    """The UNet's encoder-only half: down path + middle block + pooled head -> (B, out_dim).

    With ``time_conditioned`` it is ADM's noisy classifier f(x_t, t) (use ``pool="attention"``
    as ADM does); without, DiffAE's semantic encoder z_sem = Enc(x_0): no time embedding at all
    and ``pool="avg"``: GN -> SiLU -> global average pool -> linear (a 1x1 conv).

    Args:
        out_dim: Output width (number of classes, or 512 for z_sem).
        time_conditioned: Embed timesteps as the UNet does; ``t`` is then required.
        pool: "avg" (DiffAE head) or "attention" (ADM attention pooling).
        Other arguments: as for ``UNet``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_dim: int = 512,
        image_size: int = 32,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_head_channels: int = 32,
        dropout: float = 0.0,
        num_groups: int = 32,
        resblock_updown: bool = False,
        time_conditioned: bool = True,
        pool: Literal["avg", "attention"] = "avg",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if pool not in ("avg", "attention"):
            raise ValueError(f"pool={pool!r} must be 'avg' or 'attention'")
        _check_positive(out_dim=out_dim)
        self.in_channels, self.out_dim, self.image_size = in_channels, out_dim, image_size
        self.base_channels, self.time_conditioned, self.pool = base_channels, time_conditioned, pool
        self.time_embed = _time_mlp(base_channels) if time_conditioned else None
        self.down = DownPath(
            in_channels, image_size, base_channels, channel_mult, num_res_blocks,
            attention_resolutions, num_head_channels, dropout, num_groups, resblock_updown,
            emb_dim=4 * base_channels if time_conditioned else None,
        )  # fmt: skip
        ch = self.down.out_channels
        self.out_norm = GroupNorm(num_groups, ch)
        if pool == "avg":
            self.head: nn.Module = nn.Linear(ch, out_dim)
        else:
            self.head = AttentionPool2d(self.down.out_resolution, ch, num_head_channels, out_dim)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """Encode x (B, in_channels, H, W) [at timesteps t (B,)] to (B, out_dim)."""
        _check_x(x, self.in_channels, self.image_size)
        emb = None
        if self.time_embed is not None:
            t = _check_t(t, x.shape[0])
            emb = F.silu(self.time_embed(timestep_embedding(t, self.base_channels).to(x.dtype)))
        elif t is not None:
            raise ValueError("t was given but the encoder was built with time_conditioned=False")
        h = F.silu(self.out_norm(self.down(x, emb)))
        return self.head(h.mean(dim=(2, 3)) if self.pool == "avg" else h)
