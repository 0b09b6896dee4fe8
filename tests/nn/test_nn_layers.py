"""Layers checked against literal, loop-over-heads re-implementations of their equations."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_apps.nn import timestep_embedding
from diffusion_apps.nn.layers import (
    Attention,
    AttentionBlock,
    AttentionPool2d,
    ResBlock,
    SpatialTransformer,
    downsample,
)
from tests.factories import randomize_


def naive_mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q_h K_hᵀ/√d) V_h per head h, on (B, L, C) tensors whose channels are head-major."""
    d = q.shape[-1] // heads
    out = []
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), dim=-1)
        out.append(a @ v[..., s])
    return torch.cat(out, dim=-1)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    freqs = 10000.0 ** (-torch.arange(4) / 4)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    odd = timestep_embedding(t.float() + 0.5, 7)
    assert odd.shape == (3, 7) and torch.all(odd[:, -1] == 0)


def test_timestep_embedding_of_the_original_ddpm():
    """[sin, cos], ω_i = 10000^(−i/(h − 1)): DDPM's get_timestep_embedding (diffusers'
    flip_sin_to_cos=False, freq_shift=1)."""
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 8, sin_first=True, freq_shift=1)
    freqs = 10000.0 ** (-torch.arange(4) / 3)
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    with pytest.raises(ValueError, match="freq_shift=4"):
        timestep_embedding(t, 8, freq_shift=4)


def test_asymmetric_downsample_pads_bottom_and_right():
    torch.manual_seed(0)
    conv = downsample(4, "asymmetric")
    x = torch.randn(2, 4, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)
    torch.testing.assert_close(conv(x), expected)
    assert conv(x).shape == downsample(4)(x).shape == (2, 4, 4, 4)
    assert conv.state_dict().keys() == downsample(4).state_dict().keys()


def test_attention_block_without_norm():
    torch.manual_seed(0)
    block = randomize_(AttentionBlock(16, head_dim=8, norm=False), 0.3)
    x = torch.randn(2, 16, 3, 3)
    tok = x.flatten(2).transpose(1, 2)  # (B, HW, C), no group norm
    q, k, v = block.attn.qkv(tok).split(16, dim=-1)
    expected = x + block.attn.out(naive_mha(q, k, v, heads=2)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    assert not any("norm" in key for key in block.state_dict())


@pytest.mark.parametrize("shift", [False, True])
def test_resblock_adagn_matches_formula(shift):
    """The folded affine equals DiffAE h·(1+z_s) and PDAE (1+z_s)·h + z_b, h = GN·(1+t_s)+t_b."""
    torch.manual_seed(0)
    block = randomize_(ResBlock(8, 12, emb_dim=6, cond_dim=5, cond_shift=shift, num_groups=4), 0.3)
    x, emb, cond = torch.randn(3, 8, 6, 6), torch.randn(3, 6), torch.randn(3, 5)
    h = block.in_conv(F.silu(block.in_norm(x)))
    t_s, t_b = block.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
    z = block.cond_proj(cond)[:, :, None, None]
    h = block.out_norm(h) * (1 + t_s) + t_b
    h = (1 + z[:, :12]) * h + z[:, 12:] if shift else h * (1 + z)
    expected = block.skip(x) + block.out_conv(F.silu(h))
    torch.testing.assert_close(block(x, emb, cond), expected)


def test_resblock_without_emb_and_resampling():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    plain = randomize_(ResBlock(8, 8, num_groups=2), 0.3)
    expected = x + plain.out_conv(F.silu(plain.out_norm(plain.in_conv(F.silu(plain.in_norm(x))))))
    torch.testing.assert_close(plain(x), expected)
    down = ResBlock(8, 16, emb_dim=4, num_groups=2, resample="down")
    assert down(x, torch.randn(2, 4)).shape == (2, 16, 4, 4)
    assert ResBlock(8, num_groups=2, resample="up")(x).shape == (2, 8, 16, 16)
    with pytest.raises(ValueError, match="emb"):
        ResBlock(8, emb_dim=4, num_groups=2)(x)


def test_adm_attention_block_matches_naive():
    torch.manual_seed(0)
    block = randomize_(AttentionBlock(16, head_dim=4, num_groups=4), 0.3)
    x = torch.randn(2, 16, 5, 3)  # non-square, so H/W mix-ups show
    tok = block.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    q, k, v = block.attn.qkv(tok).split(16, dim=-1)
    out = block.attn.out(naive_mha(q, k, v, heads=4))
    expected = x + out.transpose(1, 2).reshape(2, 16, 5, 3)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_matches_naive():
    torch.manual_seed(0)
    attn = randomize_(Attention(8, head_dim=4, context_dim=6), 0.3)
    assert attn.q.bias is None and attn.kv.bias is None  # LDM: no biases on q, k, v
    x, ctx = torch.randn(2, 7, 8), torch.randn(2, 3, 6)
    k, v = attn.kv(ctx).split(8, dim=-1)
    expected = attn.out(naive_mha(attn.q(x), k, v, heads=2))
    torch.testing.assert_close(attn(x, ctx), expected, atol=1e-5, rtol=1e-5)


def test_attention_pool_matches_naive():
    """ADM pooling: all tokens attend, the mean token's output (index 0) is kept."""
    torch.manual_seed(0)
    pool = randomize_(AttentionPool2d(spatial_size=3, channels=8, head_dim=4, out_dim=5), 0.3)
    x = torch.randn(2, 8, 3, 3)
    tok = x.flatten(2).transpose(1, 2)
    tok = torch.cat([tok.mean(1, keepdim=True), tok], dim=1) + pool.pos
    k, v = pool.kv(tok).split(8, dim=-1)
    expected = pool.out(naive_mha(pool.q(tok), k, v, heads=2)[:, 0])
    torch.testing.assert_close(pool(x), expected, atol=1e-5, rtol=1e-5)


def test_spatial_transformer_identity_at_init_then_uses_context():
    torch.manual_seed(0)
    block = SpatialTransformer(8, head_dim=4, context_dim=6, depth=2, num_groups=2)
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 6)
    assert torch.equal(block(x, ctx), x)
    randomize_(block, 0.3)
    assert not torch.allclose(block(x, ctx), block(x, torch.randn(2, 3, 6)))
    # Context of any length works and each sample only sees its own context.
    ctx5 = torch.randn(2, 5, 6)
    torch.testing.assert_close(block(x, ctx5)[1:], block(x[1:], ctx5[1:]), atol=1e-5, rtol=1e-5)
