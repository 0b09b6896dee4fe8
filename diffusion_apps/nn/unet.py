"""The ADM UNet (Dhariwal & Nichol 2021) and its encoder-only half.

One class covers every method: class labels (with a null label for classifier-free guidance),
a conditioning vector applied by adaptive group norm in every ResBlock (DiffAE's z_sem, PDAE's
z), and cross-attention to a context sequence (LDM). ``EncoderUNet`` reuses the same down path
as a noisy classifier (ADM) or a semantic encoder (DiffAE).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

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


@dataclass(frozen=True)
class BlockSpec:
    """How the ResBlocks and attention blocks of one network are built."""

    emb_dim: int | None
    cond_dim: int | None
    cond_shift: bool
    dropout: float
    num_groups: int
    head_dim: int
    context_dim: int | None
    transformer_depth: int

    def res_block(
        self, in_ch: int, out_ch: int, resample: Literal["none", "up", "down"] = "none"
    ) -> ResBlock:
        return ResBlock(
            in_ch, out_ch, self.emb_dim, self.cond_dim, self.cond_shift, self.dropout,
            self.num_groups, resample,
        )  # fmt: skip

    def attention(self, ch: int) -> nn.Module:
        if self.context_dim is None:
            return AttentionBlock(ch, self.head_dim, self.num_groups)
        return SpatialTransformer(
            ch, self.head_dim, self.context_dim, self.transformer_depth,
            self.num_groups, self.dropout,
        )  # fmt: skip

    def middle(self, ch: int) -> CondSequential:
        """The middle block: ResBlock, attention, ResBlock."""
        return CondSequential(self.res_block(ch, ch), self.attention(ch), self.res_block(ch, ch))


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
        self.spec = BlockSpec(
            emb_dim, cond_dim, cond_shift, dropout, num_groups, num_head_channels, context_dim,
            transformer_depth,
        )  # fmt: skip
        self.base_channels, self.channel_mult = base_channels, tuple(channel_mult)
        self.num_res_blocks, self.resblock_updown = num_res_blocks, resblock_updown
        self.attention_resolutions = tuple(attention_resolutions)

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.skip_channels = [base_channels]  # channels of every tensor the up path concatenates
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [self.spec.res_block(ch, base_channels * mult)]
                ch = base_channels * mult
                if res in attention_resolutions:
                    layers.append(self.spec.attention(ch))
                self.blocks.append(CondSequential(*layers))
                self.skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                down = self.spec.res_block(ch, ch, "down") if resblock_updown else downsample(ch)
                self.blocks.append(CondSequential(down))
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
    with ``spec`` (``down.spec`` for the UNet; PDAE's gradient estimator conditions its own)."""

    def __init__(self, down: DownPath, spec: BlockSpec) -> None:
        super().__init__()
        skips = list(down.skip_channels)
        ch, res = down.out_channels, down.out_resolution
        for level, mult in reversed(list(enumerate(down.channel_mult))):
            for i in range(down.num_res_blocks + 1):
                layers = [spec.res_block(ch + skips.pop(), down.base_channels * mult)]
                ch = down.base_channels * mult
                if res in down.attention_resolutions:
                    layers.append(spec.attention(ch))
                if level > 0 and i == down.num_res_blocks:
                    up = spec.res_block(ch, ch, "up") if down.resblock_updown else Upsample(ch)
                    layers.append(up)
                    res *= 2
                self.append(CondSequential(*layers))
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

        self.up = UpPath(self.down, self.down.spec)
        ch = self.up.out_channels
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
        return self.up_from(self.down_features(x, t, y, cond, context))

    def down_features(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        cond: Tensor | None = None,
        context: Tensor | None = None,
    ) -> DownFeatures:
        """The first half of :meth:`forward` (same arguments): embeddings and down levels."""
        _check_x(x, self.in_channels, self.image_size)
        t = _check_t(t, x.shape[0])
        self._check_conditioning(x.shape[0], y, cond, context)
        # The network runs in its weights' dtype (bf16-true) whatever the sampler's state is in.
        dtype = self.down.conv_in.weight.dtype
        x, cond, context = (v if v is None else v.to(dtype) for v in (x, cond, context))
        emb = self.time_embed(timestep_embedding(t, self.base_channels).to(x.dtype))
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
        x = x.to(self.down.conv_in.weight.dtype)  # bf16-true weights, fp32 sampler state
        emb = None
        if self.time_embed is not None:
            t = _check_t(t, x.shape[0])
            emb = F.silu(self.time_embed(timestep_embedding(t, self.base_channels).to(x.dtype)))
        elif t is not None:
            raise ValueError("t was given but the encoder was built with time_conditioned=False")
        h = F.silu(self.out_norm(self.down(x, emb)))
        return self.head(h.mean(dim=(2, 3)) if self.pool == "avg" else h)


class GradientEstimator(nn.Module):
    """PDAE's G_ψ(x_t, z, t) (Zhang et al. 2022): a second middle block and up path on the down
    features of a frozen unconditional ``unet``, as in the official ShiftUNet.

    The blocks mirror the UNet's and share its (frozen) time embedding; each ResBlock adds
    PDAE's AdaGN h ← (1 + z_s)·(GN(h)·(1 + t_s) + t_b) + z_b with (z_s, z_b) = W SiLU(W_z z),
    W_z a trainable z → time-embedding-width projection (the reference's ``label_emb``). The
    output conv is zero-initialised, so G_ψ ≡ 0 at the start: the frozen model unchanged.

    Reusing the frozen down path (instead of a separate conditional UNet) is the reference's
    choice: G_ψ costs half a UNet, and at sampling time ε_θ and G_ψ share one down pass.

    Args:
        unet: the frozen model (unconditional: no labels, cond vector or context).
        z_dim: width of the code z (the encoder's ``out_dim``).
        dropout: dropout in G_ψ's ResBlocks (default: the UNet's).
    """

    def __init__(self, unet: UNet, z_dim: int, dropout: float | None = None) -> None:
        super().__init__()
        _check_positive(z_dim=z_dim)
        if (unet.num_classes, unet.cond_dim, unet.context_dim) != (None, None, None):
            raise ValueError("the gradient estimator needs an unconditional UNet to build on")
        down = unet.down
        emb_dim = down.spec.emb_dim
        spec = replace(down.spec, cond_dim=emb_dim, cond_shift=True)
        if dropout is not None:
            spec = replace(spec, dropout=dropout)
        self.z_dim = z_dim
        self.z_embed = nn.Linear(z_dim, emb_dim)
        self.middle = spec.middle(down.out_channels)
        self.up = UpPath(down, spec)
        self.out_norm = GroupNorm(spec.num_groups, self.up.out_channels)
        self.out_conv = zero_(nn.Conv2d(self.up.out_channels, unet.in_channels, 3, padding=1))

    def forward(self, f: DownFeatures, z: Tensor) -> Tensor:
        """G_ψ (B, C, H, W) from the frozen UNet's ``down_features(x_t, t)`` and z (B, z_dim)."""
        if z.ndim != 2 or z.shape != (f.h.shape[0], self.z_dim):
            raise ValueError(f"expected z of shape ({f.h.shape[0]}, {self.z_dim}), got {z.shape}")
        cond = F.silu(self.z_embed(z.to(self.z_embed.weight.dtype)))  # bf16-true weights
        h = self.middle(f.h, f.emb, cond)
        h = self.up(h, list(f.skips), f.emb, cond)
        return self.out_conv(F.silu(self.out_norm(h)))
