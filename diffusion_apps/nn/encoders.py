"""The UNet's encoder half (ADM's noisy classifier, DiffAE's semantic encoder) and PDAE's
gradient estimator, both built on the UNet's paths (nn/unet.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_apps.nn.checks import check_positive, check_t, check_x
from diffusion_apps.nn.layers import AttentionPool2d, GroupNorm, TimeEmbedding, zero_
from diffusion_apps.nn.unet import DownFeatures, DownPath, UNet, UpPath, output_head


class EncoderUNet(nn.Module):
    """The UNet's encoder-only half: down path + middle block + pooled head -> (B, out_dim).

    With ``time_conditioned`` it is ADM's noisy classifier f(x_t, t) (use ``pool="attention"``
    as ADM does); without, DiffAE's semantic encoder z_sem = Enc(x_0): no time embedding at all
    and ``pool="avg"``: GN -> SiLU -> global average pool -> linear (a 1x1 conv).

    Args:
        out_dim: Output width (number of classes, or 512 for z_sem).
        time_conditioned: Embed timesteps as the UNet does; ``t`` is then required.
        pool: "avg" (DiffAE head; official ``pool="adaptive"``) or "attention" (ADM attention
            pooling, heads ``num_head_channels`` wide: not with ``num_heads``, as officially).
        Other arguments: as for ``UNet`` (``scale_shift_norm``: official
            ``use_scale_shift_norm``; ``num_heads``: heads per attention block instead of
            ``num_head_channels``; ``gradient_checkpointing``: ADM's ``use_checkpoint``, for
            the down path and middle block).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_dim: int = 512,
        image_size: int = 32,
        base_channels: int = 64,
        channel_mult: Sequence[int | float] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_head_channels: int | None = None,
        num_heads: int | None = None,
        dropout: float = 0.0,
        num_groups: int = 32,
        resblock_updown: bool = False,
        scale_shift_norm: bool = True,
        time_conditioned: bool = True,
        pool: Literal["avg", "attention"] = "avg",
        channels_last: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if pool not in ("avg", "attention"):
            raise ValueError(f"pool={pool!r} must be 'avg' or 'attention'")
        check_positive(out_dim=out_dim)
        if pool == "attention" and num_heads is not None:
            raise ValueError(
                f"pool='attention' needs num_head_channels (its heads' width), not "
                f"num_heads={num_heads}: as the official EncoderUNetModel"
            )
        self.in_channels, self.out_dim, self.image_size = in_channels, out_dim, image_size
        self.base_channels, self.time_conditioned, self.pool = base_channels, time_conditioned, pool
        self.time_embed = TimeEmbedding(base_channels) if time_conditioned else None
        self.down = DownPath(
            in_channels, image_size, base_channels, channel_mult, num_res_blocks,
            attention_resolutions, num_head_channels, dropout, num_groups, resblock_updown,
            emb_dim=4 * base_channels if time_conditioned else None,
            scale_shift_norm=scale_shift_norm, num_heads=num_heads,
            gradient_checkpointing=gradient_checkpointing,
        )  # fmt: skip
        ch = self.down.out_channels
        self.out_norm = GroupNorm(num_groups, ch)
        if pool == "avg":
            self.head: nn.Module = nn.Linear(ch, out_dim)
        else:
            heads = self.down.spec.head_dim
            self.head = AttentionPool2d(self.down.out_resolution, ch, heads, out_dim)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """Encode x (B, in_channels, H, W) [at timesteps t (B,)] to (B, out_dim)."""
        check_x(x, self.in_channels, self.image_size)
        x = x.to(self.down.conv_in.weight.dtype)  # bf16-true weights, fp32 sampler state
        emb = None
        if self.time_embed is not None:
            t = check_t(t, x.shape[0])
            emb = F.silu(self.time_embed(t))
        elif t is not None:
            raise ValueError("t was given but the encoder was built with time_conditioned=False")
        h = F.silu(self.out_norm(self.down(x, emb)))
        return self.head(h.mean(dim=(2, 3)) if self.pool == "avg" else h)


class GradientEstimator(nn.Module):
    """PDAE's G_ψ(x_t, z, t) (Zhang et al. 2022): a second middle block and up path on the down
    features of a frozen unconditional ``unet``, as in the official ShiftUNet.

    The blocks mirror the UNet's (its gradient checkpointing too) and share its (frozen) time
    embedding; each ResBlock adds PDAE's AdaGN h ← (1 + z_s)·(GN(h)·(1 + t_s) + t_b) + z_b with
    (z_s, z_b) = W SiLU(W_z z), W_z a trainable z → time-embedding-width projection (the
    reference's ``label_emb``). The output conv is zero-initialised, so G_ψ ≡ 0 at the start:
    the frozen model unchanged.

    Reusing the frozen down path (instead of a separate conditional UNet) is the reference's
    choice: G_ψ costs half a UNet, and at sampling time ε_θ and G_ψ share one down pass.

    Args:
        unet: the frozen model (unconditional: no labels, cond vector or context).
        z_dim: width of the code z (the encoder's ``out_dim``).
        dropout: dropout in G_ψ's ResBlocks (default: the UNet's).
    """

    def __init__(self, unet: UNet, z_dim: int, dropout: float | None = None) -> None:
        super().__init__()
        check_positive(z_dim=z_dim)
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
        self.patch_size = unet.patch_size  # G_ψ unfolds its output as the UNet does
        out_channels = unet.in_channels * self.patch_size**2
        self.out_conv = zero_(nn.Conv2d(self.up.out_channels, out_channels, 3, padding=1))

    def forward(self, f: DownFeatures, z: Tensor) -> Tensor:
        """G_ψ (B, C, H, W) from the frozen UNet's ``down_features(x_t, t)`` and z (B, z_dim)."""
        if z.ndim != 2 or z.shape != (f.h.shape[0], self.z_dim):
            raise ValueError(f"expected z of shape ({f.h.shape[0]}, {self.z_dim}), got {z.shape}")
        cond = F.silu(self.z_embed(z.to(self.z_embed.weight.dtype)))  # bf16-true weights
        h = self.middle(f.h, f.emb, cond)
        h = self.up(h, list(f.skips), f.emb, cond)
        return output_head(h, self.out_norm, self.out_conv, self.patch_size)
