"""Precision by hardware: bf16 only where it runs natively, an explicit setting wins, and the
half-precision Trainer settings keep the noise schedule intact."""

import logging
from pathlib import Path

import pytest
import torch

from diffusion_apps import precision
from diffusion_apps.cli import DiffusionCLI, main
from tests.conftest import CONFIGS

TINY = CONFIGS / "tiny" / "ddpm.yaml"
HERE = precision.choose("cpu")[0]  # what this machine's CPU gets


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma"}, "32-true"),  # AMD Zen 3, most laptops: bf16 emulated
        ({"avx2", "avx512f", "avx512bw"}, "32-true"),  # AVX-512 without its bf16 extension
        ({"avx512f", "avx512_bf16"}, "bf16-mixed"),  # Zen 4, Cooper Lake
        ({"amx_bf16", "amx_tile"}, "bf16-mixed"),  # Sapphire Rapids
    ],
)
def test_the_cpu_gets_bf16_only_with_native_bf16(flags, expected):
    chosen, why = precision.choose("cpu", flags)
    assert chosen == expected
    assert ("natively" in why) == (expected == "bf16-mixed")


def test_this_cpus_flags_are_read():
    """The flags /proc/cpuinfo lists are the ones the choice sees."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    line = next(x for x in cpuinfo.read_text().splitlines() if x.startswith("flags"))
    listed = set(line.split(":", 1)[1].split()) & set(precision.NATIVE_BF16_FLAGS)
    assert listed <= precision.cpu_flags()
    assert (HERE == "bf16-mixed") == bool(precision.cpu_flags())


def test_other_devices_default_to_fp32():
    assert precision.choose("mps")[0] == "32-true"
    if not torch.cuda.is_available():
        assert precision.choose("cuda")[0] == "32-true"


@pytest.mark.parametrize(
    ("accelerator", "device_type"),
    [("cpu", "cpu"), ("gpu", "cuda"), ("cuda", "cuda"), ("mps", "mps"),
     ("auto", "cuda" if torch.cuda.is_available() else "cpu")],
)  # fmt: skip
def test_the_accelerator_names_the_device(accelerator, device_type):
    assert precision.device_type_of(accelerator) == device_type


def said(caplog, capfd) -> str:
    """What Lightning's logger printed: through the root logger or its own stderr handler."""
    return caplog.text + capfd.readouterr().err


def test_an_unset_precision_is_chosen_by_the_cpu_and_said(in_tmp, caplog, capfd):
    with caplog.at_level(logging.INFO):
        cli = DiffusionCLI(["--config", str(TINY), "--trainer.precision", "null"], run=False)
    assert cli.trainer.precision == HERE
    assert f"precision {HERE}: the CPU" in said(caplog, capfd)


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed"])
def test_an_explicit_precision_wins(in_tmp, caplog, capfd, explicit):
    with caplog.at_level(logging.INFO):
        cli = DiffusionCLI(["--config", str(TINY), "--trainer.precision", explicit], run=False)
    assert cli.trainer.precision == explicit
    assert f"precision {explicit}: as configured" in said(caplog, capfd)


def test_every_full_config_leaves_precision_to_the_hardware():
    """A config that set bf16-mixed made `make demo` ~19x slower on an AVX2-only CPU."""
    import yaml

    for path in sorted(CONFIGS.glob("*.yaml")):
        trainer = yaml.safe_load(path.read_text())["trainer"]
        # consistency distillation runs fp32 on purpose (its x̂_0 = x̄ − σε̂ amplifies rounding)
        assert trainer.get("precision") == ("32-true" if path.stem == "consistency" else None)


def test_sampling_precision_auto_follows_the_cpu(capfd, caplog):
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO):
        assert precision.sampling_precision("auto", cpu) == ("bf16" if HERE != "32-true" else "32")
    assert "precision" in said(caplog, capfd)
    assert precision.sampling_precision("32", cpu) == "32"
    assert precision.sampling_precision("bf16", cpu) == "bf16"


def test_bf16_true_trains_and_samples_with_a_float32_schedule(in_tmp):
    """``--trainer.precision bf16-true`` casts the module: the schedule's tables stay float32,
    the EMA stays float32, the loss and the validation samples are finite."""
    main(["fit", "--config", str(TINY), "--trainer.precision", "bf16-true",
          "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])  # fmt: skip
    ckpt = in_tmp / "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    from diffusion_apps.checkpoint import load_module

    model = load_module(ckpt).to(torch.bfloat16)
    assert model.schedule.alphas_cumprod.dtype == torch.float32
    samples = model.sample(2, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(samples).all() and samples.std() > 0
