"""A checkpoint made elsewhere cannot import code, allocate without limit, or sample NaN weights:
each is refused with one line naming what is wrong, before anything is imported or allocated."""

import subprocess
import sys

import pytest
import torch

from diffusion_apps.checkpoint import CheckpointError, load_module, read_checkpoint
from tests.conftest import CONFIGS, REPO, run_cli_in
from tests.test_bad_input import fails


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = run_cli_in(
        tmp_path_factory.mktemp("run"),
        ["fit", "--config", str(CONFIGS / "tiny/ddpm.yaml"), "--trainer.max_steps", "2"],
    )
    return root / "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"


def crafted(ckpt, tmp_path, edit) -> str:
    """A copy of the tiny DDPM checkpoint, ``edit``ed in place (a dict → None)."""
    data = read_checkpoint(ckpt)
    edit(data)
    path = tmp_path / "crafted.ckpt"
    torch.save(data, path)
    return str(path)


def sample_args(path: str, tmp_path) -> list[str]:
    """``sample`` of the checkpoint at ``path`` into ``tmp_path/out``, for ``main`` or after
    ``python -m diffusion_apps``."""
    return ["sample", "--num_samples", "2", "--ckpt_path", path, "--out_dir", str(tmp_path / "out"),
            "--precision", "32"]  # fmt: skip


def sample_fails(path: str, tmp_path, named: str) -> str:
    """``sample`` in a fresh process exits 1 with one ``error:`` line matching ``named``."""
    run = subprocess.run(
        [sys.executable, "-m", "diffusion_apps", *sample_args(path, tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and lines[-1].startswith("error: "), run.stderr[-2000:]
    assert named in lines[-1] and "Traceback" not in run.stderr, run.stderr[-2000:]
    return run.stdout + run.stderr


def test_a_foreign_class_path_is_refused_before_its_module_runs(ckpt, tmp_path):
    """``this`` prints the Zen of Python when imported: it must never be imported."""
    path = crafted(ckpt, tmp_path, lambda d: d["hyper_parameters"].update(_class_path="this.DDPM"))
    output = sample_fails(path, tmp_path, "'this.DDPM'")
    assert "Beautiful is better than ugly" not in output


def test_a_nested_class_path_is_refused(ckpt, tmp_path):
    def edit(d):
        d["hyper_parameters"]["unet"]["class_path"] = "os.system"

    with pytest.raises(CheckpointError, match="'os.system'.*not a class of diffusion_apps"):
        load_module(crafted(ckpt, tmp_path, edit))


def test_a_dotted_module_name_in_any_argument_is_refused(ckpt, tmp_path):
    """jsonargparse imports a string given for a class-typed argument."""

    def edit(d):
        d["hyper_parameters"]["schedule"] = "antigravity.fly"

    with pytest.raises(CheckpointError, match="'antigravity.fly'"):
        load_module(crafted(ckpt, tmp_path, edit))
    assert "antigravity" not in sys.modules


def test_a_foreign_data_class_path_is_refused(ckpt, tmp_path):
    from diffusion_apps.commands.common import checkpoint_data

    data = read_checkpoint(ckpt)
    data["datamodule_hyper_parameters"]["_class_path"] = "this.Data"
    with pytest.raises(CheckpointError, match="data config names 'this.Data'"):
        checkpoint_data(data, load_module(ckpt))


def test_trusted_modules_are_named_by_the_environment(ckpt, tmp_path, monkeypatch):
    """The user's own method outside the package loads once its root is trusted."""
    path = crafted(ckpt, tmp_path, lambda d: d["hyper_parameters"].update(_class_path="mine.X"))
    with pytest.raises(CheckpointError, match="DIFFUSION_APPS_TRUSTED_MODULES=mine"):
        load_module(path)
    monkeypatch.setenv("DIFFUSION_APPS_TRUSTED_MODULES", "mine")
    with pytest.raises(ModuleNotFoundError, match="'mine'"):  # trusted: now it is imported
        load_module(path)


def test_a_config_far_larger_than_its_weights_is_refused_before_allocating(ckpt, tmp_path):
    """A width of 10⁶ channels asks for ~10¹³ weights (tens of terabytes)."""

    def edit(d):
        d["hyper_parameters"]["unet"]["init_args"]["base_channels"] = 1_000_000

    with pytest.raises(CheckpointError, match="refused before allocating"):
        load_module(crafted(ckpt, tmp_path, edit))


def test_a_config_a_few_times_larger_is_refused_too(ckpt, tmp_path):
    """64× the channels (8 → 512): no single tensor passes the limit, their sum does."""

    def edit(d):
        d["hyper_parameters"]["unet"]["init_args"]["base_channels"] *= 64

    with pytest.raises(CheckpointError, match=r"but the file holds [\d,]+ weights"):
        load_module(crafted(ckpt, tmp_path, edit))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(ckpt, tmp_path, bad):
    def edit(d):
        first_weight = next(k for k in d["state_dict"] if k.endswith("weight"))
        d["state_dict"][first_weight].view(-1)[0] = bad

    fails(sample_args(crafted(ckpt, tmp_path, edit), tmp_path), "NaN/Inf values")
    assert not (tmp_path / "out").exists()


def test_an_empty_checkpoint_file_is_one_line(tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    fails(sample_args(str(empty), tmp_path), "cannot read checkpoint")
