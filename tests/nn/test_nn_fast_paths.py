"""The speed options change no numbers beyond float (or bf16) rounding.

Each fast path is checked against the plain fp32 computation of the same equation: attention
against softmax(QKᵀ/√d)V written out, group norm against its definition, channels-last and
``torch.compile`` against the same weights run eagerly in NCHW.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_apps.nn import EncoderUNet, UNet, layers
from diffusion_apps.nn.layers import GroupNorm, attention, group_norm
from tests.factories import CONDITIONINGS, TINY_NN, randomize_, unet_inputs

BF16_EPS = 2.0**-8  # bf16 unit roundoff


def softmax_attention(q, k, v):
    """softmax(QKᵀ/√d)·V in float64, the closed form the fused kernels compute."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


def group_norm_definition(x, groups, weight, bias, eps=1e-5):
    """(x − μ_g)/√(σ²_g + ε)·γ + β with μ_g, σ²_g over each group of channels, in float64."""
    B, C = x.shape[:2]
    xg = x.double().reshape(B, groups, -1)
    mean, var = xg.mean(-1, keepdim=True), xg.var(-1, unbiased=False, keepdim=True)
    normed = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, C) + (1,) * (x.ndim - 2)
    return normed * weight.double().view(shape) + bias.double().view(shape)


def test_attention_matches_softmax_formula_in_fp32_and_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g) for _ in range(3))
    expected = softmax_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v).double(), expected, atol=1e-6, rtol=1e-5)
    with torch.autocast("cpu", torch.bfloat16):
        low = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert low.dtype == torch.bfloat16
    # Only the bf16 rounding of q, k, v and of the output remains: the product runs in fp32.
    rounded = softmax_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    torch.testing.assert_close(low.double(), rounded, atol=2 * BF16_EPS, rtol=2 * BF16_EPS)


@pytest.mark.parametrize("amx", [True, False])
def test_bf16_attention_kernel_is_chosen_by_gradients_and_amx(monkeypatch, amx):
    """Sampling on an AMX CPU keeps bf16 in SDPA's bf16 kernel; training, or a CPU without AMX,
    attends in fp32. Either way the result is softmax(QKᵀ/√d)V of the bf16-rounded inputs to
    bf16 accuracy (the bf16 kernel also rounds its probabilities: a few units of 2⁻⁸)."""
    monkeypatch.setattr(layers, "cpu_has_amx", lambda: amx)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=g).bfloat16() for _ in range(3))
    exact = softmax_attention(q, k, v)
    bf16_kernel = F.scaled_dot_product_attention(q, k, v)
    fp32_kernel = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16()
    assert not torch.equal(bf16_kernel, fp32_kernel)  # the two kernels are told apart
    with torch.autocast("cpu", torch.bfloat16):
        with torch.no_grad():
            sampling = attention(q, k, v)
        training = attention(*(t.clone().requires_grad_() for t in (q, k, v)))
    torch.testing.assert_close(sampling, bf16_kernel if amx else fp32_kernel, atol=0, rtol=0)
    torch.testing.assert_close(training.detach(), fp32_kernel, atol=0, rtol=0)
    for out in (sampling, training):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), exact, atol=4 * BF16_EPS, rtol=4 * BF16_EPS)


def test_group_norm_keeps_bf16_under_autocast_and_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(4, 8, 5, 5, generator=g) + 10  # a large mean: stats must be accurate
    norm = GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
    expected = group_norm_definition(x, 4, norm.weight, norm.bias)
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-5, rtol=1e-5)
    xb = x.bfloat16()
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        out = norm(xb)
    assert out.dtype == torch.bfloat16  # autocast alone would return fp32
    # Statistics of the bf16 input accumulate in fp32: the error is the output's rounding.
    exact = group_norm_definition(xb.float(), 4, norm.weight.bfloat16(), norm.bias.bfloat16())
    err = (out.double() - exact).abs() / exact.abs().clamp(min=1)
    assert err.max() <= 2 * BF16_EPS
    plain = group_norm(x, 2)  # no affine
    torch.testing.assert_close(plain, F.group_norm(x, 2))


def test_bf16_group_norm_of_a_channels_last_input_equals_the_nchw_one():
    """The channels-last bf16 path normalises an NCHW copy: the same numbers and gradients as
    the NCHW input gets, handed on channels-last."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 8, 5, 5, generator=g) + 1).bfloat16()
    weight, bias = torch.randn(8, generator=g), torch.randn(8, generator=g)
    grad = torch.randn(x.shape, generator=g).bfloat16()
    outs, grads = [], []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        xi = x.clone(memory_format=memory_format).requires_grad_()
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            out = group_norm(xi, 4, w, b)
        out.backward(grad.contiguous(memory_format=memory_format))
        assert out.is_contiguous(memory_format=memory_format)
        outs.append(out)
        grads.append((xi.grad, w.grad, b.grad))
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    for fast, plain in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(fast, plain, atol=0, rtol=0)
    exact = group_norm_definition(x.float(), 4, weight.bfloat16(), bias.bfloat16())
    assert ((outs[1].double() - exact).abs() / exact.abs().clamp(min=1)).max() <= 2 * BF16_EPS


@pytest.mark.parametrize("conditioning", ["none", "all"])
def test_unet_channels_last_gives_the_same_outputs_and_gradients(conditioning):
    kw = {**TINY_NN, **CONDITIONINGS[conditioning]}
    dense = randomize_(UNet(**kw), 0.2, seed=1)
    fast = UNet(**kw, channels_last=True)
    fast.load_state_dict(dense.state_dict())
    assert fast.down.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.out_conv.weight.is_contiguous(memory_format=torch.channels_last)
    args = unet_inputs(dense)
    out_dense, out_fast = dense(**args), fast(**args)
    torch.testing.assert_close(out_fast, out_dense, atol=1e-5, rtol=1e-5)
    out_dense.square().sum().backward()
    out_fast.square().sum().backward()
    for (name, p), q in zip(dense.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)
    # A checkpoint of the channels-last net loads into a dense one unchanged.
    dense.load_state_dict(fast.state_dict())
    torch.testing.assert_close(dense(**args), out_fast, atol=1e-5, rtol=1e-5)


def test_encoder_channels_last_gives_the_same_outputs():
    kw = dict(TINY_NN)
    dense = randomize_(EncoderUNet(**kw, out_dim=5, pool="attention"), 0.2, seed=1)
    fast = EncoderUNet(**kw, out_dim=5, pool="attention", channels_last=True)
    fast.load_state_dict(dense.state_dict())
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([1, 50, 999])
    torch.testing.assert_close(fast(x, t), dense(x, t), atol=1e-5, rtol=1e-5)


def test_unet_under_bf16_autocast_stays_close_to_fp32():
    """bf16-mixed changes the numbers by rounding only: a relative error of a few bf16 eps."""
    net = randomize_(UNet(**{**TINY_NN, **CONDITIONINGS["all"]}, channels_last=False), 0.2, seed=1)
    args = unet_inputs(net)
    with torch.no_grad():
        ref = net(**args)
        with torch.autocast("cpu", torch.bfloat16):
            low = net(**args)
    rel = (low.float() - ref).norm() / ref.norm()
    assert low.dtype == torch.bfloat16 and rel < 16 * BF16_EPS


@pytest.mark.slow  # inductor's C++ build: 73 s on a 2-core Zen 1; compile is off by default
def test_compiled_unet_matches_eager():
    torch._dynamo.reset()
    net = randomize_(UNet(**TINY_NN), 0.2, seed=1).eval()
    args = unet_inputs(net)
    with torch.no_grad():
        eager = net(**args)
        compiled = torch.compile(net)(**args)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
