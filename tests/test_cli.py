"""The CLI in-process: configs parse, bad input is named, fit -> checkpoint -> sample works."""

import subprocess
import sys

import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from PIL import Image

from diffusion_apps.checkpoint import read_checkpoint
from diffusion_apps.cli import DiffusionCLI, main
from tests.conftest import CONFIGS

ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
TINY = CONFIGS / "tiny" / "ddpm.yaml"


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code in (0, None)
    assert "class_path: diffusion_apps.methods" in capsys.readouterr().out


class EverySubcommandCLI(DiffusionCLI):
    """The plain path: Lightning's parser with all four subcommands."""

    def subcommands(self):
        return LightningCLI.subcommands()


def test_a_run_builds_the_parser_of_its_subcommand_alone_and_parses_the_same(capsys):
    args = ["fit", "--config", str(TINY), "--model.init_args.lr", "3e-4", "--print_config"]
    printed = []
    for cli in (DiffusionCLI, EverySubcommandCLI):
        with pytest.raises(SystemExit) as exit_:
            cli(args=args)
        assert exit_.value.code in (0, None)
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and "lr: 0.0003" in printed[0]
    cli = DiffusionCLI.__new__(DiffusionCLI)  # which parsers it builds, for a command
    for command, built in ((args, {"fit"}), (["--print_config"], set(LightningCLI.subcommands()))):
        cli._command = command
        assert set(cli.subcommands()) == built


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (["--model.init_args.lrr", "1e-3"], "lrr"),
        (["--model.init_args.prediction", "noise"], "prediction"),
        (["--model.init_args.unet.init_args.base_channels", "many"], "base_channels"),
        (["--data.init_args.dataset", "imagenet"], "dataset"),
    ],
)
def test_bad_key_or_value_is_named(override, named):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(TINY), *override])
    message = str(exit_.value.code)  # printed by the interpreter as it exits with status 1
    assert message.startswith("error: ") and named in message and "\n" not in message


def test_fast_dev_run(in_tmp):
    main(["fit", "--config", str(TINY), "--trainer.fast_dev_run", "true"])


def test_fit_then_sample_from_checkpoint_alone(in_tmp):
    main(["fit", "--config", str(TINY)])
    ckpt = in_tmp / "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"
    saved = read_checkpoint(ckpt)  # weights_only=True
    assert saved["hyper_parameters"]["_class_path"] == "diffusion_apps.methods.DDPM"
    # The EMA callback puts the averaged weights in state_dict and the raw ones aside.
    raw, ema = saved["current_model_state"], saved["state_dict"]
    assert any(not torch.equal(raw[k], ema[k]) for k in ema)

    out = in_tmp / "samples"
    main(
        [
            "sample",
            "--ckpt_path",
            str(ckpt),
            "--num_samples",
            "5",
            "--batch_size",
            "2",
            "--sampler",
            "ddim",
            "--steps",
            "3",
            "--out_dir",
            str(out),
        ]
    )
    pngs = sorted(out.glob("0*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    assert Image.open(pngs[0]).size == (16, 16)
    assert (out / "grid.png").is_file()


def test_sample_is_reproducible_and_seed_dependent(in_tmp):
    main(["fit", "--config", str(TINY), "--trainer.max_steps", "1"])
    ckpt = str(in_tmp / "runs/tiny_ddpm/version_0/checkpoints/last.ckpt")

    def draw(seed, name):
        main(
            [
                "sample",
                "--ckpt_path",
                ckpt,
                "--num_samples",
                "2",
                "--steps",
                "2",
                "--sampler",
                "ddpm",
                "--seed",
                str(seed),
                "--out_dir",
                name,
            ]
        )
        return [Image.open(in_tmp / name / f"{i:06d}.png").tobytes() for i in range(2)]

    assert draw(1, "a") == draw(1, "b")
    assert draw(1, "a") != draw(2, "c")


def test_sample_rejects_missing_checkpoint(in_tmp):
    with pytest.raises(SystemExit, match="error: checkpoint not found: .*nope.ckpt"):
        main(["sample", "--ckpt_path", "nope.ckpt"])


def test_startup_imports_nothing_beyond_lightning_and_the_cli_parser():
    code = (
        "import sys, lightning; before = {m.split('.')[0] for m in sys.modules};"
        "import diffusion_apps.cli, diffusion_apps.methods, diffusion_apps.data;"
        "print(sorted({m.split('.')[0] for m in sys.modules} - before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    new = set(eval(out.stdout))
    assert new <= {"diffusion_apps", "jsonargparse", "docstring_parser", "typeshed_client"}, new


def test_validate_test_predict_from_a_checkpoint(in_tmp):
    main(["fit", "--config", str(TINY), "--trainer.max_steps", "1"])
    ckpt = str(in_tmp / "runs/tiny_ddpm/version_0/checkpoints/last.ckpt")
    common = [
        "--config",
        str(TINY),
        "--ckpt_path",
        ckpt,
        "--trainer.limit_test_batches",
        "1",
        "--trainer.limit_predict_batches",
        "1",
        "--trainer.logger",
        "false",
    ]
    for stage, key in (("validate", "val/loss"), ("test", "test/loss")):
        metrics = DiffusionCLI(args=[stage, *common]).trainer.callback_metrics
        assert 0 < metrics[key] < 10, (stage, metrics)
    cli = DiffusionCLI(args=["predict", *common])
    (samples,) = cli.trainer.predict_loop.predictions
    assert samples.shape == (8, 1, 16, 16) and samples.abs().max() <= 1


def test_data_that_the_unet_cannot_take_is_named(in_tmp):
    """The tiny UNet takes 16 px images; 32 px data must stop before training, naming both keys."""
    with pytest.raises(SystemExit, match="32px(.|\n)*unet.init_args(.|\n)*data.init_args"):
        main(["fit", "--config", str(TINY), "--data.init_args.image_size", "32"])


def test_list_options_take_several_values_and_keep_awkward_names():
    """``--images a b`` reaches jsonargparse as one list; a name with a space, a comma or a
    colon survives, a bracketed list and other options pass unchanged, numbers stay numbers."""
    from diffusion_apps.cli import list_values_joined

    options = {"--images": str, "--scales": float}
    args = ["--images", "my photo.png", "a,b:c.jpg", "--mode", "x", "--scales=-1", "0", "2"]
    assert list_values_joined(args, options) == [
        '--images=["my photo.png", "a,b:c.jpg"]', "--mode", "x", "--scales=[-1, 0, 2]",
    ]  # fmt: skip
    assert list_values_joined(["--scales", "[0, 0.5]", "--images", "d"], options) == [
        "--scales=[0, 0.5]", '--images=["d"]',
    ]  # fmt: skip
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--images", type=list[str])
    parsed = parser.parse_args(list_values_joined(args[:3], options))
    assert parsed.images == ["my photo.png", "a,b:c.jpg"]
