"""Bad input through the CLI: a one-line ``error:`` that names the problem (no traceback from
inside torch), before anything is written, and nothing already written is lost."""

import io
import re

import pytest
from PIL import Image

from diffusion_apps.cli import main
from tests.conftest import CONFIGS, fit_tiny, tiny_configs, tiny_parts

TINY = str(CONFIGS / "tiny/ddpm.yaml")
DDPM_CKPT = "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"
DIFFAE_CKPT = "runs/tiny_diffae/version_0/checkpoints/last.ckpt"


def fails(args: list[str], named: str) -> str:
    """``main(args)`` exits with one line, ``error: …``, matching ``named``."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = str(exit_info.value)
    assert message.startswith("error: ") and re.search(named, message), message
    return message


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny DDPM and a tiny DiffAE, two steps each."""
    return fit_tiny(tmp_path_factory.mktemp("runs"), "ddpm", "diffae")


def resume(runs, ckpt, *extra: str, named: str, monkeypatch) -> None:
    """Resuming the tiny DDPM from ``ckpt`` fails naming ``named``; every file stays."""
    monkeypatch.chdir(runs)
    before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    fails(["fit", "--config", TINY, "--ckpt_path", str(ckpt), *extra], named)
    after = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    assert after == before


def test_resume_from_another_method(runs, monkeypatch):
    named = "holds a DiffAE checkpoint, but this run's model is a DDPM"
    resume(runs, DIFFAE_CKPT, named=named, monkeypatch=monkeypatch)


def test_resume_with_other_shapes(runs, monkeypatch):
    wider = "--model.init_args.unet.init_args.base_channels=16"
    named = r"does not fit this run's DDPM \(127 tensors differ: .* is \(16,\) in the file, \(32,\)"
    resume(runs, DDPM_CKPT, wider, named=named, monkeypatch=monkeypatch)


def test_resume_from_a_truncated_checkpoint(runs, monkeypatch):
    cut = runs / "cut.ckpt"
    cut.write_bytes((runs / DDPM_CKPT).read_bytes()[:5000])
    resume(runs, cut, named="cannot read checkpoint .*cut.ckpt: truncated", monkeypatch=monkeypatch)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["--model.init_args.lr=-1"], "lr must be > 0, got -1"),
        (["--model.init_args.unet.init_args.num_groups=3"], "num_groups=3 does not divide"),
        (["--data.init_args.batch_size=0"], "invalid batch_size=0"),
        (
            ["--model.init_args.unet.init_args.image_size=18", "--data.init_args.image_size=18",
             "--model.init_args.unet.init_args.channel_mult=[1,2,2]"],
            r"image_size=18 is not divisible by 2\*\*2=4",
        ),
    ],
    ids=["lr", "num_groups", "batch_size", "unet-levels"],
)  # fmt: skip
def test_a_bad_value_checked_by_a_constructor(in_tmp, overrides, named):
    fails(["fit", "--config", TINY, *overrides], named)
    assert not (in_tmp / "runs").exists()


@pytest.mark.parametrize(
    "config, part",
    [(name, f"tiny_{part}") for name in tiny_configs() for part in tiny_parts(name)],
)
def test_a_missing_part_is_named(in_tmp, config, part):
    """Each method that builds on a trained checkpoint (stage 1, teacher, DDPM) names it."""
    named = f"checkpoint not found: runs/{part}/version_0/checkpoints/last.ckpt"
    fails(["fit", "--config", str(CONFIGS / f"tiny/{config}.yaml")], named)


def png(size=(16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "broken, named",
    [
        (b"", "empty.png"),
        (b"just text", "empty.png"),
        (None, "empty.png"),  # a cut PNG
    ],
    ids=["empty-file", "not-an-image", "truncated-image"],
)
def test_bad_image_files_are_named(in_tmp, broken, named):
    for i in range(4):
        (in_tmp / "images" / f"{i}.png").parent.mkdir(exist_ok=True)
        (in_tmp / "images" / f"{i}.png").write_bytes(png())
    (in_tmp / "images" / "empty.png").write_bytes(png()[:-30] if broken is None else broken)
    folder = ["--data.init_args.dataset", "folder", "--data.init_args.root", "images"]
    fails(["fit", "--config", TINY, *folder, "--data.init_args.batch_size", "2"], named)


@pytest.mark.parametrize(
    "make, named",
    [
        (lambda root: None, r"root 'images' is not a directory"),
        (lambda root: (root / "images").mkdir(), r"no images \(\*\.png.*found under images"),
    ],
    ids=["missing-folder", "empty-folder"],
)
def test_missing_or_empty_data_folder_is_named(in_tmp, make, named):
    make(in_tmp)
    folder = ["--data.init_args.dataset", "folder", "--data.init_args.root", "images"]
    fails(["fit", "--config", TINY, *folder], named)
