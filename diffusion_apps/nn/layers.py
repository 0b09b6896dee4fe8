"""Building blocks of the ADM UNet (Dhariwal & Nichol 2021) and the LDM spatial transformer.

Every attention here runs through ``F.scaled_dot_product_attention`` on tokens laid out as
``(B, L, C)``, so projections are plain ``nn.Linear`` layers (a 1x1 conv on ``(B, C, H, W)``).
A network's blocks are built by one :class:`BlockSpec` and run as :class:`CondSequential`s.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn


def timestep_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, sin_first: bool = False,
    freq_shift: float = 0.0,
) -> Tensor:  # fmt: skip
    """Sinusoidal embedding of (possibly fractional) timesteps, as in ADM / Transformer.

    emb = [cos(t·ω_0), ..., cos(t·ω_{h-1}), sin(t·ω_0), ..., sin(t·ω_{h-1})],
    ω_i = max_period^(-i/(h - freq_shift)), h = dim // 2; a zero column is appended when ``dim``
    is odd. The original DDPM (and diffusers' ``flip_sin_to_cos=False, freq_shift=1``) puts the
    sines first and spaces the frequencies by 1/(h - 1).

    Args:
        t: Timesteps, shape (B,), integer or float.
        dim: Embedding width.
        max_period: Longest wavelength.
        sin_first: [sin, cos] instead of [cos, sin].
        freq_shift: Subtracted from h in the frequencies' exponent (diffusers' ``freq_shift``).

    Returns:
        Float32 tensor of shape (B, dim).
    """
    half = dim // 2
    if not freq_shift < half:
        raise ValueError(f"freq_shift={freq_shift} must be below dim // 2 = {half}")
    steps = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * steps / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    pair = (torch.sin(args), torch.cos(args)) if sin_first else (torch.cos(args), torch.sin(args))
    emb = torch.cat(pair, dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimeEmbedding(nn.Sequential):
    """ADM's time embedding: the sinusoids of t·``scale`` (``dim`` wide, :func:`timestep_embedding`
    with ``sin_first`` and ``freq_shift``), then Linear -> SiLU -> Linear to 4·dim."""

    def __init__(
        self, dim: int, sin_first: bool = False, freq_shift: float = 0.0, scale: float = 1.0
    ) -> None:
        if not freq_shift < dim // 2:
            raise ValueError(f"freq_shift={freq_shift} must be below dim // 2 = {dim // 2}")
        super().__init__(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, 4 * dim))
        self.dim, self.sin_first, self.freq_shift, self.scale = dim, sin_first, freq_shift, scale

    def forward(self, t: Tensor) -> Tensor:
        """(B, 4·dim) in the weights' dtype for timesteps t (B,), before any SiLU."""
        t = t * self.scale if self.scale != 1 else t  # improved-diffusion feeds t·1000/T
        emb = timestep_embedding(t, self.dim, 10000.0, self.sin_first, self.freq_shift)
        return super().forward(emb.to(self[0].weight.dtype))


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later): bf16 matrix units."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", bool)())


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(QKᵀ/√d)·V by ``F.scaled_dot_product_attention`` on (B, heads, L, d) tensors.

    The kernel is chosen by what benchmarks/results/attention-*.md measured on each CPU kind:
    - bf16 inputs (autocast) on CPU are attended in fp32 and the result cast back: PyTorch's
      bf16 CPU flash-attention kernel is 1.2–3x slower than its fp32 one in forward + backward
      on every CPU we met, while the surrounding convolutions still gain from bf16;
    - except without gradients (sampling) on a CPU with AMX, where the bf16 flash kernel runs
      the forward 1.2–2x faster than the fp32 one (our UNet's sampling call at batch 64: 1.17x),
      so bf16 stays bf16. On AMD's AVX512-BF16 CPUs the two tie in the forward: fp32 kept.
    bf16 matmuls with a materialised score matrix beat both in isolation for L ≤ 256 on CPUs
    with native bf16, but not inside the UNet, whose q, k, v are strided views of one
    projection.
    """
    if q.device.type == "cpu" and (q.dtype != torch.float32 or torch.is_autocast_enabled("cpu")):
        with torch.autocast("cpu", enabled=False):
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            if q.dtype == torch.bfloat16 and not grad and cpu_has_amx():
                return F.scaled_dot_product_attention(q, k, v)
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:  # fmt: skip
    """``F.group_norm`` in the input's own dtype, also under autocast.

    Autocast runs group norm in fp32: a bf16 activation is copied up, normalised, copied down by
    the next conv, and the SiLU between them runs at fp32 width. The kernels accumulate the
    statistics in fp32 for bf16 inputs anyway, so normalising the bf16 tensor directly gives the
    same result, rounded once to bf16 (what the next conv would do), for two fewer passes.
    A channels-last bf16 input on CPU is normalised as an NCHW copy and returned channels-last
    (the same numbers): PyTorch's channels-last bf16 kernel there is 15x slower.
    """
    if weight is not None:
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, enabled=False):
        if channels_last and x.device.type == "cpu" and x.dtype == torch.bfloat16:
            # Not in fp32: there the two copies cost more than PyTorch's kernel loses.
            out = F.group_norm(x.contiguous(), num_groups, weight, bias, eps)
            return out.contiguous(memory_format=torch.channels_last)
        return F.group_norm(x, num_groups, weight, bias, eps)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that keeps its input's dtype under autocast (see :func:`group_norm`)."""

    def forward(self, x: Tensor) -> Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def zero_(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place (residual branches start as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """ADM residual block with scale-shift norm and optional AdaGN on a conditioning vector.

    in:  h = conv3x3(SiLU(GN(x)))   (resampled between SiLU and conv when ``resample`` is set)
    out: h = conv3x3_zero(dropout(SiLU(m(h)))),  return skip(x) + h, where
        m(h) = GN(h)                                          without emb,
        m(h) = GN(h)·(1 + t_s) + t_b                           (ADM),   (t_s, t_b) = W_t SiLU(emb)
        m(h) = (GN(h)·(1 + t_s) + t_b)·(1 + z_s)               (DiffAE), z_s = W_z SiLU(cond)
        m(h) = (1 + z_s)·(GN(h)·(1 + t_s) + t_b) + z_b         (PDAE, ``cond_shift``).
    All modulations are folded into one per-(sample, channel) affine, so m costs one pass. With
    ``scale_shift_norm=False`` (iDDPM's LSUN model) the time embedding is added before the norm
    instead, m(h) = GN(h + t) with t = W_t SiLU(emb) (C wide), the AdaGN on ``cond`` on top.

    ``forward`` takes ``emb`` and ``cond`` *already passed through SiLU*: the UNet activates them
    once per call instead of once per block.

    Args:
        scale_shift_norm: Inject the time embedding as a scale and shift of the output norm
            (official ``use_scale_shift_norm=True``), else add it before the norm.
        norm_eps: ε of both group norms.
        Other arguments: as the names say; ``resample`` halves ("down") or doubles ("up") the
            resolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        emb_dim: int | None = None,
        cond_dim: int | None = None,
        cond_shift: bool = False,
        dropout: float = 0.0,
        num_groups: int = 32,
        resample: Literal["none", "up", "down"] = "none",
        scale_shift_norm: bool = True,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.resample = resample
        self.cond_shift, self.scale_shift_norm = cond_shift, scale_shift_norm
        self.in_norm = GroupNorm(num_groups, in_channels, norm_eps)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        n_emb = 2 * out_channels if scale_shift_norm else out_channels
        self.emb_proj = nn.Linear(emb_dim, n_emb) if emb_dim else None
        n_cond = 2 * out_channels if cond_shift else out_channels
        self.cond_proj = nn.Linear(cond_dim, n_cond) if cond_dim else None
        self.out_norm = GroupNorm(num_groups, out_channels, norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        same = in_channels == out_channels
        self.skip = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """Apply the block; ``emb`` (B, emb_dim) and ``cond`` (B, cond_dim) are post-SiLU."""
        h = F.silu(self.in_norm(x))
        if self.resample != "none":
            h, x = self._resample(h), self._resample(x)
        h = self.in_conv(h)
        norm = self.out_norm
        a: Tensor | None = None  # GN(h)·a + b: norm affine and modulations, per (sample, channel)
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("ResBlock was built with emb_dim but called without emb")
            e = self.emb_proj(emb)  # (B, 2C) or (B, C)
            if self.scale_shift_norm:  # (GN0(h)·γ + β)(1 + t_s) + t_b
                t_s, t_b = e.chunk(2, dim=1)  # (B, C) each
                a, b = norm.weight * (1 + t_s), torch.addcmul(t_b, norm.bias, 1 + t_s)
            else:
                h = h + e.to(h.dtype)[:, :, None, None]
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError("ResBlock was built with cond_dim but called without cond")
            if a is None:
                a, b = norm.weight[None], norm.bias[None]  # (1, C)
            z = self.cond_proj(cond)
            z_s, z_b = z.chunk(2, dim=1) if self.cond_shift else (z, None)
            a, b = a * (1 + z_s), b * (1 + z_s)  # ·(1 + z_s) [+ z_b]
            if z_b is not None:
                b = b + z_b
        if a is None:
            h = norm(h)
        else:
            h = group_norm(h, norm.num_groups, eps=norm.eps)
            a, b = a.to(h.dtype)[:, :, None, None], b.to(h.dtype)[:, :, None, None]
            h = torch.addcmul(b, h, a)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def downsample(
    channels: int, padding: Literal["symmetric", "asymmetric"] = "symmetric"
) -> nn.Conv2d:
    """Strided 3x3 conv halving the resolution: one zero row / column padded on every side
    ("symmetric", ADM's), or only at the bottom and right ("asymmetric": the original DDPM's,
    LDM's and diffusers' ``downsample_padding=0``). The same weights and output size; the pixel
    grid moves by half a pixel, so the two are not interchangeable for trained weights."""
    if padding == "asymmetric":
        return AsymmetricDownsample(channels)
    return nn.Conv2d(channels, channels, 3, stride=2, padding=1)


class AsymmetricDownsample(nn.Conv2d):
    """Strided 3x3 conv after ``F.pad(x, (0, 1, 0, 1))``: see :func:`downsample`."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)))


class Attention(nn.Module):
    """Multi-head attention softmax(QKᵀ/√d)·V on tokens (B, L, dim), heads = dim // head_dim.

    Self-attention uses one fused qkv projection; with ``context_dim`` Q comes from the tokens
    and K, V from the context (B, L_c, context_dim) (LDM cross-attention).
    """

    def __init__(
        self, dim: int, head_dim: int, context_dim: int | None = None, qkv_bias: bool = False
    ) -> None:
        super().__init__()
        self.heads = dim // head_dim
        if context_dim is None:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        B, L, C = x.shape
        if context is None:
            qkv = self.qkv(x).view(B, L, 3, self.heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, heads, L, d)
        else:
            q = self.q(x).view(B, L, self.heads, -1).transpose(1, 2)  # (B, heads, L, d)
            kv = self.kv(context).view(B, context.shape[1], 2, self.heads, -1)
            k, v = kv.permute(2, 0, 3, 1, 4)  # 2 x (B, heads, L_c, d)
        h = attention(q, k, v)  # (B, heads, L, d)
        return self.out(h.transpose(1, 2).reshape(B, L, C))


class AttentionBlock(nn.Module):
    """ADM self-attention block: x + proj_zero(MHA(GN(x))) over the H·W positions.

    ``norm=False``: no group norm, x + proj_zero(MHA(x)) (the middle attention of a diffusers
    UNet2DModel with ``resnet_time_scale_shift="scale_shift"``)."""

    def __init__(
        self, channels: int, head_dim: int, num_groups: int = 32, norm_eps: float = 1e-5,
        norm: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.norm = GroupNorm(num_groups, channels, norm_eps) if norm else nn.Identity()
        self.attn = Attention(channels, head_dim, qkv_bias=True)
        zero_(self.attn.out)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.attn(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        return x + h.transpose(1, 2).view(B, C, H, W)


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): W_2·dropout(a ⊙ GELU(g)), [a, g] = W_1·x."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, g = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(a * F.gelu(g)))


class TransformerBlock(nn.Module):
    """LDM transformer block: pre-LayerNorm self-attn, cross-attn and GEGLU, each residual.

    Without ``context_dim`` there is no cross-attention: a plain pre-norm encoder block (the
    caption encoder's)."""

    def __init__(
        self, dim: int, head_dim: int, context_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        crossed = context_dim is not None
        self.norm1, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim) if crossed else None
        self.self_attn = Attention(dim, head_dim)
        self.cross_attn = Attention(dim, head_dim, context_dim=context_dim) if crossed else None
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this transformer block cross-attends: context is required")
            x = x + self.cross_attn(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM spatial transformer: x + proj_out_zero(blocks(proj_in(GN(x)), context)).

    proj_in / proj_out are 1x1 convs applied as Linear layers on the (B, HW, C) tokens; the
    zero-initialised proj_out makes the whole block the identity at initialisation.
    """

    def __init__(
        self,
        channels: int,
        head_dim: int,
        context_dim: int,
        depth: int = 1,
        num_groups: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = GroupNorm(num_groups, channels)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, head_dim, context_dim, dropout) for _ in range(depth)
        )
        self.proj_out = zero_(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        for block in self.blocks:
            h = block(h, context)
        return x + self.proj_out(h).transpose(1, 2).view(B, C, H, W)


class AttentionPool2d(nn.Module):
    """ADM attention pooling (after CLIP): the mean token, plus a learned positional embedding,
    attends over all H·W tokens; its output is projected to ``out_dim``.

    Only the mean token's query is computed, since only its output is kept.
    """

    def __init__(self, spatial_size: int, channels: int, head_dim: int, out_dim: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(spatial_size**2 + 1, channels) / channels**0.5)
        self.heads = channels // head_dim
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.out = nn.Linear(channels, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        B, C = x.shape[:2]
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + self.pos  # (B, L, C)
        L = tokens.shape[1]
        q = self.q(tokens[:, :1]).view(B, 1, self.heads, -1).transpose(1, 2)  # (B, heads, 1, d)
        k, v = self.kv(tokens).view(B, L, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        h = attention(q, k, v)  # (B, heads, 1, d)
        return self.out(h.reshape(B, C))


class CondSequential(nn.Sequential):
    """A sequence of layers: ResBlocks get (emb, cond), spatial transformers get context.

    With ``checkpoint``, in training with grad enabled, each ResBlock and attention block keeps
    only its inputs for backward and recomputes its forward there
    (``torch.utils.checkpoint``, non-reentrant; the RNG state is restored, so dropout draws the
    same masks). The outputs and gradients are unchanged.
    """

    def __init__(self, *layers: nn.Module, checkpoint: bool = False) -> None:
        super().__init__(*layers)
        self.checkpoint = checkpoint

    def forward(
        self,
        h: Tensor,
        emb: Tensor | None = None,
        cond: Tensor | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        recompute = self.checkpoint and self.training and torch.is_grad_enabled()
        for layer in self:
            if isinstance(layer, ResBlock):
                args: tuple[Tensor | None, ...] = (h, emb, cond)
            elif isinstance(layer, SpatialTransformer):
                args = (h, context)
            else:
                args = (h,)
            # Not the resampling convs, as in ADM: a strided conv saves only its input, which a
            # checkpoint would keep as well.
            if recompute and isinstance(layer, ResBlock | AttentionBlock | SpatialTransformer):
                h = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                h = layer(*args)
        return h


@dataclass(frozen=True)
class BlockSpec:
    """How the ResBlocks and attention blocks of one network are built.

    Attention heads are ``head_dim`` channels wide, or, with ``num_heads``, each block has
    ``num_heads`` heads (``num_heads_up`` on the up path). The middle block's attention can go
    (``middle_attention``) or lose its group norm (``middle_attention_norm``). The sequences
    of :meth:`sequence` recompute their blocks in backward with ``gradient_checkpointing``."""

    emb_dim: int | None
    cond_dim: int | None
    cond_shift: bool
    dropout: float
    num_groups: int
    head_dim: int | None
    context_dim: int | None
    transformer_depth: int
    scale_shift_norm: bool = True
    num_heads: int | None = None
    num_heads_up: int | None = None
    norm_eps: float = 1e-5
    middle_attention: bool = True
    middle_attention_norm: bool = True
    gradient_checkpointing: bool = False

    def res_block(
        self, in_ch: int, out_ch: int, resample: Literal["none", "up", "down"] = "none"
    ) -> ResBlock:
        return ResBlock(
            in_ch, out_ch, self.emb_dim, self.cond_dim, self.cond_shift, self.dropout,
            self.num_groups, resample, self.scale_shift_norm, self.norm_eps,
        )  # fmt: skip

    def attention(self, ch: int, up: bool = False, norm: bool = True) -> nn.Module:
        """An attention block of ``ch`` channels; ``up``: one of the up path's."""
        heads = self.num_heads_up if up else self.num_heads
        head_dim = self.head_dim if heads is None else ch // heads
        if self.context_dim is None:
            return AttentionBlock(ch, head_dim, self.num_groups, self.norm_eps, norm)
        return SpatialTransformer(
            ch, head_dim, self.context_dim, self.transformer_depth, self.num_groups, self.dropout
        )

    def sequence(self, *layers: nn.Module) -> CondSequential:
        """``layers`` as one block of the network, checkpointed as the spec says."""
        return CondSequential(*layers, checkpoint=self.gradient_checkpointing)

    def middle(self, ch: int) -> CondSequential:
        """The middle block: ResBlock, attention, ResBlock (or two ResBlocks)."""
        if not self.middle_attention:
            return self.sequence(self.res_block(ch, ch), self.res_block(ch, ch))
        attention = self.attention(ch, norm=self.middle_attention_norm)
        return self.sequence(self.res_block(ch, ch), attention, self.res_block(ch, ch))
