"""The vector quantiser (VQ-VAE eq. 3, LDM's VQ-reg) against brute force and hand-built cases:
nearest codes, the straight-through gradient, where each loss term's gradient goes and with which
β, codebook usage, and the VQ first stage's shapes."""

import math

import pytest
import torch

from diffusion_apps.nn import Autoencoder, PointMass, VectorQuantizer, codebook_usage


def quantizer(k=7, d=3, beta=0.25, beta_on="commitment", seed=0):
    torch.manual_seed(seed)
    vq = VectorQuantizer(k, d, beta=beta, beta_on=beta_on)
    with torch.no_grad():
        vq.embedding.weight.normal_()  # spread codes: every test position has a clear nearest
    return vq


def test_nearest_code_matches_brute_force_distances():
    vq = quantizer(k=11, d=3)
    z = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    got = vq.nearest(z)
    e = vq.embedding.weight.detach()
    for b in range(2):
        for i in range(4):
            for j in range(5):
                distances = [float(((z[b, :, i, j] - e[k]) ** 2).sum()) for k in range(11)]
                assert got[b, i, j] == min(range(11), key=distances.__getitem__)
    q = vq(z)
    torch.testing.assert_close(q.z_q, e[got].permute(0, 3, 1, 2))  # the value is the code


def test_codebook_entries_quantise_to_themselves_with_zero_loss():
    vq = quantizer(k=5, d=2)
    idx = torch.tensor([[[0, 4, 2], [3, 3, 1]]])  # (1, 2, 3)
    z = vq.embedding.weight.detach()[idx].permute(0, 3, 1, 2).clone()  # (1, 2, 2, 3)
    q = vq(z)
    assert torch.equal(q.indices, idx) and torch.equal(q.z_q, z)
    assert q.loss == 0 and q.codebook == 0 and q.commitment == 0


def test_straight_through_gradient_is_the_identity_wrt_z_e():
    vq = quantizer()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    upstream = torch.randn(2, 3, 4, 4)
    (vq(z).z_q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)  # ∂z_q/∂z_e = I
    assert vq.embedding.weight.grad is None  # the decoder's gradient never reaches the codes


@pytest.mark.parametrize("beta_on", ["commitment", "codebook"])
def test_each_term_moves_its_own_side_with_its_weight(beta_on):
    """Codebook term ‖sg[z_e] − e‖²: gradient 2(e − z_e)/n on the chosen codes only; commitment
    term ‖z_e − sg[e]‖²: 2(z_e − e)/n on z_e only (n elements). β multiplies the term
    ``beta_on`` names; swapping the weights or the stop-gradients fails here."""
    beta = 0.3
    vq = quantizer(k=6, d=3, beta=beta, beta_on=beta_on)
    z = torch.randn(2, 3, 3, 3, requires_grad=True)
    q = vq(z)
    q.loss.backward()
    w_codebook, w_commit = (1.0, beta) if beta_on == "commitment" else (beta, 1.0)
    e = vq.embedding.weight.detach()[q.indices].permute(0, 3, 1, 2)
    n = z.numel()
    torch.testing.assert_close(z.grad, w_commit * 2 * (z.detach() - e) / n)
    expected = torch.zeros(6, 3)
    diff = (e - z.detach()).permute(0, 2, 3, 1).reshape(-1, 3)
    expected.index_add_(0, q.indices.flatten(), w_codebook * 2 * diff / n)
    torch.testing.assert_close(vq.embedding.weight.grad, expected)
    torch.testing.assert_close(q.codebook, q.commitment)  # the same value, different gradients
    torch.testing.assert_close(q.loss, (w_codebook + w_commit) * q.codebook)


def test_usage_and_perplexity_of_a_hand_built_assignment():
    # 8 positions: code 0 four times, codes 1 and 2 twice each, codes 3..9 never (K = 10).
    indices = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2]).view(2, 2, 2)
    perplexity, used = codebook_usage(indices, 10)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # = 1.5 ln 2
    torch.testing.assert_close(perplexity, torch.tensor(math.exp(entropy)))  # 2^1.5
    torch.testing.assert_close(used, torch.tensor(0.3))
    uniform, all_used = codebook_usage(torch.arange(10), 10)
    torch.testing.assert_close(uniform, torch.tensor(10.0))
    assert all_used == 1
    one, _ = codebook_usage(torch.full((5,), 3), 10)
    torch.testing.assert_close(one, torch.tensor(1.0))


def test_the_vq_autoencoder_diffuses_z_e_and_quantises_in_the_decoder():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 3)
    ae = Autoencoder(1, latent_channels=3, image_size=16, base_channels=8, channel_mult=(1, 2),
                     num_head_channels=8, num_groups=2, quantizer=vq)  # fmt: skip
    x = torch.randn(2, 1, 16, 16)
    posterior = ae.encode(x)
    assert isinstance(posterior, PointMass) and posterior.mean.shape == (2, 3, 8, 8)
    z_e = posterior.sample()
    assert torch.equal(z_e, posterior.mode())  # deterministic
    x_rec, q = ae(x)
    assert torch.equal(q.z_q, vq(z_e).z_q)
    torch.testing.assert_close(x_rec, ae.decode(z_e))  # decode quantises first
    torch.testing.assert_close(x_rec, ae.decode_code(vq.lookup(q.indices)))
    assert not torch.allclose(ae.decode_code(z_e), x_rec)  # …unlike decoding z_e itself


def test_bad_quantizer_options_are_refused():
    with pytest.raises(ValueError, match="embedding_dim=3 must equal latent_channels=4"):
        Autoencoder(1, latent_channels=4, base_channels=8, num_groups=2,
                    quantizer=VectorQuantizer(8, 3))  # fmt: skip
    with pytest.raises(ValueError, match="num_embeddings=0 must be a positive integer"):
        VectorQuantizer(0, 3)
    with pytest.raises(ValueError, match="beta_on='both'"):
        VectorQuantizer(8, 3, beta_on="both")
    with pytest.raises(ValueError, match=r"expected z_e of shape \(B, 3, h, w\)"):
        VectorQuantizer(8, 3)(torch.zeros(2, 4, 2, 2))
