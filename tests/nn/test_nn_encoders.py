"""EncoderUNet and PDAE's GradientEstimator: shapes, gradients, the shared down path, zero init,
validation."""

import pytest
import torch
from torch import nn

from diffusion_apps.nn import EncoderUNet, GradientEstimator, UNet
from diffusion_apps.nn.layers import Attention, ResBlock
from tests.factories import (
    ARCHS,
    TINY_NN,
    B,
    fold_patches,
    randomize_,
    unet_inputs,
    unfold_patches,
)


@pytest.mark.parametrize("pool", ["avg", "attention"])
@pytest.mark.parametrize("time_conditioned", [True, False])
def test_encoder_shapes_and_gradients(pool, time_conditioned):
    enc = randomize_(
        EncoderUNet(**TINY_NN, out_dim=7, pool=pool, time_conditioned=time_conditioned), 0.2, seed=1
    )
    x, t = torch.randn(B, 2, 8, 8), torch.randint(0, 1000, (B,))
    args = (x, t) if time_conditioned else (x,)
    z = enc(*args)
    assert z.shape == (B, 7)
    (z * torch.randn_like(z)).sum().backward()
    dead = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead
    enc.eval()
    with torch.no_grad():  # batch independence
        torch.testing.assert_close(enc(*args)[1:2], enc(*(a[1:2] for a in args)))
    if time_conditioned:
        assert not torch.allclose(enc(x, t), enc(x, t + 100), atol=1e-4)
        with pytest.raises(ValueError, match="t is required"):
            enc(x)
    else:
        assert not any("emb" in n for n, _ in enc.named_parameters())  # no time embedding at all
        with pytest.raises(ValueError, match="time_conditioned=False"):
            enc(x, t)


def test_encoder_shares_the_unet_down_path():
    unet, enc = UNet(**TINY_NN), EncoderUNet(**TINY_NN)
    assert unet.down.state_dict().keys() == enc.down.state_dict().keys()
    with pytest.raises(ValueError, match="pool"):
        EncoderUNet(**TINY_NN, pool="max")
    with pytest.raises(ValueError, match="image_size=10"):
        EncoderUNet(**{**TINY_NN, "image_size": 10, "channel_mult": (1, 1, 1)})
    with pytest.raises(
        ValueError, match="pool='attention' needs num_head_channels .* not num_heads=2"
    ):
        EncoderUNet(**{**TINY_NN, "num_head_channels": None}, num_heads=2, pool="attention")
    with pytest.raises(ValueError, match="num_head_channels=4 and num_heads=2"):
        EncoderUNet(**TINY_NN, num_heads=2)


def heads(module: nn.Module) -> list[int]:
    return [m.heads for m in module.modules() if isinstance(m, Attention)]


def blocks(module: nn.Module) -> list[tuple]:
    """(width, time-embedding width, scale_shift_norm) of every ResBlock."""
    res = [m for m in module.modules() if isinstance(m, ResBlock)]
    return [(m.out_norm.num_channels, m.emb_proj.out_features, m.scale_shift_norm) for m in res]


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_estimator_mirrors_the_up_path_and_starts_at_zero(arch):
    unet = randomize_(UNet(**{**TINY_NN, **ARCHS[arch]}), 0.2, seed=1)
    estimator = GradientEstimator(unet, z_dim=6)
    kw = unet_inputs(unet)
    z = torch.randn(B, 6)
    with torch.no_grad():  # as PDAE computes them: frozen inputs of G_ψ
        features = unet.down_features(kw["x"], kw["t"])
    out = estimator(features, z)
    assert out.shape == kw["x"].shape and not out.any()  # zero-initialised output conv
    randomize_(estimator, 0.2, seed=1)
    out = estimator(features, z)
    assert not torch.equal(out, estimator(features, z.flip(0)))  # z steers every sample
    ups = [m for m in estimator.up.modules() if getattr(m, "cond_shift", False)]
    assert len(ups) == sum(1 for m in unet.up.modules() if hasattr(m, "cond_shift"))
    for ours, theirs in ((estimator.middle, unet.down.middle), (estimator.up, unet.up)):
        assert heads(ours) == heads(theirs) and blocks(ours) == blocks(theirs)
    out.square().sum().backward()
    assert all(p.grad is not None for p in estimator.parameters())


def test_gradient_estimator_needs_an_unconditional_unet_and_its_z_width():
    with pytest.raises(ValueError, match="unconditional UNet"):
        GradientEstimator(UNet(**TINY_NN, num_classes=4), z_dim=6)
    unet = UNet(**TINY_NN)
    features = unet.down_features(**unet_inputs(unet))
    with pytest.raises(ValueError, match=r"expected z of shape \(3, 6\)"):
        GradientEstimator(unet, z_dim=6)(features, torch.zeros(3, 5))


def test_gradient_estimator_of_a_patched_unet_unfolds_its_output_as_the_unet_does():
    """On a patch_size=2 UNet, G_ψ is the estimator of the UNet with 4C channels on the folded
    image, unfolded back to (B, C, H, W): the shift lands on the pixels ε_θ predicts."""
    c = TINY_NN["in_channels"]
    patched = UNet(**{**TINY_NN, "image_size": 16, "patch_size": 2})
    plain = UNet(**{**TINY_NN, "in_channels": 4 * c})
    plain.load_state_dict(patched.state_dict())
    g_patched = randomize_(GradientEstimator(patched, 5), 0.2, seed=3).eval()
    g_plain = GradientEstimator(plain, 5).eval()
    g_plain.load_state_dict(g_patched.state_dict())
    x, t, z = torch.randn(B, c, 16, 16), torch.tensor([3, 500, 999]), torch.randn(B, 5)
    ours = g_patched(patched.down_features(x, t), z)
    expected = unfold_patches(g_plain(plain.down_features(fold_patches(x, 2), t), z), 2)
    torch.testing.assert_close(ours, expected)
