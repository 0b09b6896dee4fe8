"""DiffAE: deterministic encoding, z_sem conditioning, inversion, interpolation, the CLI."""

import itertools

import pytest
import torch

from diffusion_apps.checkpoint import load_module
from diffusion_apps.cli import main
from diffusion_apps.data import ImageDataModule, load_embedded_digits
from diffusion_apps.diffusion import ddim_invert, ddim_sample
from diffusion_apps.methods import DiffAE
from tests.conftest import CONFIGS, run_cli_in
from tests.factories import randomize_, tiny_encoder, tiny_unet
from tests.methods.ddpm_arguments import assert_ddpm_arguments, keyword_only_ddpm

TINY = CONFIGS / "tiny" / "diffae.yaml"


def build(cond_dim=16, **kw):
    return DiffAE(tiny_unet(cond_dim=cond_dim), tiny_encoder(), **kw)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The run directory of the tiny config trained for 60 steps (one validation) by the CLI."""
    steps = ["--trainer.max_steps", "60", "--trainer.val_check_interval", "60"]
    fit = ["fit", "--config", str(TINY), *steps, "--trainer.enable_progress_bar", "false"]
    return run_cli_in(tmp_path_factory.mktemp("diffae"), fit) / "runs/tiny_diffae/version_0"


@pytest.fixture(scope="module")
def trained(trained_run):
    """That run's model, reloaded from its checkpoint."""
    return load_module(trained_run / "checkpoints/last.ckpt", DiffAE).eval()


def digits(n=8, size=16):
    """n real digits of different classes (the set is sorted by label), in [-1, 1]."""
    x = load_embedded_digits()[0][::500][:n, None].float() / 127.5 - 1  # (n, 1, 28, 28)
    return torch.nn.functional.interpolate(x, size=size, mode="area")


def test_bad_parts_are_named():
    with pytest.raises(ValueError, match="cond_dim=8 must equal the encoder's out_dim=16"):
        build(cond_dim=8)
    unet = tiny_unet(cond_dim=16)
    timed = tiny_encoder(time_conditioned=True)
    with pytest.raises(ValueError, match="time_conditioned=False"):
        DiffAE(unet, timed)


def test_ddpm_arguments_are_forwarded_by_keyword():
    kw = dict(sample_steps=9, timestep_spacing="quad", clip_x0=True, num_val_samples=3, lr=3e-4,
              weight_decay=0.02, warmup_steps=7, adam_betas=(0.8, 0.9), compile=True)  # fmt: skip
    with keyword_only_ddpm():
        model = build(**kw)
    fixed = dict(prediction="eps", sampler="ddim", eta=0.0, variance="beta", loss="mse")
    assert_ddpm_arguments(model, **kw, **fixed)


def test_python_built_module_saves_its_own_arguments():
    model = build(encode_steps=7, sample_steps=9)
    assert model.hparams["encode_steps"] == 7 and model.hparams["sample_steps"] == 9
    assert "unet" not in model.hparams and "encoder" not in model.hparams


def test_encoding_is_deterministic_and_z_sem_steers_the_decoder():
    model = randomize_(build(sample_steps=5), 0.1, seed=3).eval()
    x = digits(4)
    z = model.encode(x)
    assert z.shape == (4, 16) and torch.equal(z, model.encode(x))
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.decode(z, x_T), model.decode(z, x_T))  # DDIM η = 0
    t = torch.full((4,), 50)
    other_z = 3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    eps, other = model.eps(x_T, t, cond=z), model.eps(x_T, t, cond=other_z)
    assert (eps - other).abs().mean() > 1e-2 * eps.abs().mean()


def test_training_trains_the_encoder_through_the_diffusion_loss():
    model = build()
    # At init its zero output convs pass no gradient back.
    randomize_(model.unet, 0.1, seed=3).eval()
    loss = model.diffusion_loss(digits(4), **model.conditioning(digits(4)))
    loss.backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_inversion_then_decoding_reconstructs_better_with_more_steps(trained):
    x = digits(8)
    z = trained.encode(x)
    errors = []
    for steps in (5, 20, 100):
        x_T = trained.encode_stochastic(x, z, steps=steps)
        errors.append((trained.decode(z, x_T, steps=steps) - x).square().mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1 * errors[0]
    random = trained.reconstruct(x, inferred=False, generator=torch.Generator().manual_seed(0))
    assert errors[2] < (random - x).square().mean().item()  # x_T carries what z_sem does not


def ddim_reconstruction(model, x, encode_steps: int, decode_steps: int):
    """decode(Enc(x), x_T) written out with the diffusion layer's samplers: x_T the DDIM
    inversion of x over the ``encode_steps`` subsequence, decoded over the ``decode_steps`` one."""
    z = model.encode(x)

    def eps(x_t, t):
        return model.eps(x_t, t, cond=z)

    x_T = ddim_invert(eps, model.schedule, x, timesteps=model.timesteps(encode_steps))
    return ddim_sample(eps, model.schedule, x_T, timesteps=model.timesteps(decode_steps)).clamp(
        -1, 1
    )


def test_steps_set_inversion_and_decoding_alike_unless_encode_steps_say_otherwise(trained, probe):
    """``steps`` = 20 (the module's: 5) inverts over the 20-step subsequence it decodes from, in
    every mode that infers x_T; an explicit ``encode_steps`` inverts over its own."""
    x = digits(2)
    paired, mismatched = (
        ddim_reconstruction(trained, x, 20, 20),
        ddim_reconstruction(trained, x, 7, 20),
    )
    close = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(trained.reconstruct(x, steps=20), paired, **close)
    torch.testing.assert_close(
        trained.reconstruct(x, steps=20, encode_steps=7), mismatched, **close
    )
    assert (paired - mismatched).abs().max() > 1e-2  # the test tells the two apart
    frames = trained.interpolate(x[:1], x[1:], num=2, steps=20)
    torch.testing.assert_close(frames[0], paired, **close)
    semantic = trained.semantic_variations(x, trained.encode(x), steps=20, encode_steps=7)
    torch.testing.assert_close(semantic[[0, 1], [0, 1]], mismatched, **close)
    manipulated = trained.manipulate(x, probe, attribute=8, scales=(0.0,), steps=20)
    torch.testing.assert_close(manipulated[:, 0], paired, **close)


def test_interpolation_endpoints_are_the_reconstructions(trained):
    x = digits(4)
    frames = trained.interpolate(x[:2], x[2:], num=3)
    assert frames.shape == (2, 3, 1, 16, 16)
    torch.testing.assert_close(frames[:, 0], trained.reconstruct(x[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(frames[:, -1], trained.reconstruct(x[2:]), atol=1e-5, rtol=0)
    assert (frames[:, 1] - frames[:, 0]).abs().mean() > 1e-3


def test_fast_dev_run_of_the_tiny_config(in_tmp):
    main(["fit", "--config", str(TINY), "--trainer.fast_dev_run", "true"])


def test_validation_logs_the_dashboards(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run), size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    for prefix in ("reconstructions", "interpolations", "x_T variations", "z variations"):
        assert any(tag.startswith(prefix) for tag in tags), (prefix, tags)


def test_variations_vary_the_right_code(trained):
    x = digits(3)
    gen = torch.Generator().manual_seed(0)
    stochastic = trained.stochastic_variations(x, num=2, generator=gen)
    assert stochastic.shape == (3, 2, 1, 16, 16)
    again = trained.stochastic_variations(x, num=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(stochastic, again)  # reproducible from the generator
    assert (stochastic[:, 0] - stochastic[:, 1]).abs().mean() > 1e-3  # x_T matters
    # With the images' own codes the semantic variations' diagonal is the reconstruction.
    semantic = trained.semantic_variations(x, trained.encode(x))
    assert semantic.shape == (3, 3, 1, 16, 16)
    diagonal = semantic[torch.arange(3), torch.arange(3)]
    torch.testing.assert_close(diagonal, trained.reconstruct(x), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def probe(trained):
    """A digit-class probe on the tiny model's z_sem of 1000 training digits."""
    from diffusion_apps.data import ImageDataModule

    data = ImageDataModule(dataset="digits", image_size=16, channels=1, batch_size=250)
    data.setup()
    loader = torch.utils.data.DataLoader(data.train_set, batch_size=250)
    return trained.fit_probe(itertools.islice(loader, 4))


def test_manipulation_moves_z_sem_towards_the_attribute(trained, probe):
    x = digits(3)  # a 0, a 1 and a 2
    frames = trained.manipulate(x, probe, attribute=8, scales=(0.0, 0.3, 3.0))
    assert frames.shape == (3, 3, 1, 16, 16)
    torch.testing.assert_close(frames[:, 0], trained.reconstruct(x), atol=1e-5, rtol=0)
    assert (frames[:, 2] - frames[:, 0]).abs().mean() > (frames[:, 1] - frames[:, 0]).abs().mean()
    # Re-encoded, the strongly manipulated images read more like an 8 to the same probe.
    logit_8 = [probe(trained.encode(frames[:, i]))[:, 8] for i in (0, 2)]
    assert (logit_8[1] > logit_8[0]).all()


def test_a_bare_diffae_says_where_unconditional_samples_come_from(trained, trained_run):
    with pytest.raises(ValueError, match="latent DDIM stage"):
        trained.sample(2)
    with pytest.raises(SystemExit, match="configs/diffae_latent.yaml"):
        main(["sample", "--ckpt_path", str(trained_run / "checkpoints/last.ckpt")])


def test_eval_reports_reconstructions_and_the_probe(trained_run, tmp_path):
    import json

    ckpt = str(trained_run / "checkpoints/last.ckpt")
    main(["eval", "--ckpt_paths", ckpt, "--out_dir", str(tmp_path), "--device", "cpu"])
    floor, *rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [r["sampler"] for r in rows] == [
        "reconstruct, inferred x_T",
        "reconstruct, random x_T",
        "linear probe",
    ]  # no generation rows: DiffAE alone does not sample
    inferred, random, probe_row = (r["metrics"] for r in rows)
    assert rows[0]["nfe"] == 10 and rows[1]["nfe"] == 5  # tiny config: 5 + 5 DDIM steps
    assert inferred["n"] == random["n"] == 500
    assert inferred["mse"] < random["mse"] and inferred["ssim"] > random["ssim"]
    assert inferred["encode_s"] > 0 and inferred["invert_s"] > 0 and inferred["decode_s"] > 0
    assert "invert_s" not in random
    # Raw 16 px digits are nearly linearly separable; the probe reads labels, not noise.
    assert probe_row["probe_acc_pixels"] > 0.85
    assert 0.3 < probe_row["probe_acc"] <= 1.0


@pytest.mark.parametrize(
    ("mode", "extra", "size"),
    [
        ("reconstruct", [], (3 * 17 + 1, 4 * 17 + 1)),  # rows: original, inferred, random
        ("interpolate", [], (2 * 17 + 1, 9 * 17 + 1)),  # a, 7 frames, b
        ("manipulate", ["--attribute", "8", "--scales", "[0, 0.5]"], (4 * 17 + 1, 3 * 17 + 1)),
    ],
)
def test_autoencode_command_writes_each_mode(trained_run, tmp_path, mode, extra, size):
    from PIL import Image

    ckpt = str(trained_run / "checkpoints/last.ckpt")
    args = ["autoencode", "--ckpt_path", ckpt, "--mode", mode, "--num_images", "4"]
    main([*args, "--out_dir", str(tmp_path), "--device", "cpu", *extra])
    height, width = size
    assert Image.open(tmp_path / f"{mode}.png").size == (width, height)


@pytest.mark.parametrize(("extra", "encode_steps"), [([], 20), (["--encode_steps", "7"], 7)])
def test_autoencode_steps_set_inversion_too_unless_encode_steps_are_given(
    trained_run, trained, tmp_path, extra, encode_steps
):
    """``--steps 20``: the inferred-x_T row is the 20-step inversion decoded in 20 steps;
    with ``--encode_steps 7`` the 7-step one (each 16 px image one 8-bit tile of the grid)."""
    import numpy as np
    from PIL import Image

    ckpt = str(trained_run / "checkpoints/last.ckpt")
    main(["autoencode", "--ckpt_path", ckpt, "--num_images", "2", "--steps", "20", *extra,
          "--out_dir", str(tmp_path), "--device", "cpu"])  # fmt: skip
    data = ImageDataModule(image_size=16, batch_size=8)  # the tiny config's data
    data.setup()
    x = torch.stack([data.val_set[i][0] for i in range(2)])
    expected = (ddim_reconstruction(trained, x, encode_steps, 20)[:, 0] + 1) * 127.5
    grid = np.asarray(Image.open(tmp_path / "reconstruct.png").convert("L"), dtype=np.float32)
    row = torch.from_numpy(grid[18:34, 1:]).unfold(1, 16, 17).permute(1, 0, 2)  # (2, 16, 16)
    torch.testing.assert_close(row, expected, atol=1.0, rtol=0)


def test_autoencode_names_a_bad_attribute(trained_run, tmp_path):
    ckpt = str(trained_run / "checkpoints/last.ckpt")
    with pytest.raises(SystemExit, match=r"--attribute: no attribute '10'.* \[0, 10\)"):
        main(["autoencode", "--ckpt_path", ckpt, "--mode", "manipulate", "--attribute", "10"])
