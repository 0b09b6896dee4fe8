"""Bad input through the commands gets one ``error: …`` line naming the real problem: no
traceback, no crash of the error handler, nothing silently wrong in the sampling options, and
the messages of the CLI itself (help, unknown commands, configs, option values)."""

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_apps.cli import main
from diffusion_apps.diffusion import NoiseSchedule
from diffusion_apps.methods import DDPM, ClassifierGuidedDDPM
from diffusion_apps.methods.protocol import Generation, SampleRequest
from tests.conftest import CONFIGS, REPO, fit_tiny
from tests.factories import tiny_unet
from tests.test_bad_input import fails

TINY = str(CONFIGS / "tiny/ddpm.yaml")
DDPM_CKPT = "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"
CLASSIFIER_CKPT = "runs/tiny_guided_classifier/version_0/checkpoints/last.ckpt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny DDPM (T = 100, 16px) and the tiny noisy classifier trained for it."""
    return fit_tiny(tmp_path_factory.mktemp("runs"), "ddpm", "guided_classifier")


@pytest.fixture
def in_runs(runs, monkeypatch):
    monkeypatch.chdir(runs)
    return runs


def sample(*args: str) -> list[str]:
    return ["sample", "--ckpt_path", DDPM_CKPT, "--num_samples", "2", "--precision", "32", *args]


# Item 2: errors that crashed the error handler or surfaced as tracebacks.


@pytest.mark.parametrize(
    "command",
    [
        ["sample", "--ckpt_path", "empty.ckpt"],
        ["autoencode", "--ckpt_path", "empty.ckpt"],
        ["fit", "--config", TINY, "--ckpt_path", "empty.ckpt"],
    ],
    ids=["sample", "autoencode", "fit"],
)
def test_an_empty_checkpoint_is_one_line(in_tmp, command):
    (in_tmp / "empty.ckpt").write_bytes(b"")
    fails(command, r"cannot read checkpoint empty.ckpt: .*\(EOFError\)")


def test_eval_skips_an_empty_checkpoint_and_scores_the_others(in_runs, capsys):
    Path("empty.ckpt").write_bytes(b"")
    main(["eval", "--ckpt_paths", f"[empty.ckpt,{DDPM_CKPT}]", "--num_samples", "4",
          "--batch_size", "4", "--samplers", "ddim:2", "--out_dir", "report"])  # fmt: skip
    assert "skipped empty.ckpt: cannot read checkpoint" in capsys.readouterr().err
    assert DDPM_CKPT in Path("report/eval.md").read_text()


def test_an_output_folder_that_is_a_file_is_named(in_runs):
    Path("taken").write_text("mine")
    fails(sample("--out_dir", "taken"), "--out_dir taken is a file, not a folder")
    fails(["eval", "--ckpt_paths", DDPM_CKPT, "--out_dir", "taken"], "taken is a file")
    assert Path("taken").read_text() == "mine"


def test_an_unwritable_output_folder_is_named_before_sampling(in_runs):
    target = Path("/sys/kernel/diffusion_apps_out")  # sysfs makes no folders, for root neither
    if not target.parent.is_dir():
        pytest.skip("no sysfs here")
    fails(sample("--out_dir", str(target)), f"cannot write to --out_dir {target}")


@pytest.mark.parametrize(
    ("only", "named"), [("--npz", "000000.png"), ("--png", "samples.npz")], ids=["png", "npz"]
)
def test_a_full_disk_leaves_no_partial_file(runs, tmp_path, only, named):
    """Files may grow to 100 bytes (RLIMIT_FSIZE, as a full disk): the first PNG fails, or the
    npz's preallocated arrays."""

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "diffusion_apps", *sample("--out_dir", str(out), only, "false")],
        cwd=runs, capture_output=True, text=True, preexec_fn=small_files, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    last = next(line for line in run.stderr.splitlines() if line.startswith("error: "))
    assert run.returncode == 1 and last.startswith(f"error: cannot write {out}/{named}")
    assert "File too large" in last and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert list(out.iterdir()) == []  # no partial file, hidden or not


@pytest.mark.parametrize(
    "device, named",
    [("tpu9", "'tpu9' is not a device"), ("cuda", "'cuda': no such device on this machine")],
)
def test_a_device_that_is_not_here_is_named(in_runs, device, named):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is here")
    fails(sample("--device", device), named)


@pytest.mark.parametrize(
    "option, named",
    [
        ("--trainer.accelerator=gpu", "trainer: .*gpu"),
        ("--trainer.max_steps=-5", "trainer: `max_steps` must be a non-negative integer"),
    ],
)
def test_lightnings_option_checks_are_one_line(in_tmp, option, named):
    fails(["fit", "--config", TINY, option], named)


def test_a_torchvision_dataset_offline_is_one_line(in_tmp):
    fails(["fit", "--config", TINY, "--data.init_args.dataset", "mnist",
           "--data.init_args.root", str(in_tmp)], r"dataset='mnist'.*download=True")  # fmt: skip


def test_a_classifier_of_another_schedule_is_named(runs):
    from diffusion_apps.checkpoint import load_module

    classifier = load_module(runs / CLASSIFIER_CKPT)
    other_t = DDPM(tiny_unet(image_size=16), NoiseSchedule(num_timesteps=50), sample_steps=5)
    with pytest.raises(ValueError, match=r"another noise schedule \(T = 100\).*\(T = 50\)"):
        ClassifierGuidedDDPM(other_t, classifier)
    unet_32px = tiny_unet(image_size=32, attention_resolutions=(16,))
    other_size = DDPM(unet_32px, NoiseSchedule(num_timesteps=100), sample_steps=5)
    with pytest.raises(ValueError, match=r"takes \(1, 16, 16\) images, the DDPM draws \(1, 32"):
        ClassifierGuidedDDPM(other_size, classifier)


def test_a_billion_laughs_config_is_refused_at_once(in_tmp):
    rows = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    pairs = zip("abcdefgh", "bcdefghi", strict=True)
    rows += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in pairs]
    Path("laughs.yaml").write_text("\n".join(rows) + "\n")
    fails(["fit", "--config", "laughs.yaml"], "expands to 490,329,064 values through YAML")


# Item 3: nothing silently wrong in the sampling options.


@pytest.mark.parametrize(
    "args, named",
    [
        (["--steps", "1000"], r"steps must be in \[1, 100\] \(its T\), got 1000"),
        (["--steps", "0"], r"steps must be in \[1, 100\]"),
        (["--eta", "50"], r"eta must be in \[0, 1\]"),
        (["--eta=-1"], r"eta must be in \[0, 1\].*got -1"),
        (["--num_samples", "100000000000"], r"100000000000 PNG samples need up to [\d.]+ TB"),
    ],
)
def test_sampling_options_out_of_range_are_refused(in_runs, args, named):
    fails(sample(*args), named)
    assert not Path("runs/tiny_ddpm/version_0/samples").exists()


@pytest.mark.parametrize(
    "arguments, named",
    [
        (dict(sample_steps=101), r"sample_steps must be in \[1, 100\]"),
        (dict(eta=1.5), r"eta must be in \[0, 1\], got 1.5"),
    ],
)
def test_a_ddpm_config_out_of_range_is_refused_at_construction(arguments, named):
    with pytest.raises(ValueError, match=named):
        DDPM(tiny_unet(), NoiseSchedule(num_timesteps=100), **arguments)


@pytest.mark.parametrize("labels", [[], [10], [-1], [12]])
def test_labels_outside_the_classes_are_refused(labels):
    """One validator for every method (the LDMs' null class 10 and negative indexing too)."""
    declared = Generation(("ddim",), "ddim", 5, inputs=("labels",), num_classes=10)
    with pytest.raises(ValueError, match=r"non-empty list of classes in \[0, 10\)"):
        declared.check(SampleRequest(labels=labels))


def test_each_sample_setting_gets_its_own_default_folder(in_runs):
    main(sample("--steps", "2"))
    main(sample("--steps", "2", "--eta", "1"))
    main(sample("--steps", "2", "--num_samples", "3"))
    folders = sorted(p.name for p in Path("runs/tiny_ddpm/version_0/samples").iterdir())
    assert folders == [
        "last_ddim2_32_n2_seed0", "last_ddim2_32_n3_seed0", "last_ddim2_eta1_32_n2_seed0",
    ]  # fmt: skip


def test_a_smaller_set_into_the_same_folder_removes_the_rest_and_says_so(in_runs, capsys):
    main(sample("--steps", "2", "--num_samples", "3", "--out_dir", "mine"))
    main(sample("--steps", "2", "--num_samples", "2", "--out_dir", "mine"))
    assert "removed 1 samples of an earlier, larger run" in capsys.readouterr().out
    assert sorted(p.name for p in Path("mine").iterdir()) == [
        "000000.png", "000001.png", "grid.png", "samples.npz",
    ]  # fmt: skip
    assert np.load("mine/samples.npz")["arr_0"].shape[0] == 2


# Item 8: messages that name the real problem.


def test_a_negative_value_after_a_space_reaches_its_option(in_tmp):
    fails(["fit", "--config", TINY, "--model.init_args.lr", "-1e-3"], "lr must be > 0, got -0.001")


def test_an_empty_config_is_named(in_tmp):
    Path("empty.yaml").write_text("")
    fails(["fit", "--config", "empty.yaml"], "config empty.yaml is empty")


def test_help_lists_every_command(capsys):
    main(["--help"])
    shown = capsys.readouterr().out
    assert shown.startswith("usage: python -m diffusion_apps {fit,validate,test,predict,sample,")
    for command in ("fit", "sample", "eval", "autoencode", "import", "export"):
        assert f"\n  {command} " in shown


def test_an_unknown_command_lists_every_command():
    fails(["smaple"], "unknown command 'smaple': choose from fit, .*, sample, eval, autoencode")


def test_the_usage_line_names_the_program_and_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["sample", "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0 and out.startswith("usage: python -m diffusion_apps sample "), out


def test_a_bad_option_value_is_one_short_line(in_runs):
    message = fails(sample("--batch_size", "many"), r'"batch_size"; Expected a .*int.*many')
    assert len(message.splitlines()) == 1 and "sample --help lists the options" in message


def test_sampling_a_classifier_says_how_to_use_it(in_runs):
    fails(["sample", "--ckpt_path", CLASSIFIER_CKPT],
          "NoisyClassifier, which does not generate .*--classifier_path")  # fmt: skip


def test_an_unknown_option_in_fit_is_one_short_line(in_tmp):
    message = fails(["fit", "--config", TINY, "--model.init_args.warmup_stepz", "3"],
                    "Option 'warmup_stepz' is not accepted")  # fmt: skip
    assert len(message.splitlines()) == 1 and "Subtypes" not in message, message


@pytest.mark.parametrize("verify", ["setup", "lazy"])
def test_a_run_that_fails_before_saving_leaves_no_version_folder(in_tmp, verify):
    """The data fails after the logger has named the version folder: at setup, or (verified
    lazily) as the first batch is decoded."""
    Path("images").mkdir()
    for i in range(10):
        Path(f"images/broken{i}.png").write_bytes(b"not a png")
    data = ["--data.init_args.dataset", "folder", "--data.init_args.root", "images",
            "--data.init_args.verify", verify]  # fmt: skip
    fails(["fit", "--config", TINY, *data], r"broken\d\.png")
    assert not Path("runs/tiny_ddpm/version_0").exists()


def test_fit_into_an_unwritable_folder_is_one_line(in_tmp):
    target = "/sys/kernel/diffusion_apps_runs"  # sysfs makes no folders, for root neither
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs here")
    fails(["fit", "--config", TINY, "--trainer.logger.init_args.save_dir", target],
          f"Operation not permitted: {target}")  # fmt: skip
