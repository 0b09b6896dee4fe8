"""The FID-50k protocol, small, on 2 CPU processes: ``torchrun … eval --space inception`` splits
the samples between the ranks and streams them to disk (``--samples_out``), computes the
statistics once over both ranks' samples (the numbers of one process), the written samples score
again to them (``--samples``), the reference folder's features are computed once and cached; a
stopped eval leaves only whole files."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_apps.cli import main
from diffusion_apps.commands.sample import SampleFiles
from diffusion_apps.data import files as files_module
from diffusion_apps.distributed import block_batches, rank_batches
from diffusion_apps.evaluation.inception import inception_feature_extractor
from diffusion_apps.evaluation.report import slug
from tests.conftest import fit_tiny
from tests.evaluation.test_eval_inception import (
    WEIGHTS_NAME,
    weights_file,  # noqa: F401 (a fixture)
)
from tests.evaluation.test_eval_reference import blobs, write_folder

DDPM = "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
SETTING = "ddim2_32_n11_seed0"  # the sub-folder of the sampler setting


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny DDPM (16 px, 1 channel) fitted for one step."""
    return fit_tiny(tmp_path_factory.mktemp("eval_at_scale"), "ddpm", steps=1)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, weights_file) -> str:  # noqa: F811
    """The random InceptionV3 of ``weights_file`` with each batch norm's running statistics
    those of one batch of images, so that its activations do not vanish: the uncalibrated
    network's features are ~1e-6, where FID, KID and IS are all rounding."""
    net = inception_feature_extractor(weights_file)
    for norm in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.reset_running_stats()
        norm.momentum = None  # a plain average: this batch's statistics
        norm.train()
    with torch.no_grad():
        net(torch.from_numpy(blobs(4, 3, seed=9)).permute(0, 3, 1, 2))  # (4, 3, 16, 16) uint8
    path = tmp_path_factory.mktemp("calibrated") / WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return str(path)


def test_each_rank_takes_a_contiguous_run_of_the_batches_of_one_process():
    one = rank_batches(23, 5, seed=7, rank=0, world=1)
    for world in (2, 3, 8):
        runs = [block_batches(23, 5, 7, rank, world) for rank in range(world)]
        assert [b for run in runs for b in run] == one  # in rank order: sample order
        lengths = [len(run) for run in runs]  # as even as can be, the longer runs first
        assert lengths == sorted(lengths, reverse=True) and lengths[0] - lengths[-1] <= 1


def pixels(folder: Path) -> np.ndarray:
    """uint8 (N, H, W, 3) of the numbered PNGs of ``folder``, in order."""
    names = sorted(p.name for p in folder.glob("[0-9]*.png"))
    return np.stack([np.asarray(Image.open(folder / name).convert("RGB")) for name in names])


def test_two_ranks_score_and_write_what_one_process_does(root, calibrated, tmp_path, monkeypatch):
    """11 samples in batches of 3 (rank 0: batches 0-1, 6 samples; rank 1: batches 2-3, 5):
    KID's random subsets of 4, IS's 6 random splits of 2 and so the scores differ from one
    process's unless the ranks' features are gathered, in sample order."""
    real = write_folder(tmp_path / "real", blobs(4, 1, seed=0))
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFUSION_APPS_CACHE", str(cache))
    args = ["eval", "--ckpt_paths", str(root / DDPM), "--space", "inception", "--reference"]
    args += [str(real), "--feature_extractor_weights_path", calibrated, "--samplers", "ddim:2"]
    args += ["--num_samples", "11", "--batch_size", "3", "--device", "cpu", "--precision", "32"]
    command = [TORCHRUN, "--nproc_per_node", "2", "-m", "diffusion_apps", *args]
    command += ["--out_dir", str(tmp_path / "two"), "--samples_out", str(tmp_path / "two")]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    (cached,) = cache.glob("reference-inception-folder-*.pt")  # one rank wrote it, once
    (listed,) = cache.glob("reference-inception-folder-listing-*.txt")
    assert not list(cache.glob("*.tmp"))  # written aside and renamed: nothing half-written
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (cached, listed)]

    read = []  # the files load_images decodes in this process
    load_images = files_module.load_images

    def reading(files, *args):
        read.extend(files.paths)
        return load_images(files, *args)

    # One process scores the two ranks' npz again, and `sample` draws the same images alone.
    folder = tmp_path / "two" / f"{slug(str(root / DDPM))}_{SETTING}"
    monkeypatch.setattr(files_module, "load_images", reading)
    main(["eval", "--samples", str(folder / "samples.npz"), *args[3:9], "--out_dir", str(tmp_path)])
    assert read == []  # no reference image decoded: its features came from the cache
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (cached, listed)] == before
    alone = ["--num_samples", "11", "--batch_size", "3", "--sampler", "ddim", "--steps", "2"]
    alone += ["--device", "cpu", "--precision", "32"]
    main(["sample", "--ckpt_path", str(root / DDPM), *alone, "--out_dir", str(tmp_path / "one")])

    (two,) = json.loads((tmp_path / "two" / "eval.json").read_text())["rows"]
    (one,) = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert two["metrics"]["n_fake"] == one["metrics"]["n_fake"] == 11
    assert two["metrics"]["n_real"] == 4
    assert two["metrics"]["fid"] > 1 and two["metrics"]["inception_score"] > 1 + 1e-3
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-4)  # up to uint8 rounding

    written = pixels(folder)
    assert written.shape == (11, 16, 16, 3) and len(np.unique(written)) > 2
    assert np.array_equal(written, pixels(tmp_path / "one"))
    arrays = np.load(folder / "samples.npz")
    assert np.array_equal(arrays["arr_0"][..., 0], written[..., 0])  # the PNGs' pixels
    assert np.array_equal(arrays["arr_0"], np.load(tmp_path / "one" / "samples.npz")["arr_0"])


def test_a_stopped_eval_leaves_whole_pngs_and_no_npz(root, tmp_path, monkeypatch, capsys):
    """SIGTERM once the first batch is on disk: eval stops at its next sampler step, exits 143,
    and leaves that batch's PNGs, whole, and no ``samples.npz`` or temporary file."""
    write = SampleFiles.write

    def write_then_sigterm(self, *args):
        write(self, *args)
        os.kill(os.getpid(), signal.SIGTERM)  # a preempted job

    monkeypatch.setattr(SampleFiles, "write", write_then_sigterm)
    np.savez(tmp_path / "real.npz", arr_0=blobs(4, 1, seed=1))
    args = ["eval", "--ckpt_paths", str(root / DDPM), "--samplers", "ddim:2", "--device", "cpu"]
    args += ["--num_samples", "64", "--batch_size", "8", "--precision", "32", "--reference"]
    args += [str(tmp_path / "real.npz"), "--out_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--samples_out", str(tmp_path / "kept")])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM: 8 of 64 samples drawn" in capsys.readouterr().err
    folder = tmp_path / "kept" / f"{slug(str(root / DDPM))}_ddim2_32_n64_seed0"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{i:06d}.png" for i in range(8)]  # no npz, no partial file
    for name in names:
        with Image.open(folder / name) as image:
            image.verify()  # whole
    assert not (tmp_path / "out" / "eval.json").exists()
