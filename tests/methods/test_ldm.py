"""LDM: the first stage's loss terms against closed forms, both optimisers, the latent scale
(measured once, restored on resume), the frozen first stage, cross-attention conditioning,
classifier-free guidance against plain conditional sampling, and every config."""

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_apps.checkpoint import CheckpointError, load_module, read_checkpoint
from diffusion_apps.diffusion import ddim_sample
from diffusion_apps.methods import AutoencoderKL, LatentDiffusion
from diffusion_apps.nn import ClassEmbedder, DiagonalGaussian
from diffusion_apps.nn.layers import SpatialTransformer, zero_
from tests.conftest import CONFIGS, run_cli_in
from tests.factories import randomize_, tiny_unet
from tests.methods.ddpm_arguments import assert_ddpm_arguments, keyword_only_ddpm

AE_CKPT = "runs/tiny_ldm_autoencoder/version_0/checkpoints/last.ckpt"
LDM_CKPT = "runs/tiny_ldm/version_0/checkpoints/last.ckpt"
CAPTION_CKPT = "runs/tiny_ldm_caption/version_0/checkpoints/last.ckpt"
QUIET = ["--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The tiny first stage (4 batches, the discriminator on from batch 2) and the tiny class-
    and caption-conditional LDMs on it, via the CLI."""
    tiny = CONFIGS / "tiny"
    return run_cli_in(
        tmp_path_factory.mktemp("ldm"),
        *[["fit", "--config", str(tiny / f"{name}.yaml"), *QUIET]
          for name in ("ldm_autoencoder", "ldm", "ldm_caption")],
    )  # fmt: skip


def digits(n, seed=2):
    torch.manual_seed(seed)
    return torch.rand(n, 1, 16, 16) * 2 - 1


def latent_unet(context_dim=16, in_channels=2):
    return tiny_unet(in_channels=in_channels, image_size=8, attention_resolutions=(4,),
                     context_dim=context_dim)  # fmt: skip


# -- stage 1 ------------------------------------------------------------------------------------


def test_the_loss_terms_match_their_closed_forms(run_dir):
    ae = load_module(run_dir / AE_CKPT, AutoencoderKL)
    with torch.no_grad():
        ae.logvar.fill_(math.log(2.0))
    x = digits(3)
    posterior = DiagonalGaussian(torch.zeros(3, 4, 8, 8))  # N(0, I): KL = 0
    terms = ae.losses(x, x + 0.1, posterior)
    # Σ_pixels |x − x̂|/e^s + s per image, e^s = 2: 256 pixels × (0.1/2 + ln 2).
    torch.testing.assert_close(terms["nll"], torch.tensor(256 * (0.05 + math.log(2.0))))
    torch.testing.assert_close(terms["rec"], torch.tensor(0.1))
    assert terms["kl"] == 0


@pytest.mark.parametrize("ratio", [2.0, -0.5])
def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms(run_dir, ratio):
    ae = load_module(run_dir / AE_CKPT, AutoencoderKL)
    x_rec = ae.decode(ae.encode(digits(2)).mode())
    nll = x_rec.square().sum()
    weight = ae.adaptive_weight(nll, ratio * nll)  # ∇ of the second term: ratio × the first
    norm = torch.linalg.vector_norm
    g = torch.autograd.grad(nll, ae.autoencoder.decoder.last_layer, retain_graph=True)[0]
    expected = ae.disc_weight * norm(g) / (abs(ratio) * norm(g) + 1e-4)
    torch.testing.assert_close(weight, expected)


def test_the_first_stage_trained_both_players(run_dir):
    ckpt = read_checkpoint(run_dir / AE_CKPT)
    assert ckpt["global_step"] == 2 + 2 * 2  # 2 batches alone, then 2 with the discriminator
    events = EventAccumulator(str(run_dir / "runs/tiny_ldm_autoencoder/version_0"), {"images": 0})
    events.Reload()
    assert {"train/d", "train/g", "train/adaptive_weight", "val/psnr"} <= set(
        events.Tags()["scalars"]
    )
    assert any(t.startswith("reconstructions") for t in events.Tags()["images"])
    ae = load_module(run_dir / AE_CKPT, AutoencoderKL)
    x = digits(2)
    assert torch.equal(ae.reconstruct(x), ae.decode(ae.encode(x).mean).clamp(-1, 1))


# -- stage 2 ------------------------------------------------------------------------------------


def test_the_scale_factor_is_one_over_the_latent_std(run_dir):
    ldm = load_module(run_dir / LDM_CKPT, LatentDiffusion)
    assert bool(ldm.scale_ready) and ldm.scale_factor != 1
    x = digits(16)
    torch.manual_seed(5)
    ldm.measure_scale(x)
    torch.manual_seed(5)
    z = ldm.first_stage.encode(x).sample()
    torch.testing.assert_close(ldm.scale_factor, 1 / z.flatten().std())
    torch.manual_seed(5)
    torch.testing.assert_close(ldm.diffused(x).std(), torch.tensor(1.0))


def test_latents_are_scaled_by_s_and_decoded_at_z_over_s(run_dir):
    """z_0 = s·z with z ~ q(z | x), and decode(z_0) = D(z_0/s) = D(z): with s = 0.37, z·s or no
    scale would decode another latent."""
    ldm = load_module(run_dir / LDM_CKPT, LatentDiffusion)
    first = load_module(run_dir / AE_CKPT, AutoencoderKL)
    ldm.scale_factor.fill_(0.37)
    x = digits(3)
    torch.manual_seed(5)
    z0 = ldm.diffused(x)
    torch.manual_seed(5)
    z = first.encode(x).sample()
    torch.testing.assert_close(z0, 0.37 * z)
    with torch.no_grad():
        torch.testing.assert_close(ldm.decode(z0), first.decode(z).clamp(-1, 1))


def test_the_scale_factor_is_restored_on_resume_not_remeasured(run_dir, tmp_path):
    before = read_checkpoint(run_dir / LDM_CKPT)["state_dict"]["scale_factor"]
    run_cli_in(
        run_dir,
        ["fit", "--config", str(CONFIGS / "tiny/ldm.yaml"), "--ckpt_path", LDM_CKPT,
         "--trainer.max_steps", "6", "--seed_everything", "7",
         "--trainer.logger.init_args.version", "resumed", *QUIET],
    )  # fmt: skip
    resumed = run_dir / "runs/tiny_ldm/resumed/checkpoints/last.ckpt"
    after = read_checkpoint(resumed)
    assert after["global_step"] == 6 and torch.equal(after["state_dict"]["scale_factor"], before)


def test_the_first_stage_is_frozen_in_eval_mode_and_unchanged(run_dir):
    ldm = load_module(run_dir / LDM_CKPT, LatentDiffusion)
    first = load_module(run_dir / AE_CKPT, AutoencoderKL).state_dict()
    trained = ldm.first_stage.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in first.items())  # after 4 training steps
    ldm.train()
    assert ldm.unet.training and not ldm.first_stage.training
    batch = (digits(4), torch.tensor([0, 1, 2, 3]))
    x0 = ldm.diffused(batch[0])
    ldm.diffusion_loss(x0, **ldm.conditioning(x0, batch)).backward()
    assert all(p.grad is None and not p.requires_grad for p in ldm.first_stage.parameters())
    assert ldm.condition.embed.weight.grad.abs().sum() > 0  # τ_θ trains with the UNet


def test_the_condition_reaches_the_output_through_cross_attention():
    torch.manual_seed(0)
    unet, emb = randomize_(latent_unet(), 0.1, seed=1), ClassEmbedder(10, 16)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([10, 50])
    ctx_a, ctx_b = emb(torch.tensor([3, 3])), emb(torch.tensor([7, 7]))
    transformers = [m for m in unet.modules() if isinstance(m, SpatialTransformer)]
    assert len(transformers) == 4  # down and up at 4 px, the middle block's
    for m in transformers:  # as initialised: each spatial transformer is the identity
        zero_(m.proj_out)
    torch.testing.assert_close(unet(x, t, context=ctx_a), unet(x, t, context=ctx_b))
    randomize_(unet, 0.1, seed=1)
    assert not torch.allclose(unet(x, t, context=ctx_a), unet(x, t, context=ctx_b), atol=1e-4)
    for m in transformers:  # the context enters through the cross-attention only
        for block in m.blocks:
            zero_(block.cross_attn.out)
    torch.testing.assert_close(unet(x, t, context=ctx_a), unet(x, t, context=ctx_b))


def conditional_ddim(model, x_T, context):
    timesteps = model.timesteps(model.sample_steps)
    return model.decode(
        ddim_sample(
            model.eps, model.schedule, x_T, timesteps=timesteps, clip_x0=False, context=context
        )
    )


def test_guidance_scales_one_and_zero_are_plain_conditional_and_null_sampling(run_dir):
    model = load_module(run_dir / LDM_CKPT, LatentDiffusion)
    randomize_(model.unet, 0.1, seed=1), randomize_(model.condition, 0.1, seed=1)
    model.decode = lambda z0: z0  # compare the latents (the 6-step first stage blurs them)
    labels = [1, 4, 4, 9]
    x_T = torch.randn((4, *model.sample_shape), generator=torch.Generator().manual_seed(3))
    context = model.condition(torch.tensor(labels))
    null = model.condition(model.null_ids(4))
    for w, ctx in ((1.0, context), (0.0, null)):
        got = model.sample(4, labels=labels, scale=w,
                           generator=torch.Generator().manual_seed(3))  # fmt: skip
        torch.testing.assert_close(got, conditional_ddim(model, x_T, ctx))


def test_guidance_extrapolates_from_the_null_prediction(run_dir):
    """w = 3: every DDIM step uses ε(∅) + 3 (ε(y) − ε(∅)), computed here by two separate calls."""
    model = load_module(run_dir / LDM_CKPT, LatentDiffusion)
    randomize_(model.unet, 0.1, seed=1), randomize_(model.condition, 0.1, seed=1)
    model.decode = lambda z0: z0  # compare the latents (the 6-step first stage blurs them)
    labels = [2, 7]
    x_T = torch.randn((2, *model.sample_shape), generator=torch.Generator().manual_seed(4))
    context, null = model.condition(torch.tensor(labels)), model.condition(model.null_ids(2))

    def guided(x_t, t, **_):
        eps_null = model.eps(x_t, t, context=null)
        return eps_null + 3.0 * (model.eps(x_t, t, context=context) - eps_null)

    timesteps = model.timesteps(model.sample_steps)
    expected = model.decode(
        ddim_sample(guided, model.schedule, x_T, timesteps=timesteps, clip_x0=False)
    )
    got = model.sample(2, labels=labels, scale=3.0,
                       generator=torch.Generator().manual_seed(4))  # fmt: skip
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, conditional_ddim(model, x_T, context), atol=1e-3)


def test_training_drops_the_condition_for_the_configured_fraction(run_dir):
    model = load_module(run_dir / LDM_CKPT, LatentDiffusion)
    model.cond_drop = 0.3
    labels = torch.arange(400) % 10
    batch = (digits(400), labels)
    null = model.condition(model.null_ids(1))[0]
    for training, low, high in ((True, 0.24, 0.36), (False, 0.0, 0.0)):
        model.train(training)
        torch.manual_seed(0)
        context = model.conditioning(None, batch)["context"]
        dropped = (context == null).all(dim=(1, 2)).float().mean().item()
        assert low <= dropped <= high, (training, dropped)


def test_captions_condition_the_caption_model(run_dir):
    model = load_module(run_dir / CAPTION_CKPT, LatentDiffusion)
    randomize_(model.unet, 0.1, seed=1)
    a = model.sample(2, prompts=["thick seven"], generator=torch.Generator().manual_seed(0))
    b = model.sample(2, prompts=["thin one"], generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 1, 16, 16) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="unknown word"):
        model.sample(1, prompts=["fat seven"])
    with pytest.raises(ValueError, match="caption-conditioned"):
        load_module(run_dir / LDM_CKPT, LatentDiffusion).sample(1, prompts=["seven"])


def test_bad_first_stages_and_unets_are_named(run_dir):
    emb = ClassEmbedder(10, 16)
    with pytest.raises(CheckpointError, match="not found: missing.ckpt"):
        LatentDiffusion(latent_unet(), "missing.ckpt", emb)
    with pytest.raises(CheckpointError, match="AutoencoderKL is expected"):
        LatentDiffusion(latent_unet(), str(run_dir / LDM_CKPT), emb)
    ae = str(run_dir / AE_CKPT)
    with pytest.raises(ValueError, match=r"latents of shape \(2, 8, 8\)"):
        LatentDiffusion(latent_unet(in_channels=4), ae, emb)
    with pytest.raises(ValueError, match="context_dim=32 must equal"):
        LatentDiffusion(latent_unet(context_dim=32), ae, emb)


def test_ddpm_arguments_are_forwarded_by_keyword(run_dir):
    kw = dict(sampler="dpmpp_2m", sample_steps=9, eta=0.5, num_val_samples=3, lr=3e-4,
              weight_decay=0.02, warmup_steps=7, adam_betas=(0.8, 0.9), compile=True)  # fmt: skip
    with keyword_only_ddpm():
        model = LatentDiffusion(latent_unet(), str(run_dir / AE_CKPT), ClassEmbedder(10, 16), **kw)
    fixed = dict(prediction="eps", timestep_spacing="uniform", variance="beta", clip_x0=False)
    assert_ddpm_arguments(model, **kw, **fixed, loss="mse")


def test_the_full_configs_run(in_tmp):
    """configs/ldm_autoencoder.yaml, then configs/ldm.yaml and ldm_caption.yaml on it, one step
    each (the real sizes)."""
    one_step = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
    ae = "runs/ldm_autoencoder/version_0/checkpoints/last.ckpt"
    stage2 = ["--model.init_args.first_stage", ae, *one_step]
    run_cli_in(
        in_tmp,
        ["fit", "--config", str(CONFIGS / "ldm_autoencoder.yaml"), *one_step],
        ["fit", "--config", str(CONFIGS / "ldm.yaml"), *stage2],
        ["fit", "--config", str(CONFIGS / "ldm_caption.yaml"), *stage2],
    )
    for name in ("ldm", "ldm_caption"):
        model = load_module(in_tmp / f"runs/{name}/version_0/checkpoints/last.ckpt")
        assert model.sample(2, steps=2).shape == (2, 1, 32, 32)


def test_eval_scores_both_stages(run_dir, tmp_path):
    """The first stage gets a reconstruction row with fd_digits; the LDM, asked for each class in
    turn, a generation row with its accuracy, two network evaluations per step at w = 2."""
    from diffusion_apps.cli import main

    out = tmp_path / "reports"
    ckpts = f"{run_dir / AE_CKPT},{run_dir / LDM_CKPT}"
    main(["eval", "--ckpt_paths", ckpts, "--num_samples", "20", "--samplers", "ddim:3",
          "--batch_size", "10", "--device", "cpu", "--out_dir", str(out)])  # fmt: skip
    _, recon, generated = json.loads((out / "eval.json").read_text())["rows"]
    assert (recon["method"], recon["sampler"], recon["num_samples"]) == (
        "AutoencoderKL", "reconstruct", 500,
    )  # fmt: skip
    assert {"mse", "psnr", "ssim", "fd_digits", "accuracy"} <= set(recon["metrics"])
    assert (generated["method"], generated["nfe"]) == ("LatentDiffusion", 6)
    assert 0 <= generated["metrics"]["accuracy"] <= 1


@pytest.mark.slow
def test_lpips_from_local_weights_joins_the_loss_and_stays_out_of_the_checkpoint(tmp_path):
    # A random AlexNet (240 MB) stands in for the ImageNet one: plumbing, not numbers.
    from torchvision.models import alexnet

    from diffusion_apps.nn import Autoencoder

    path = tmp_path / "alexnet.pth"
    torch.save(alexnet().state_dict(), path)
    net = Autoencoder(1, 2, 16, 8, (1, 2), 1, (), 8, 0.0, 2)
    ae = AutoencoderKL(net, lpips_weights_path=str(path), perceptual_weight=2.0)
    x, posterior = digits(2), DiagonalGaussian(torch.zeros(2, 4, 8, 8))
    same, other = ae.losses(x, x, posterior), ae.losses(x, -x, posterior)
    assert same["perceptual"] == 0 and other["perceptual"] > 0
    l1 = 2 * x.abs()  # |x − (−x)|, e^s = 1, s = 0; w_p·LPIPS on each of 2 × 256 pixels
    expected = (l1.sum() + 2.0 * 256 * 2 * other["perceptual"]) / 2
    torch.testing.assert_close(other["nll"], expected)
    state = ae.state_dict()
    assert not any(k.startswith("perceptual.") for k in state)
    AutoencoderKL(net, lpips_weights_path=str(path)).load_state_dict(state, strict=True)


def test_spacing_reaches_the_latent_sampler(run_dir):
    model = load_module(run_dir / LDM_CKPT, LatentDiffusion)
    randomize_(model.unet, 0.1, seed=1)

    def draw(**kw):
        gen = torch.Generator().manual_seed(1)
        return model.sample(2, sampler="ddim", steps=4, labels=[3, 5], generator=gen, **kw)

    logsnr, uniform = draw(spacing="logsnr"), draw()
    model.timestep_spacing = "logsnr"
    assert torch.equal(draw(), logsnr) and not torch.allclose(logsnr, uniform)


@pytest.mark.parametrize("ckpt", [LDM_CKPT, CAPTION_CKPT])
def test_predict_items_cycle_through_the_classes(run_dir, ckpt):
    """``predict`` draws item i alone (DDP-proof seeding); a conditional LDM asks it for class
    (or digit name) i mod 10, as ``sample`` cycles them, not class 0 for every item."""
    model = load_module(run_dir / ckpt, LatentDiffusion)
    asked = []
    hook = model.condition.register_forward_hook(lambda _, args, out: asked.append(args[0]))
    try:
        images = [model.predict_item(i) for i in (3, 12, 7)]
    finally:
        hook.remove()
    conditional = [ids[0] for ids in asked if len(ids) == 1]  # the null context is 1 too: skip it
    expected = [model.requested_ids(1, [c], None)[0] for c in (3, 2, 7)]
    assert all(any(torch.equal(a, e) for a in conditional) for e in expected)
    assert not any(torch.equal(a, model.requested_ids(1, [0], None)[0]) for a in conditional)
    assert all(x.shape == (1, 1, 16, 16) for x in images)


def test_a_first_stage_that_knows_its_scale_gives_it(run_dir, tmp_path):
    """An imported VAE's scaling_factor (SD: 0.18215) is s from the start, not re-measured."""
    ckpt = read_checkpoint(run_dir / AE_CKPT)
    ckpt["hyper_parameters"]["scaling_factor"] = 0.18215
    torch.save(ckpt, tmp_path / "vae.ckpt")
    ldm = LatentDiffusion(latent_unet(context_dim=None), str(tmp_path / "vae.ckpt"))
    assert bool(ldm.scale_ready) and ldm.scale_factor.item() == pytest.approx(0.18215)
    x = digits(4)
    torch.manual_seed(0)
    z = ldm.first_stage.encode(x).sample()
    torch.manual_seed(0)
    torch.testing.assert_close(ldm.diffused(x), 0.18215 * z)
