"""``export --format diffusers``: tiny random DDPMs of ours, with our default ADM-style options and
with the original DDPM's, become DDPMPipeline folders that diffusers loads and computes with as we
do, and that ``import --source diffusers`` reads back to the same tensors and options; what
UNet2DModel cannot express is refused by name, before anything is written."""

import inspect
import json

import pytest
import torch

from diffusion_apps.checkpoint import SafeCheckpointIO, build_module, load_module
from diffusion_apps.cli import main
from diffusion_apps.diffusion import NoiseSchedule
from diffusion_apps.interop.diffusers_export import (
    UnsupportedConfig,
    diffusers_config,
    diffusers_state_dict,
    scheduler_config,
)
from diffusion_apps.methods import DDPM
from diffusion_apps.nn import UNet

diffusers = pytest.importorskip("diffusers")

SCHEDULE = "diffusion_apps.diffusion.NoiseSchedule"
BASE = dict(
    in_channels=3, image_size=16, base_channels=32, channel_mult=[1, 2], num_res_blocks=1,
    attention_resolutions=[8], num_head_channels=8, num_groups=8,
)  # fmt: skip
# name: (UNet options, DDPM options): ours, the original DDPM's, a learned variance, the rest.
DDPMS = {
    "adm_defaults": (
        BASE,  # scale_shift_norm, symmetric padding, [cos, sin], middle attention with its norm
        dict(
            schedule={"class_path": SCHEDULE, "init_args": {"num_timesteps": 200}},
            prediction="eps",
            variance="beta",
            clip_x0=True,
        ),
    ),  # fmt: skip
    "original_ddpm": (
        BASE
        | dict(
            scale_shift_norm=False,
            downsample_padding="asymmetric",
            sin_first=True,
            freq_shift=1,
            norm_eps=1e-6,
            num_head_channels=None,
            num_heads=1,
        ),
        dict(
            schedule={
                "class_path": SCHEDULE,
                "init_args": {"kind": "cosine", "num_timesteps": 100},
            },
            prediction="v",
            variance="beta_tilde",
            clip_x0=False,
        ),
    ),  # fmt: skip
    "learned_variance": (
        BASE | dict(out_channels=6, num_res_blocks=2, middle_attention_norm=False),
        dict(
            schedule={
                "class_path": SCHEDULE,
                "init_args": {
                    "kind": "sqrt_linear",
                    "num_timesteps": 100,
                    "beta_start": 0.00085,
                    "beta_end": 0.012,
                },
            },
            prediction="x0",
            variance="learned",
        ),
    ),  # fmt: skip
    "classes_no_middle_attention": (
        BASE
        | dict(
            channel_mult=[1, 1.5],
            attention_resolutions=[16],
            middle_attention=False,
            num_classes=5,
            null_label=False,
            dropout=0.1,
            scale_shift_norm=False,
        ),
        dict(variance="beta_tilde"),  # the default schedule, T = 1000
    ),  # fmt: skip
}
THEIR_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
THEIR_VARIANCE = {"beta": "fixed_large", "beta_tilde": "fixed_small", "learned": "learned_range"}


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights: norm scales around 1, attention weights larger (its softmax far from
    uniform: zeroing the attention changes the output by 30-65%, yet float32 rounding stays at
    ~1e-6 relative; at 4x, sharper softmaxes amplify it past 1e-5)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            norm_scale = p.dim() == 1 and "norm" in name and name.endswith("weight")
            scale = 0.1 if ".attn." in name and not name.endswith("bias") else 0.05
            p.copy_(scale * torch.randn(p.shape, generator=gen) + float(norm_scale))
    return module.eval()


def write_ddpm(path, unet: dict, seed: int = 0, **ddpm) -> DDPM:
    """Our checkpoint of a random DDPM with these UNet and DDPM options."""
    config = {
        "_class_path": "diffusion_apps.methods.DDPM",
        "unet": {"class_path": "diffusion_apps.nn.UNet", "init_args": unet},
        **ddpm,
    }
    module = build_module(config)
    randomized(module.unet, seed)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    SafeCheckpointIO().save_checkpoint(checkpoint | {"global_step": 0}, path)
    return module


def export(ckpt, out) -> None:
    main(["export", "--ckpt_path", str(ckpt), "--format", "diffusers", "--out", str(out)])


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def effective(options: dict) -> dict:
    """A UNet's options with its defaults filled in, as comparable values."""
    full = {k: p.default for k, p in inspect.signature(UNet).parameters.items()} | options
    full["out_channels"] = full["out_channels"] or full["in_channels"]
    return {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in full.items()}


@pytest.fixture(scope="module", params=list(DDPMS))
def exported(request, tmp_path_factory):
    """(name, our DDPM, the pipeline folder, diffusers' pipeline, our DDPM imported back)."""
    root = tmp_path_factory.mktemp(request.param)
    unet, ddpm = DDPMS[request.param]
    ours = write_ddpm(root / "ours.ckpt", unet, **ddpm)
    export(root / "ours.ckpt", root / "pipeline")
    pipeline = diffusers.DDPMPipeline.from_pretrained(root / "pipeline")
    main(["import", "--source", "diffusers", "--weights", str(root / "pipeline"),
          "--out", str(root / "back.ckpt")])  # fmt: skip
    return request.param, ours, root / "pipeline", pipeline, load_module(root / "back.ckpt", DDPM)


def test_the_folder_is_a_ddpm_pipeline(exported):
    _, _, folder, pipeline, _ = exported
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert files == {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json",
                     "unet/diffusion_pytorch_model.safetensors"}  # fmt: skip
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert isinstance(pipeline.unet, diffusers.UNet2DModel)
    assert isinstance(pipeline.scheduler, diffusers.DDPMScheduler)
    assert not list(folder.parent.glob(".*partial"))  # no temporary folder left


def test_diffusers_unet_computes_ours(exported):
    name, ours, _, pipeline, _ = exported
    T = ours.schedule.num_timesteps
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=gen)
    y = torch.tensor([0, 4, 2, 1]) if ours.unet.num_classes else None
    with torch.no_grad():
        t = torch.tensor([0, 7, T // 2, T - 1])
        theirs = pipeline.unet(x, t, class_labels=y).sample
        assert relative(ours.unet(x, t, y=y), theirs) < 1e-5, name
        assert theirs.abs().max() > 0.1  # the weights are not blank
        for step in (3, T - 1):  # one timestep for the batch, as DDPMPipeline calls it
            theirs = pipeline.unet(x, step, class_labels=y).sample
            assert relative(ours.unet(x, torch.tensor(step), y=y), theirs) < 1e-5, (name, step)


def test_diffusers_scheduler_is_ours(exported):
    name, ours, _, pipeline, _ = exported
    scheduler = pipeline.scheduler
    torch.testing.assert_close(
        scheduler.alphas_cumprod, ours.schedule.alphas_cumprod, atol=1e-6, rtol=0
    )
    assert scheduler.config.prediction_type == THEIR_PREDICTION[ours.prediction]
    assert scheduler.config.variance_type == THEIR_VARIANCE[ours.variance]
    assert scheduler.config.clip_sample == ours.clip_x0
    assert scheduler.config.clip_sample_range == 1.0
    if not ours.unet.num_classes:  # DDPMPipeline passes no class labels
        image = pipeline(batch_size=1, num_inference_steps=3, output_type="np",
                         generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        assert image.shape == (1, 16, 16, 3) and bool(torch.isfinite(torch.tensor(image)).all())


def test_import_of_the_export_is_the_same_ddpm(exported):
    name, ours, _, _, back = exported
    unet_options, ddpm = DDPMS[name]
    mine, theirs = ours.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine), name  # bit for bit
    imported = back.hparams["unet"]["init_args"]
    assert effective(imported) == effective(unet_options)
    given = (ddpm.get("schedule") or {}).get("init_args", {})
    expected = {k: p.default for k, p in inspect.signature(NoiseSchedule).parameters.items()}
    expected |= given
    for key, value in back.hparams["schedule"]["init_args"].items():
        assert value == expected[key], key  # exactly: no drift from β·1000/T·T/1000
    assert (back.prediction, back.variance, back.clip_x0) == (
        ours.prediction, ours.variance, ours.clip_x0,
    )  # fmt: skip


# -- what UNet2DModel cannot express --------------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(cond_dim=6), "cond_dim=6"),
        (dict(cond_dim=6, cond_shift=True), "cond_dim=6"),
        (dict(context_dim=5), "context_dim=5"),
        (dict(resblock_updown=True), "resblock_updown=True"),
        (dict(time_scale=5.0), "time_scale=5.0"),
        (dict(patch_size=2), "patch_size=2"),
        (dict(num_classes=4), "null_label=True"),
        (dict(num_head_channels=None, num_heads=2, num_heads_upsample=4), "num_heads_upsample=4"),
        (dict(num_head_channels=None, num_heads=2, attention_resolutions=[16, 8]), "num_heads=2"),
        (dict(channel_mult=[0.5, 1], base_channels=64), r"channel_mult=\(0.5, 1\)"),
        (dict(scale_shift_norm=False, middle_attention_norm=False), "middle_attention_norm"),
        (dict(pool="attention"), r"unknown option\(s\) \['pool'\]"),
    ],
)
def test_what_unet2dmodel_cannot_express_is_named(change, match):
    with pytest.raises(UnsupportedConfig, match=f"UNet option.* {match}"):
        diffusers_config(BASE | change)


@pytest.mark.parametrize(
    "schedule, match",
    [
        ({"kind": "constant"}, "kind='constant'"),
        ({"kind": "cosine", "cosine_s": 0.01}, "cosine_s=0.01"),
    ],
)
def test_schedules_diffusers_lacks_are_named(schedule, match):
    ddpm = dict(schedule={"class_path": SCHEDULE, "init_args": schedule},
                prediction="eps", variance="beta", clip_x0=True)  # fmt: skip
    with pytest.raises(UnsupportedConfig, match=match):
        scheduler_config(ddpm)


@pytest.mark.parametrize(
    "heads, head_dim",
    [
        (dict(num_head_channels=None), 32),  # our default head width
        (dict(num_head_channels=None, num_heads=2), 32),  # 2 heads in 64-wide blocks only
        (dict(num_head_channels=None, num_heads=2, num_heads_upsample=2), 32),
    ],
)
def test_head_options_of_another_spelling_export(heads, head_dim):
    """Head options the import spells as num_head_channels give the same network in diffusers."""
    config = diffusers_config(BASE | heads)
    assert config["attention_head_dim"] == head_dim
    ours = randomized(UNet(**BASE | heads), 2)
    theirs = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    theirs.load_state_dict(diffusers_state_dict(ours.state_dict(), ours), strict=True)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 900])
    with torch.no_grad():
        assert relative(ours(x, t), theirs.eval()(x, t).sample) < 1e-5


def test_the_comparison_sees_each_option():
    """Each option the export writes changes diffusers' output far beyond the tolerance."""
    ours = randomized(UNet(**BASE), 3)
    config = {k: v for k, v in diffusers_config(BASE).items() if not k.startswith("_")}
    state = diffusers_state_dict(ours.state_dict(), ours)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 150])
    with torch.no_grad():
        expected = ours(x, t)
        for change in [dict(flip_sin_to_cos=False), dict(freq_shift=1), dict(norm_eps=1e-2),
                       dict(downsample_padding=0), dict(attention_head_dim=16)]:  # fmt: skip
            theirs = diffusers.UNet2DModel(**config | change).eval()
            theirs.load_state_dict(state)
            assert relative(theirs(x, t).sample, expected) > 1e-3, change


def test_an_unsupported_ddpm_is_one_error_line_and_writes_nothing(tmp_path):
    write_ddpm(tmp_path / "adagn.ckpt", BASE | dict(cond_dim=6))
    with pytest.raises(SystemExit, match=r"^error: UNet option cond_dim=6 cannot be exported"):
        export(tmp_path / "adagn.ckpt", tmp_path / "out")
    write_ddpm(tmp_path / "fixed.ckpt", BASE | dict(out_channels=6), variance="beta")
    with pytest.raises(SystemExit, match=r"^error: UNet option out_channels=6 .*'beta'"):
        export(tmp_path / "fixed.ckpt", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adagn.ckpt", "fixed.ckpt"]


def test_other_methods_are_refused_by_name(tmp_path):
    unet = BASE | dict(in_channels=1, cond_dim=16)
    encoder = dict(in_channels=1, image_size=16, base_channels=8, channel_mult=[1, 2],
                   num_res_blocks=1, num_head_channels=8, num_groups=2, attention_resolutions=[],
                   out_dim=16, time_conditioned=False)  # fmt: skip
    config = {
        "_class_path": "diffusion_apps.methods.DiffAE",
        "unet": {"class_path": "diffusion_apps.nn.UNet", "init_args": unet},
        "encoder": {"class_path": "diffusion_apps.nn.EncoderUNet", "init_args": encoder},
    }
    module = build_module(config)
    SafeCheckpointIO().save_checkpoint(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)},
        tmp_path / "diffae.ckpt",
    )
    with pytest.raises(SystemExit, match="^error: .*holds a DiffAE checkpoint: only a plain DDPM"):
        export(tmp_path / "diffae.ckpt", tmp_path / "out")
    with pytest.raises(SystemExit, match="^error: checkpoint not found"):
        export(tmp_path / "none.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the output folder ----------------------------------------------------------------------------


def test_out_is_new_empty_or_a_previous_export(tmp_path, monkeypatch):
    unet, ddpm = DDPMS["adm_defaults"]
    write_ddpm(tmp_path / "a.ckpt", unet, seed=0, **ddpm)
    write_ddpm(tmp_path / "b.ckpt", unet, seed=1, **ddpm)
    out = tmp_path / "out"
    out.mkdir()
    export(tmp_path / "a.ckpt", out)  # an empty folder
    weights = out / "unet/diffusion_pytorch_model.safetensors"
    first = weights.read_bytes()
    export(tmp_path / "b.ckpt", out)  # a previous export: replaced
    assert weights.read_bytes() != first
    assert json.loads((out / "model_index.json").read_text())["_exported_from"].endswith("b.ckpt")

    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    second = weights.read_bytes()
    with pytest.raises(OSError, match="disk full"):  # a failed export leaves the old one
        export(tmp_path / "a.ckpt", out)
    assert weights.read_bytes() == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "b.ckpt", "out"]

    (out / "README.md").write_text("mine")  # no longer only what an export writes
    with pytest.raises(SystemExit, match=f"error: --out {out} exists and is not empty"):
        export(tmp_path / "a.ckpt", out)
    assert weights.read_bytes() == second
    with pytest.raises(SystemExit, match="error: --out .* is not a folder"):
        export(tmp_path / "a.ckpt", tmp_path / "a.ckpt")
