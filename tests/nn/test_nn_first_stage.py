"""LDM's first-stage networks: shapes for every f, the Gaussian posterior's KL and samples against
closed forms, the hinge loss, the patch discriminator's receptive field, the condition encoders."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_apps.methods.autoencoder_kl import hinge_d_loss
from diffusion_apps.nn import (
    Autoencoder,
    CaptionEncoder,
    ClassEmbedder,
    DiagonalGaussian,
    PatchDiscriminator,
)


@pytest.mark.parametrize(("mult", "f"), [((1, 2), 2), ((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
def test_shapes_for_each_downsampling_factor(mult, f):
    torch.manual_seed(0)
    ae = Autoencoder(1, latent_channels=3, image_size=32, base_channels=8, channel_mult=mult,
                     num_res_blocks=1, num_head_channels=8, num_groups=2)  # fmt: skip
    x = torch.randn(2, 1, 32, 32)
    q = ae.encode(x)
    assert ae.factor == f and ae.latent_shape == (3, 32 // f, 32 // f)
    assert q.mean.shape == q.std.shape == (2, 3, 32 // f, 32 // f)
    assert ae.decode(q.sample()).shape == x.shape
    with pytest.raises(ValueError, match="expected z of shape"):
        ae.decode(torch.zeros(2, 3, 5, 5))


def test_ldm_layout_options_keep_the_keys_and_pad_bottom_right():
    """norm_eps and downsample_padding="asymmetric" (LDM's, Stable Diffusion's VAE): the same
    state-dict keys and shapes; every GroupNorm takes the ε; the strided conv sees one zero row
    and column at the bottom and right only."""
    options = dict(latent_channels=3, base_channels=8, channel_mult=(1, 2), num_head_channels=16,
                   num_groups=2)  # fmt: skip
    plain = Autoencoder(1, **options)
    ldm = Autoencoder(1, **options, norm_eps=1e-6, downsample_padding="asymmetric")
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ldm) == shapes(plain)
    norms = [m for m in ldm.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 24 and all(m.eps == 1e-6 for m in norms)  # 10 encoding, 14 decoding
    assert all(m.eps == 1e-5 for m in plain.modules() if isinstance(m, torch.nn.GroupNorm))
    conv = ldm.encoder.blocks[1][0]
    x = torch.randn(2, 8, 32, 32)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)
    assert torch.equal(conv(x), expected) and expected.shape == (2, 8, 16, 16)
    assert ldm.decode(ldm.encode(torch.randn(2, 1, 32, 32)).mode()).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="downsample_padding='same' must be"):
        Autoencoder(1, **options, downsample_padding="same")
    with pytest.raises(ValueError, match="norm_eps=0 must be > 0"):
        Autoencoder(1, **options, norm_eps=0)


def test_kl_is_zero_for_the_standard_normal_and_matches_its_closed_form():
    assert torch.equal(DiagonalGaussian(torch.zeros(2, 8, 4, 4)).kl(), torch.zeros(2))
    mu, logvar = 0.7, math.log(0.3)
    moments = torch.cat([torch.full((1, 2, 3, 3), mu), torch.full((1, 2, 3, 3), logvar)], 1)
    per_dim = 0.5 * (mu**2 + 0.3 - 1 - logvar)  # KL(N(μ, σ²) ‖ N(0, 1))
    torch.testing.assert_close(DiagonalGaussian(moments).kl(), torch.tensor([18 * per_dim]))


def test_posterior_samples_have_its_mean_and_std():
    moments = torch.cat([torch.full((1, 1, 100, 100), -1.5), torch.full((1, 1, 100, 100), 1.0)], 1)
    q = DiagonalGaussian(moments)
    z = q.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean() + 1.5) < 0.03 and abs(z.std() - math.exp(0.5)) < 0.03
    assert torch.equal(q.mode(), moments[:, :1])


def test_hinge_loss_closed_form():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0  # both margins met
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1.0  # ½ (1 + 1)
    assert hinge_d_loss(torch.full((4,), 0.5), torch.full((4,), 0.25)) == 0.5 * (0.5 + 1.25)


def test_patch_discriminator_gives_one_logit_per_patch():
    d = PatchDiscriminator(1, base_channels=8, num_layers=2)
    logits = d(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 1, 6, 6)  # 32 -> 16 -> 8 -> 7 -> 6 (4x4 convs, stride 2, 2, 1, 1)
    d.eval()
    x = torch.randn(1, 1, 32, 32)
    y = x.clone()
    y[..., :8, :8] += 5  # a corner changes: the far corner's logit does not see it
    assert torch.equal(d(x)[..., -1, -1], d(y)[..., -1, -1])
    assert not torch.equal(d(x)[..., 0, 0], d(y)[..., 0, 0])


def test_class_embedder_has_a_null_row_and_names_bad_labels():
    emb = ClassEmbedder(10, 16)
    ctx = emb(torch.tensor([0, 9, 10]))
    assert ctx.shape == (3, 1, 16)
    assert torch.equal(emb.null(2), torch.tensor([10, 10]))
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        emb(torch.tensor([11]))


def test_caption_encoder_tokenizes_and_names_unknown_words():
    enc = CaptionEncoder(["thin", "seven"], dim=16, depth=1, head_dim=8, max_len=3)
    ids = enc.tokenize(["thin seven", "Seven", ""])
    assert ids.tolist() == [[1, 2, 0], [2, 0, 0], [0, 0, 0]]
    assert torch.equal(enc.null(1), ids[2:])  # ∅ is the empty caption
    assert enc(ids).shape == (3, 3, 16)
    with pytest.raises(ValueError, match=r"\['fat'\]"):
        enc.tokenize(["fat seven"])
    with pytest.raises(ValueError, match="max_len=3"):
        enc.tokenize(["thin thin thin seven"])


def test_caption_context_depends_on_every_word():
    torch.manual_seed(0)
    enc = CaptionEncoder(["thin", "thick", "seven"], dim=16, depth=1, head_dim=8, max_len=2)
    a, b = enc(enc.tokenize(["thin seven", "thick seven"]))
    assert not torch.allclose(a, b)  # the first word reaches every position (self-attention)
