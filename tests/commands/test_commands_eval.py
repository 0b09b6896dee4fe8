"""``python -m diffusion_apps eval`` on a tiny trained checkpoint: report, floor, grids, errors."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from diffusion_apps.cli import main
from diffusion_apps.commands.common import find_checkpoints, parse_samplers
from tests.conftest import CONFIGS

TINY = str(CONFIGS / "tiny" / "ddpm.yaml")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """runs/ of one tiny fit (2 steps), shared by this module's tests."""
    root = tmp_path_factory.mktemp("fit")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["fit", "--config", TINY, "--trainer.max_steps", "2"])
    finally:
        os.chdir(cwd)
    return root / "runs"


def test_eval_writes_the_report_with_the_floor(run_dir, tmp_path):
    out = tmp_path / "reports"
    common = ["--num_samples", "16", "--batch_size", "8", "--device", "cpu", "--out_dir", str(out)]
    main(["eval", "--run_dir", str(run_dir), "--samplers", "ddim:2,ddpm:3", *common])

    report = json.loads((out / "eval.json").read_text())
    floor, *rows = report["rows"]
    assert floor["method"] == "FLOOR" and floor["num_samples"] == 500
    assert floor["metrics"]["accuracy"] >= 0.9  # the digit classifier on the real val digits
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("ddim", 2), ("ddpm", 3)]
    for row in rows:
        assert row["checkpoint"] == os.path.join(
            "tiny_ddpm", "version_0", "checkpoints", "last.ckpt"
        )
        assert row["method"] == "DDPM" and row["steps_trained"] == 2
        assert row["num_samples"] == row["metrics"]["n_fake"] == 16
        assert row["metrics"]["n_real"] == 4500 and row["seconds"] > 0
        for key in ("fd_digits", "kid_digits", "precision_digits", "recall_digits"):
            assert key in row["metrics"]
    assert any("4500 images" in line for line in report["header"])

    table = (out / "eval.md").read_text()
    assert "FLOOR: real val vs real train" in table and table.count("| DDPM |") == 2
    assert "fd_digits" in table and "train" in table

    grids = sorted(p.name for p in (out / "grids").glob("*.png"))
    assert grids == [
        "tiny_ddpm_version_0_checkpoints_last.ckpt_ddim2.png",
        "tiny_ddpm_version_0_checkpoints_last.ckpt_ddpm3.png",
    ]
    assert Image.open(out / "grids" / grids[0]).size == (4 * 17 + 1, 4 * 17 + 1)  # 4 x 4 of 16 px


def test_named_checkpoints_and_a_list_of_samplers(run_dir, tmp_path):
    ckpt = str(run_dir / "tiny_ddpm/version_0/checkpoints/last.ckpt")
    out = tmp_path / "reports"
    args = ["eval", "--ckpt_paths", f"{ckpt},{ckpt}", "--samplers", "[ddim:1]"]
    main([*args, "--num_samples", "4", "--device", "cpu", "--out_dir", str(out)])
    _, row = json.loads((out / "eval.json").read_text())["rows"]  # the duplicate is dropped
    assert row["checkpoint"] == ckpt and row["sampler"] == "ddim" and row["nfe"] == 1


def test_samples_out_a_file_is_refused_before_sampling(run_dir, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    args = ["eval", "--run_dir", str(run_dir), "--samples_out", str(tmp_path / "taken")]
    with pytest.raises(SystemExit, match=r"error: --samples_out \S*taken is a file, not a folder"):
        main([*args, "--num_samples", "4", "--out_dir", str(tmp_path / "out")])
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_unknown_sampler_is_named(run_dir, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint has a sampler 'heun' .*ddpm, ddim"):
        main(["eval", "--run_dir", str(run_dir), "--samplers", "heun:2", "--num_samples", "4"])


def test_without_checkpoints_it_says_how_to_train_one(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--run_dir", str(tmp_path / "runs")])
    message = str(exit_.value.code)
    assert "no checkpoint" in message and "make demo" in message
    assert "python -m diffusion_apps fit --config configs/ddpm.yaml" in message
    with pytest.raises(SystemExit, match="checkpoint not found: nope.ckpt"):
        main(["eval", "--ckpt_paths", "nope.ckpt"])


def test_one_checkpoint_per_run_version_last_first(tmp_path):
    files = [
        "a/version_0/checkpoints/epoch=0-step=2.ckpt",
        "a/version_0/checkpoints/last.ckpt",
        "a/version_1/checkpoints/epoch=0-step=2.ckpt",
        "a/version_1/checkpoints/epoch=0-step=4.ckpt",
        "b/model.ckpt",
    ]
    for i, name in enumerate(files):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (i, i))
    found = [p.relative_to(tmp_path).as_posix() for p in find_checkpoints(tmp_path)]
    assert found == [files[1], files[3], files[4]]


def test_sampler_settings_parse():
    expected = [("ddpm", 1000, None), ("dpmpp_2m", 10, "logsnr")]
    assert parse_samplers("ddpm:1000, dpmpp_2m:10:logsnr") == expected
    assert parse_samplers(["ddpm:1000", "dpmpp_2m:10:logsnr"]) == expected
    assert parse_samplers("dpmpp_2m:10:logsnr")[0].label == "dpmpp_2m (logsnr)"
    for bad in ("ddim", "ddim:0", ":5", "ddim:x", "ddim:5:", "ddim:5:quad:x"):
        with pytest.raises(ValueError, match="sampler:steps"):
            parse_samplers(bad)


@pytest.mark.slow  # 29 s on a Zen 1; the torchrun gather is in test_commands_eval_distributed
def test_torchrun_ranks_split_the_samples(run_dir, tmp_path):
    """Under torchrun each of 2 CPU processes draws its batches (2 + 2 of the 4 of 2 samples) and
    the metric gathers both: n_fake is 7, the floor is not counted twice, and the scores are
    those of one process."""
    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2"]
    command += ["-m", "diffusion_apps", "eval", "--run_dir", str(run_dir), "--device", "cpu"]
    command += ["--num_samples", "7", "--batch_size", "2", "--samplers", "ddim:2"]
    command += ["--out_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    floor, row = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert floor["num_samples"] == 500 and row["metrics"]["n_fake"] == row["num_samples"] == 7
    alone = tmp_path / "one_process"  # draws the same 7 samples: the same scores
    main([*command[command.index("eval") : -1], str(alone)])
    _, single = json.loads((alone / "eval.json").read_text())["rows"]
    assert single["metrics"] == pytest.approx(row["metrics"], rel=1e-4)
