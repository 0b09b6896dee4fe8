"""The FID-50k protocol, small, on 2 CPU processes: ``torchrun … eval --space inception`` splits
the samples between the ranks and streams them to disk (``--samples_out``), computes the
statistics once over both ranks' samples (the numbers of one process), the written samples score
again to them (``--samples``), the reference folder's features are computed once and cached; a
stopped eval leaves only whole files."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_apps.cli import main
from diffusion_apps.data import files as files_module
from diffusion_apps.distributed import block_batches, rank_batches
from diffusion_apps.evaluation import standard_metrics
from diffusion_apps.evaluation.report import slug
from tests.conftest import fit_tiny
from tests.evaluation.test_eval_inception import weights_file  # noqa: F401 (a fixture)
from tests.evaluation.test_eval_reference import blobs, write_folder
from tests.test_stopping import signal_and_wait, start, wait_for

DDPM = "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
SETTING = "ddim2_32_n24_seed0"  # the sub-folder of the sampler setting


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny DDPM (16 px, 1 channel) fitted for one step."""
    return fit_tiny(tmp_path_factory.mktemp("eval_at_scale"), "ddpm", steps=1)


def test_each_rank_takes_a_contiguous_run_of_the_batches_of_one_process():
    one = rank_batches(23, 5, seed=7, rank=0, world=1)
    for world in (2, 3, 8):
        runs = [block_batches(23, 5, 7, rank, world) for rank in range(world)]
        assert [b for run in runs for b in run] == one  # in rank order: sample order
        assert sorted(len(run) for run in runs)[-1] - sorted(len(run) for run in runs)[0] <= 1


def pixels(folder: Path) -> np.ndarray:
    """uint8 (N, H, W, 3) of the numbered PNGs of ``folder``, in order."""
    names = sorted(p.name for p in folder.glob("*.png"))
    return np.stack([np.asarray(Image.open(folder / name).convert("RGB")) for name in names])


def torchmetrics_fid(fake: np.ndarray, real: np.ndarray, weights: str) -> float:
    """FID by torchmetrics' own implementation on the same InceptionV3: an independent oracle."""
    fid = standard_metrics(weights)["fid"]
    for images, real_ in ((real, True), (fake, False)):
        fid.update(torch.from_numpy(images).permute(0, 3, 1, 2), real=real_)  # (B, 3, H, W)
    return float(fid.compute())


@pytest.mark.filterwarnings("ignore:Metric `.*` will save all extracted features")
def test_two_ranks_score_and_write_what_one_process_does(
    root,
    weights_file,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """24 samples in batches of 5 (ranks 0, 1: batches 0-2, 3-4): IS's 8 random splits of 3
    differ unless the gathered features are in sample order."""
    real = write_folder(tmp_path / "real", blobs(20, 1, seed=0))
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFUSION_APPS_CACHE", str(cache))
    args = ["eval", "--ckpt_paths", str(root / DDPM), "--space", "inception", "--reference"]
    args += [str(real), "--feature_extractor_weights_path", weights_file, "--samplers", "ddim:2"]
    args += ["--num_samples", "24", "--batch_size", "5", "--device", "cpu", "--precision", "32"]
    command = [TORCHRUN, "--nproc_per_node", "2", "-m", "diffusion_apps", *args]
    command += ["--out_dir", str(tmp_path / "two"), "--samples_out", str(tmp_path / "two")]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    (cached,) = cache.glob("reference-inception-folder-*.pt")  # one rank wrote it, once
    (listed,) = cache.glob("reference-inception-folder-listing-*.txt")
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (cached, listed)]

    read = []  # the files load_images decodes in this process
    load_images = files_module.load_images

    def reading(files, *args):
        read.extend(files.paths)
        return load_images(files, *args)

    monkeypatch.setattr(files_module, "load_images", reading)
    main([*args, "--out_dir", str(tmp_path / "one"), "--samples_out", str(tmp_path / "one")])
    assert not any(Path(p).parent == real for p in read)  # the reference came from the cache
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (cached, listed)] == before

    (two,) = json.loads((tmp_path / "two" / "eval.json").read_text())["rows"]
    (one,) = json.loads((tmp_path / "one" / "eval.json").read_text())["rows"]
    assert two["metrics"]["n_fake"] == 24 and two["metrics"]["n_real"] == 20
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-5, abs=1e-12)

    folder = f"{slug(str(root / DDPM))}_{SETTING}"
    written = {n: pixels(tmp_path / n / folder) for n in ("one", "two")}
    assert written["two"].shape == (24, 16, 16, 3) and len(np.unique(written["two"])) > 2
    assert np.array_equal(written["two"], written["one"])
    arrays = np.load(tmp_path / "two" / folder / "samples.npz")
    assert np.array_equal(arrays["arr_0"][..., 0], written["two"][..., 0])  # the PNGs' pixels

    reference = pixels(real)
    oracle = torchmetrics_fid(written["two"], reference, weights_file)
    assert two["metrics"]["fid"] == pytest.approx(oracle, rel=1e-3)
    for kept in (tmp_path / "two" / folder, tmp_path / "two" / folder / "samples.npz"):
        again = ["eval", "--samples", str(kept), *args[3:9], "--out_dir", str(tmp_path / "again")]
        main(again)
        (row,) = json.loads((tmp_path / "again" / "eval.json").read_text())["rows"]
        assert row["metrics"] == pytest.approx(two["metrics"], rel=1e-4, abs=1e-12), kept


def test_a_stopped_eval_leaves_whole_pngs_and_no_npz(root, tmp_path):
    args = ["eval", "--ckpt_paths", str(root / DDPM), "--samplers", "ddim:100", "--device", "cpu"]
    args += ["--num_samples", "2048", "--batch_size", "64", "--precision", "32"]
    run = start(tmp_path, *args, "--out_dir", "out", "--samples_out", "kept")
    folder = tmp_path / "kept" / f"{slug(str(root / DDPM))}_ddim100_32_n2048_seed0"
    wait_for((folder / "000000.png").exists, run, "a sample")
    code, _, line = signal_and_wait(run, signal.SIGTERM, tmp_path)
    assert code == 128 + signal.SIGTERM, line
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{i:06d}.png" for i in range(len(names))]  # no npz, no partial file
    assert 64 <= len(names) < 2048 and len(names) % 64 == 0
    assert re.fullmatch(rf"stopped by SIGTERM: {len(names)} of 2048 samples drawn, .*", line)
    for name in names:
        with Image.open(folder / name) as image:
            image.verify()  # whole
