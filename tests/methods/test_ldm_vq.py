"""LDM with the VQ-regularised first stage (VQ-reg): its loss terms against their closed forms, the
codebook usage in TensorBoard, the tiny config's steps, and a stage 2 that diffuses the
pre-quantisation z_e and decodes through the codebook."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_apps.checkpoint import load_module, read_checkpoint
from diffusion_apps.methods import AutoencoderKL, LatentDiffusion
from diffusion_apps.nn import PointMass, Quantized
from tests.conftest import CONFIGS, run_cli_in

VQ_CKPT = "runs/tiny_ldm_autoencoder_vq/version_0/checkpoints/last.ckpt"
LDM_CKPT = "runs/tiny_ldm/version_0/checkpoints/last.ckpt"
QUIET = ["--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The tiny VQ first stage (4 batches, the discriminator on from batch 2), and the tiny
    class-conditional LDM trained on it for 2 steps, via the CLI."""
    return run_cli_in(
        tmp_path_factory.mktemp("ldm_vq"),
        ["fit", "--config", str(CONFIGS / "tiny/ldm_autoencoder_vq.yaml"), *QUIET],
        ["fit", "--config", str(CONFIGS / "tiny/ldm.yaml"), "--model.init_args.first_stage",
         VQ_CKPT, "--trainer.max_steps", "2", *QUIET],
    )  # fmt: skip


def digits(n, seed=2):
    torch.manual_seed(seed)
    return torch.rand(n, 1, 16, 16) * 2 - 1


def test_the_tiny_vq_config_trains_both_players_and_logs_codebook_usage(run_dir):
    ckpt = read_checkpoint(run_dir / VQ_CKPT)
    assert ckpt["global_step"] == 2 + 2 * 2  # 2 batches alone, then 2 with the discriminator
    assert "logvar" not in ckpt["state_dict"]  # the VQ loss has no learned log-variance
    assert "autoencoder.quantizer.embedding.weight" in ckpt["state_dict"]
    events = EventAccumulator(str(run_dir / "runs/tiny_ldm_autoencoder_vq/version_0"))
    events.Reload()
    logged = set(events.Tags()["scalars"])
    assert {"train/perplexity", "train/codebook_usage", "train/codebook", "train/commitment",
            "val/perplexity", "val/codebook_usage", "train/d", "val/psnr"} <= logged  # fmt: skip
    assert "train/kl" not in logged
    usage = [e.value for e in events.Scalars("train/codebook_usage")]
    perplexity = [e.value for e in events.Scalars("train/perplexity")]
    assert all(1 / 16 <= u <= 1 for u in usage) and all(1 <= p <= 16 for p in perplexity)


def test_the_vq_loss_terms_match_their_closed_forms(run_dir):
    """nll = mean |x − x̂| (no log-variance), regularizer = w_VQ · L_VQ, usage of the indices."""
    ae = load_module(run_dir / VQ_CKPT, AutoencoderKL)
    ae.codebook_weight = 3.0
    x = digits(3)
    indices = torch.tensor([0, 0, 1, 2]).repeat(48).view(3, 8, 8)  # codes 0, 0, 1, 2 in turn
    latent = Quantized(torch.zeros(3, 2, 8, 8), indices, torch.tensor(0.2), torch.tensor(0.2),
                       torch.tensor(0.25))  # fmt: skip
    terms = ae.losses(x, x + 0.1, latent)
    torch.testing.assert_close(terms["nll"], torch.tensor(0.1))
    torch.testing.assert_close(terms["regularizer"], torch.tensor(0.75))
    torch.testing.assert_close(terms["codebook_usage"], torch.tensor(3 / 16))
    torch.testing.assert_close(terms["perplexity"], torch.tensor(2**1.5))  # p = ½, ¼, ¼


def test_reconstruct_decodes_the_nearest_codes(run_dir):
    ae = load_module(run_dir / VQ_CKPT, AutoencoderKL)
    x = digits(2)
    posterior = ae.encode(x)
    assert isinstance(posterior, PointMass)
    codes = ae.quantizer.lookup(ae.quantizer.nearest(posterior.mean))
    expected = ae.autoencoder.decode_code(codes).clamp(-1, 1)
    torch.testing.assert_close(ae.reconstruct(x), expected)


def test_the_ldm_diffuses_z_e_and_its_decoder_quantises(run_dir):
    """z_0 = s·z_e (the pre-quantisation latent, no sampling) and decode(z_0) = D(e_k(z_0/s)):
    any point of a code's Voronoi cell decodes as the code itself."""
    ldm = load_module(run_dir / LDM_CKPT, LatentDiffusion)
    first = load_module(run_dir / VQ_CKPT, AutoencoderKL)
    assert bool(ldm.scale_ready) and ldm.first_stage.quantizer is not None
    x = digits(3)
    z_e = first.encode(x).mode()
    torch.testing.assert_close(ldm.diffused(x), ldm.scale_factor * z_e)
    s = ldm.scale_factor
    codes = first.quantizer.lookup(first.quantizer.nearest(z_e))
    moved = z_e + 0.01 * (codes - z_e)  # nearer its code still: the same cell
    with torch.no_grad():
        expected = first.autoencoder.decode_code(codes).clamp(-1, 1)
        torch.testing.assert_close(ldm.decode(s * moved), expected)
        assert not torch.allclose(first.autoencoder.decode_code(moved).clamp(-1, 1), expected)
    assert ldm.sample(2, steps=2, labels=[3, 4]).shape == (2, 1, 16, 16)
