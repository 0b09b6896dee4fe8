"""Checks shared by the UNet, its encoders and the autoencoder: options and input shapes,
each raising ValueError that names the offending option or input."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def check_positive(**values: int | None) -> None:
    """Raise ValueError for any value that is neither None nor a positive int."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} must be a positive integer")


def check_architecture(
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


def check_x(x: Tensor, in_channels: int, image_size: int) -> None:
    """Raise ValueError unless x has shape (B, in_channels, image_size, image_size)."""
    if x.ndim != 4 or x.shape[1:] != (in_channels, image_size, image_size):
        raise ValueError(
            f"expected x of shape (B, {in_channels}, {image_size}, {image_size}), "
            f"got {tuple(x.shape)}"
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
