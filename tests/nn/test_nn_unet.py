"""UNet: shapes, zero init, every conditioning path, gradients, validation."""

import importlib
import sys

import pytest
import torch

import diffusion_apps
from diffusion_apps.nn import UNet
from diffusion_apps.nn.layers import Attention
from tests.factories import (
    ARCHS,
    CONDITIONINGS,
    TINY_NN,
    B,
    fold_patches,
    randomize_,
    unet_inputs,
    unfold_patches,
)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_unet_shape_and_zero_output_at_init(arch, conditioning):
    model = UNet(**{**TINY_NN, **ARCHS[arch], **CONDITIONINGS[conditioning]})
    kw = unet_inputs(model)
    out = model(**kw)
    assert out.shape == (B, model.out_channels, model.image_size, model.image_size)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv


@pytest.mark.parametrize("conditioning", ["all", "pdae", "diffae"])
def test_every_conditioning_changes_output(conditioning):
    model = randomize_(UNet(**TINY_NN, **CONDITIONINGS[conditioning]), 0.2, seed=1).eval()
    kw = unet_inputs(model)
    ref = model(**kw)
    assert ref.abs().mean() > 1e-3
    fresh = unet_inputs(model, seed=1)
    for name in kw.keys() - {"x"}:
        out = model(**{**kw, name: fresh[name]})
        assert not torch.allclose(out, ref, atol=1e-4), f"{name} does not reach the output"


def test_cond_shift_adds_a_shift():
    """PDAE's z_b term: same weights except the shift half, different outputs."""
    scale_only = randomize_(UNet(**TINY_NN, cond_dim=6), 0.2, seed=1).eval()
    shifted = randomize_(UNet(**TINY_NN, cond_dim=6, cond_shift=True), 0.2, seed=1).eval()
    with torch.no_grad():
        for (name, p), q in zip(scale_only.named_parameters(), shifted.parameters(), strict=True):
            if "cond_proj" in name:  # (C, d) -> (2C, d): keep z_s, zero z_b
                q.zero_()[: p.shape[0]] = p
            else:
                q.copy_(p)
    kw = unet_inputs(scale_only)
    torch.testing.assert_close(shifted(**kw), scale_only(**kw))
    with torch.no_grad():
        for name, q in shifted.named_parameters():
            if "cond_proj" in name:
                q[q.shape[0] // 2 :] = 0.3
    assert not torch.allclose(shifted(**kw), scale_only(**kw), atol=1e-4)


def test_null_label_and_label_errors():
    model = randomize_(UNet(**TINY_NN, num_classes=4), 0.2, seed=1).eval()
    kw = unet_inputs(model, batch=2)
    null = model(**{**kw, "y": torch.tensor([4, 4])})  # index num_classes is the null label
    cond = model(**{**kw, "y": torch.tensor([0, 0])})
    assert not torch.allclose(null, cond, atol=1e-4)
    for bad in ([5, 0], [-1, 0]):
        with pytest.raises(ValueError, match="num_classes=4"):
            model(**{**kw, "y": torch.tensor(bad)})
    with pytest.raises(ValueError, match="y"):
        model(**{**kw, "y": torch.tensor([0.0, 1.0])})
    with pytest.raises(ValueError, match="num_classes=4: y is required"):
        model(kw["x"], kw["t"])


@pytest.mark.parametrize(
    "arch,conditioning",
    [("tiny", "all"), ("updown", "class"), ("three_levels", "diffae"), ("adm_options", "all")],
)
def test_gradients_reach_every_parameter(arch, conditioning):
    """No unused parameters (DDP would hang on them)."""
    model = randomize_(
        UNet(**{**TINY_NN, **ARCHS[arch], **CONDITIONINGS[conditioning]}), 0.2, seed=1
    )
    out = model(**unet_inputs(model))
    (out * torch.randn_like(out)).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead


def test_batch_independence():
    """Sample i's output does not depend on the other samples (GroupNorm / attention reshapes)."""
    model = randomize_(
        UNet(**{**TINY_NN, **ARCHS["updown"]}, **CONDITIONINGS["all"]), 0.2, seed=1
    ).eval()
    kw = unet_inputs(model)
    batched = model(**kw)
    for i in range(B):
        single = model(**{k: v[i : i + 1] for k, v in kw.items()})
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=1e-4)


def test_scalar_and_float_timesteps():
    model = randomize_(UNet(**TINY_NN), 0.2, seed=1).eval()
    x = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(model(x, torch.tensor(7)), model(x, torch.tensor([7, 7])))
    torch.testing.assert_close(model(x, torch.tensor([7.0, 7.0])), model(x, torch.tensor([7, 7])))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image_size=30, channel_mult=(1, 2, 2, 2)), r"image_size=30 .* 2\*\*3=8"),
        (dict(num_groups=3), "num_groups=3"),
        (dict(base_channels=6, num_groups=4), "num_groups=4 .* base_channels=6"),
        (dict(num_head_channels=3), "num_head_channels=3"),
        (dict(attention_resolutions=(16,)), r"attention_resolutions=\(16,\)"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(channel_mult=(1, 0)), "channel_mult"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_classes=0), "num_classes"),
        (dict(cond_shift=True), "cond_shift"),
        (dict(context_dim=0), "context_dim"),
        (dict(out_channels=0), "out_channels"),
        (dict(channel_mult=(1, 0.1)), r"channel_mult=\(1, 0.1\) .* base_channels=8"),
        (dict(channel_mult=(0.625, 1)), r"num_groups=2 .* 5 channels of level 0"),
        (dict(num_heads=2, num_head_channels=4), "num_head_channels=4 and num_heads=2 are excl"),
        (dict(num_head_channels=None, num_heads_upsample=2), "num_heads_upsample=2 needs num_h"),
        (dict(num_head_channels=None, num_heads=0), "num_heads=0"),
        (dict(num_head_channels=None, num_heads=3), "num_heads=3 does not divide 8 channels"),
        (
            dict(num_head_channels=None, num_heads=2, num_heads_upsample=3),
            "num_heads_upsample=3 does not divide 8 channels of the up path's attention",
        ),
        (dict(norm_eps=0.0), "norm_eps=0.0"),
        (dict(downsample_padding="same"), "downsample_padding='same'"),
        (dict(freq_shift=4), r"freq_shift=4 must be below dim // 2 = 4"),
        (dict(middle_attention=False, middle_attention_norm=False), "middle_attention_norm"),
        (dict(patch_size=0), "patch_size=0"),
        (dict(image_size=8, patch_size=3), "image_size=8 is not divisible by patch_size=3"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**{**TINY_NN, **kwargs})


def test_without_null_label_the_embedding_has_num_classes_rows():
    model = randomize_(UNet(**TINY_NN, num_classes=4, null_label=False), 0.2, seed=1).eval()
    assert model.label_embed.num_embeddings == 4 and not model.null_label
    with_null = UNet(**TINY_NN, num_classes=4)
    assert with_null.label_embed.num_embeddings == 5 and with_null.null_label
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([1, 500])
    assert model(x, t, torch.tensor([0, 3])).shape == x.shape
    for bad in ([4, 0], [-1, 0]):
        with pytest.raises(ValueError, match=r"\[0, num_classes - 1 = 3\]: .* null_label=False"):
            model(x, t, torch.tensor(bad))


def test_head_options_set_the_heads_of_every_attention_block():
    def heads(path):
        return [m.heads for m in path.modules() if isinstance(m, Attention)]

    # attention at 8x8 (32 channels), 4x4 and in the middle (64 channels)
    three = dict(ARCHS["three_levels"], base_channels=16, channel_mult=(1, 2, 4))
    fixed_width = UNet(**{**TINY_NN, **three, "num_head_channels": 8})
    assert heads(fixed_width.down) == [4, 4, 8, 8, 8] and heads(fixed_width.up) == [8] * 3 + [4] * 3
    assert UNet(**{**TINY_NN, **three, "num_head_channels": None}).down.spec.head_dim == 32
    fixed = UNet(
        **{**TINY_NN, **three, "num_head_channels": None, "num_heads": 4, "num_heads_upsample": 2}
    )
    assert heads(fixed.down) == [4] * 5 and heads(fixed.up) == [2] * 6  # the middle: num_heads
    default_up = UNet(**{**TINY_NN, **three, "num_head_channels": None, "num_heads": 4})
    assert heads(default_up.up) == [4] * 6
    ldm = UNet(**{**TINY_NN, **three, "num_head_channels": None, "num_heads": 4, "context_dim": 5})
    assert set(heads(ldm)) == {4} and len(heads(ldm)) == 2 * 11  # self- and cross-attention


def test_original_ddpm_options(monkeypatch):
    """norm_eps reaches every group norm, the downsampling convs pad asymmetrically, the time
    embedding takes sin_first / freq_shift, the middle block loses its attention or its norm;
    the state-dict keys change only where a layer goes."""
    from diffusion_apps.nn import layers

    default = UNet(**TINY_NN)
    ddpm = dict(norm_eps=1e-6, downsample_padding="asymmetric", sin_first=True, freq_shift=1)
    model = randomize_(UNet(**TINY_NN, scale_shift_norm=False, **ddpm), 0.2, seed=0).eval()
    assert model.state_dict().keys() == UNet(**TINY_NN, scale_shift_norm=False).state_dict().keys()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and {m.eps for m in norms} == {1e-6}
    assert {m.eps for m in default.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-5}
    resampling = [type(m[0]).__name__ for m in model.down.blocks if not hasattr(m[0], "in_norm")]
    assert resampling == ["AsymmetricDownsample"]
    seen = []
    real = layers.timestep_embedding
    monkeypatch.setattr(layers, "timestep_embedding", lambda *a: seen.append(a[3:]) or real(*a))
    model(torch.randn(2, 2, 8, 8), torch.tensor([3, 9]))
    assert seen == [(True, 1)]
    bare = UNet(**TINY_NN, middle_attention_norm=False).down.middle
    assert isinstance(bare[1].norm, torch.nn.Identity)
    plain = UNet(**TINY_NN, middle_attention=False)
    assert [type(m).__name__ for m in plain.down.middle] == ["ResBlock", "ResBlock"]
    assert plain.down.middle[1].in_norm.weight.shape == default.down.middle[2].in_norm.weight.shape


def test_fractional_channel_mult_widths():
    model = UNet(**{**TINY_NN, "base_channels": 16, "channel_mult": (0.5, 1)})
    assert model.down.level_channels == (8, 16)
    assert model.down.conv_in.out_channels == 8 and model.out_conv.in_channels == 8
    assert model.time_embed[0].in_features == 16 and model.time_embed[2].out_features == 64


def test_bad_inputs_raise():
    model = UNet(**TINY_NN, cond_dim=6, context_dim=5)
    kw = unet_inputs(model, batch=2)
    bad = [
        (dict(x=torch.randn(2, 2, 16, 16)), r"\(B, 2, 8, 8\).*\(2, 2, 16, 16\)"),
        (dict(x=torch.randn(2, 3, 8, 8)), r"\(B, 2, 8, 8\).*\(2, 3, 8, 8\)"),
        (dict(t=torch.zeros(3)), "t of shape"),
        (dict(cond=None), "cond_dim=6: cond is required"),
        (dict(cond=torch.randn(2, 5)), "cond of shape"),
        (dict(context=None), "context_dim=5: context is required"),
        (dict(context=torch.randn(2, 4)), "context of shape"),
        (dict(context=torch.randn(2, 3, 4)), "context of shape"),
        (dict(y=torch.tensor([0, 1])), "without num_classes"),
    ]
    for override, match in bad:
        with pytest.raises(ValueError, match=match):
            model(**{**kw, **override})


@pytest.mark.parametrize("conditioning", ["none", "all"])
def test_the_two_halves_compose_to_forward_and_leave_the_features_intact(conditioning):
    model = randomize_(UNet(**TINY_NN, **CONDITIONINGS[conditioning]), 0.2, seed=1).eval()
    kw = unet_inputs(model)
    features = model.down_features(**kw)
    skips = list(features.skips)
    assert torch.equal(model.up_from(features), model(**kw))
    assert all(a is b for a, b in zip(features.skips, skips, strict=True))  # not consumed


def test_a_patched_unet_is_the_unet_on_space_to_depth_folded_images():
    """patch_size=p: x (B, C, H, W) is cut into p×p patches, each patch's p²C values become the
    channels of one position; the output is unfolded the same way. So it equals the p = 1 UNet
    with p²C channels on images of H/p, between the fold and the unfold."""
    p, c = 2, TINY_NN["in_channels"]
    patched = UNet(**{**TINY_NN, "image_size": 16, "patch_size": p})
    plain = UNet(**{**TINY_NN, "in_channels": p * p * c})
    randomize_(patched, 0.2, seed=2).eval()
    plain.load_state_dict(patched.state_dict())
    x, t = torch.randn(B, c, 16, 16), torch.tensor([3, 500, 999])
    expected = unfold_patches(plain(fold_patches(x, p), t), p)
    torch.testing.assert_close(patched(x, t), expected)
    assert patched.sample_shape == (c, 16, 16)


def test_nn_does_not_import_lightning(monkeypatch):
    """Re-import diffusion_apps.nn with lightning blocked (monkeypatch restores sys.modules)."""
    monkeypatch.setattr(diffusion_apps, "nn", diffusion_apps.nn)  # restored after the re-import
    for name in [m for m in sys.modules if m.startswith("diffusion_apps.nn")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("lightning", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # `import lightning` now raises
    importlib.import_module("diffusion_apps.nn")
