"""Checks shared by the UNet, its encoders and the autoencoder: options and input shapes,
each raising ValueError that names the offending option or input."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def check_positive(**values: int | None) -> None:
    """Raise ValueError for any value that is neither None nor a positive int."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} must be a positive integer")


def check_bool(**values: bool) -> None:
    """Raise ValueError for any value that is not a bool."""
    for name, value in values.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be True or False")


def level_channels(base_channels: int, channel_mult: Sequence[int | float]) -> tuple[int, ...]:
    """Every level's width, int(mult · base_channels) as in ADM (whose 512x512 model starts at
    mult 0.5); ValueError unless each mult is a positive number giving at least one channel."""
    mult = tuple(channel_mult)
    bad = [m for m in mult if isinstance(m, bool) or not isinstance(m, int | float) or m <= 0]
    if not mult or bad or any(int(m * base_channels) < 1 for m in mult):
        raise ValueError(
            f"channel_mult={mult} must be a non-empty sequence of positive numbers, each "
            f"giving int(mult * base_channels={base_channels}) >= 1 channels"
        )
    return tuple(int(m * base_channels) for m in mult)


def resolve_heads(
    num_head_channels: int | None, num_heads: int | None, num_heads_upsample: int | None
) -> tuple[int | None, int | None, int | None]:
    """(head width, heads, heads of the up path): one of a fixed head width
    (``num_head_channels``, 32 when neither is given) or a fixed number of heads per block
    (``num_heads``, and ``num_heads_upsample`` for the up path, default ``num_heads``)."""
    check_positive(
        num_head_channels=num_head_channels, num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
    )  # fmt: skip
    if num_heads is None:
        if num_heads_upsample is not None:
            raise ValueError(
                f"num_heads_upsample={num_heads_upsample} needs num_heads: with "
                "num_head_channels every block's heads follow from its width"
            )
        return 32 if num_head_channels is None else num_head_channels, None, None
    if num_head_channels is not None:
        raise ValueError(
            f"num_head_channels={num_head_channels} and num_heads={num_heads} are exclusive: "
            "give a fixed head width or a fixed number of heads, not both"
        )
    return None, num_heads, num_heads if num_heads_upsample is None else num_heads_upsample


def check_architecture(
    image_size: int, base_channels: int, channel_mult: Sequence[int | float],
    attention_resolutions: Sequence[int], num_head_channels: int | None, num_groups: int,
    dropout: float, num_heads: int | None = None, num_heads_upsample: int | None = None,
    middle_attention: bool = True,
) -> None:  # fmt: skip
    """Raise ValueError, naming the option, for any configuration the network cannot build.

    The head options are resolved ones (:func:`resolve_heads`): a head width or head counts;
    ``middle_attention``: whether the middle block has an attention block whose heads to check."""
    mult = tuple(channel_mult)
    widths = level_channels(base_channels, mult)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} must lie in [0, 1)")
    factor = 2 ** (len(mult) - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size={image_size} is not divisible by 2**{len(mult) - 1}={factor} "
            f"required by channel_mult={mult}"
        )
    for level, (m, ch) in enumerate(zip(mult, widths, strict=True)):
        if ch % num_groups:
            raise ValueError(
                f"num_groups={num_groups} does not divide the {ch} channels of level {level} "
                f"(channel_mult[{level}]={m} x base_channels={base_channels})"
            )
    resolutions = [image_size // 2**i for i in range(len(mult))]
    unreached = sorted(set(attention_resolutions) - set(resolutions))
    if unreached:
        raise ValueError(
            f"attention_resolutions={tuple(attention_resolutions)} contains {unreached}, "
            f"never reached by the net (resolutions {resolutions})"
        )
    # Attention runs at the chosen resolutions and in the middle block; with num_heads,
    # the up path's blocks (at the chosen resolutions only) have num_heads_upsample heads.
    chosen = [
        (r, ch) for r, ch in zip(resolutions, widths, strict=True) if r in attention_resolutions
    ]
    down = [*chosen, (resolutions[-1], widths[-1])] if middle_attention else chosen
    if num_heads is None:
        heads = [("num_head_channels", num_head_channels, "", down)]
    else:
        up = num_heads if num_heads_upsample is None else num_heads_upsample
        heads = [
            ("num_heads", num_heads, "", down),
            ("num_heads_upsample", up, " up path's", chosen),
        ]
    for name, value, path, blocks in heads:
        for res, ch in blocks:
            if ch % value:
                raise ValueError(
                    f"{name}={value} does not divide {ch} channels of the{path} attention at "
                    f"resolution {res}"
                )


def check_choices(
    norm_eps: float, downsample_padding: str, middle_attention: bool, middle_attention_norm: bool
) -> None:
    """Raise ValueError, naming the option, for a bad ε, padding or middle-attention choice."""
    if not norm_eps > 0:
        raise ValueError(f"norm_eps={norm_eps!r} must be > 0")
    if downsample_padding not in ("symmetric", "asymmetric"):
        raise ValueError(
            f"downsample_padding={downsample_padding!r} must be 'symmetric' or 'asymmetric'"
        )
    if not middle_attention and not middle_attention_norm:
        raise ValueError("middle_attention_norm=False needs middle_attention=True")


def check_x(x: Tensor, in_channels: int, image_size: int) -> None:
    """Raise ValueError unless x has shape (B, in_channels, image_size, image_size)."""
    if x.ndim != 4 or x.shape[1:] != (in_channels, image_size, image_size):
        raise ValueError(
            f"expected x of shape (B, {in_channels}, {image_size}, {image_size}), "
            f"got {tuple(x.shape)}"
        )


def check_labels(y: Tensor, batch: int, num_classes: int, null_label: bool, training: bool) -> None:
    """Raise ValueError unless y is (batch,) ints in [0, num_classes - 1], or up to
    ``num_classes`` (the null label) with ``null_label``.

    The range check syncs with the device, so on accelerators it runs only in training (sampling
    loops, in eval mode, stay asynchronous)."""
    if y.shape != (batch,) or y.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expected int y of shape ({batch},), got {y.dtype} {y.shape}")
    n = num_classes
    if (training or y.device.type == "cpu") and (y.min() < 0 or y.max() > n - 1 + null_label):
        if null_label:
            raise ValueError(f"labels y must lie in [0, num_classes={n}] ({n}: null label)")
        raise ValueError(
            f"labels y must lie in [0, num_classes - 1 = {n - 1}]: built with null_label=False, "
            f"the UNet has no null label {n}"
        )


def check_conditioning(
    unet: nn.Module, batch: int, y: Tensor | None, cond: Tensor | None, context: Tensor | None
) -> None:
    """Raise ValueError unless the UNet's conditioning inputs are given exactly when it was built
    for them (``num_classes``, ``cond_dim``, ``context_dim``), each of the right shape."""
    for name, value, option, setting in (
        ("y", y, "num_classes", unet.num_classes),
        ("cond", cond, "cond_dim", unet.cond_dim),
        ("context", context, "context_dim", unet.context_dim),
    ):
        if setting is None and value is not None:
            raise ValueError(f"{name} was given but the UNet was built without {option}")
        if setting is not None and value is None:
            raise ValueError(f"the UNet was built with {option}={setting}: {name} is required")
    if y is not None:
        check_labels(y, batch, unet.num_classes, unet.null_label, unet.training)
    if cond is not None and cond.shape != (batch, unet.cond_dim):
        raise ValueError(f"expected cond of shape ({batch}, {unet.cond_dim}), got {cond.shape}")
    if context is not None and (
        context.ndim != 3 or context.shape[0] != batch or context.shape[2] != unet.context_dim
    ):
        raise ValueError(
            f"expected context of shape ({batch}, L, {unet.context_dim}), "
            f"got {tuple(context.shape)}"
        )


def check_t(t: Tensor | None, batch: int) -> Tensor:
    """t as a (batch,) tensor (a scalar is broadcast); ValueError if missing or misshapen."""
    if t is None:
        raise ValueError("t is required: this network is time-conditioned")
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"expected t of shape ({batch},), got {tuple(t.shape)}")
    return t
