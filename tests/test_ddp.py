"""Every method's tiny config trains under DDP on two "nodes" of one CPU process each (two
torchrun launches on localhost, ``--nnodes 2``), through the CLI in torchrun subprocesses
(in-process DDP would re-run the pytest session in rank 1), resumes there, and ``sample``
splits its batches across the ranks. The launch by Lightning itself (``python -m diffusion_apps
fit --trainer.devices 2``) and the metric sync are tested in evaluation/test_eval_callback.py,
``eval`` under torchrun in evaluation/test_eval_command.py. The statistics measured before
training (LDM's scale, LatentDDIM's μ and σ) pool every rank's data, and ``predict`` draws each
item's image as one process does."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_apps.checkpoint import load_module
from diffusion_apps.cli import DiffusionCLI
from diffusion_apps.data import ImageDataModule
from tests.conftest import CONFIGS, REPO, run_cli_in, tiny_configs, tiny_parts

# Each after the checkpoints it builds on; the tiny DDPM (which builds on none) first: it is the one
# resumed, sampled and predicted.
ORDER = ["ddpm", *(name for name in tiny_configs() if name != "ddpm")]
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    configs = [str(CONFIGS / "tiny" / f"{name}.yaml") for name in ORDER]
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = str(REPO)
    nodes = [
        subprocess.Popen(
            [
                str(TORCHRUN),
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                str(REPO / "tests/ddp_fits.py"),
                "seen.json",
                *configs,
            ],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=900)
        assert node.returncode == 0, err[-4000:]
    return root, json.loads((root / "seen.json").read_text())


def test_every_method_trains_in_step_on_two_processes(ddp_run):
    _, seen = ddp_run
    assert len(ORDER) >= 10  # the discovery found the tiny configs
    assert all(ORDER.index(part) < ORDER.index(name) for name in ORDER for part in tiny_parts(name))
    for config, (rank0, rank1) in seen.items():
        if config == "resumed":
            continue
        assert (rank0["rank"], rank1["rank"]) == ([0, 2], [1, 2]), config
        assert rank0["step"] == rank1["step"] == 2, config
        # DDP averaged the gradients: the ranks trained on different batches to equal weights
        assert rank0["weights"] == rank1["weights"], config
        assert not set(rank0["indices"]) & set(rank1["indices"]), config
        assert rank0["buffers"] == rank1["buffers"], config


def test_two_nodes_resume_in_step(ddp_run):
    """``fit --ckpt_path last`` on both nodes goes on from step 2 to 4 with equal weights, which
    moved from the checkpoint's (the resumed steps trained)."""
    _, seen = ddp_run
    (rank0, rank1), first = seen["resumed"], seen[str(CONFIGS / "tiny" / f"{ORDER[0]}.yaml")][0]
    assert rank0["step"] == rank1["step"] == 4
    assert rank0["weights"] == rank1["weights"] != first["weights"]


def last_checkpoint(root, config: str):
    return load_module(root / "runs" / f"tiny_{Path(config).stem}/version_0/checkpoints/last.ckpt")


def test_the_latent_scale_is_one_over_the_std_of_every_ranks_first_batch(ddp_run):
    """s = 1/std(z) over the z ~ q(z | x) of both ranks' first batches, drawn again here from the
    images and random state each rank measured with (only rank 0's before the all-reduce)."""
    root, seen = ddp_run
    data = ImageDataModule(image_size=16, batch_size=8)  # the tiny configs' data
    data.setup()
    scaled = [config for config, views in seen.items() if "scale_factor" in views[0]["buffers"]]
    assert len(scaled) == 3  # ldm, ldm_caption, ldm_bytes
    for config in scaled:
        first_stage = last_checkpoint(root, config).first_stage
        z = []
        for view in seen[config]:
            images = torch.tensor(view["scale_input"]["images"])
            first = torch.stack([data.train_set[i][0] for i in view["indices"][:8]])
            assert torch.equal(images, first), config  # the rank's first training batch
            with torch.random.fork_rng():
                torch.set_rng_state(
                    torch.tensor(view["scale_input"]["rng_state"], dtype=torch.uint8)
                )
                z.append(first_stage.encode(images).sample())
        expected = 1 / torch.cat(z).double().flatten().std()
        for view in seen[config]:
            assert view["buffers"]["scale_factor"] == pytest.approx(float(expected), rel=1e-5)


def test_latent_statistics_are_measured_over_the_whole_train_split(ddp_run):
    """LatentDDIM's μ and σ: every rank's equal the mean and std of the codes of the whole train
    split computed here in one process (up to the 2 + 2 images each rank's loader drops, ~1e-4
    of their size; one rank's half of the split is off by ~1e-2)."""
    root, seen = ddp_run
    data = ImageDataModule(image_size=16, batch_size=8)
    data.setup()
    images = torch.stack([x for x, _ in data.train_set])
    stats = [config for config, views in seen.items() if "z_mean" in views[0]["buffers"]]
    assert len(stats) == 2  # diffae_latent, pdae_latent
    for config in stats:
        autoencoder = last_checkpoint(root, config).autoencoder
        z = torch.cat([autoencoder.encode(x) for x in images.split(500)]).double()
        for view in seen[config]:
            mean, std = (torch.tensor(view["buffers"][k]).double() for k in ("z_mean", "z_std"))
            torch.testing.assert_close(mean, z.mean(0), atol=1e-4, rtol=1e-3)
            torch.testing.assert_close(std, z.std(0), atol=1e-4, rtol=1e-3)


def test_sample_splits_batches_across_ranks_as_one_process_would(ddp_run):
    root, _ = ddp_run
    args = ["sample", "--ckpt_path", "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"]
    args += ["--num_samples", "5", "--batch_size", "2", "--out_dir", "samples_one"]
    run_cli_in(root, [*args, "--device", "cpu"])
    two, one = (sorted((root / d).iterdir()) for d in ("samples_ddp", "samples_one"))
    pngs = [f"{i:06d}.png" for i in range(5)]
    assert [p.name for p in two] == [*pngs, "grid.png", "samples.npz"]
    assert [p.name for p in one] == [p.name for p in two]
    for a, b in zip(two[:-1], one[:-1], strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    arrays = [np.load(root / d / "samples.npz")["arr_0"] for d in ("samples_ddp", "samples_one")]
    assert arrays[0].shape == (5, 16, 16, 1) and np.array_equal(*arrays)


def test_predict_draws_each_items_image_as_one_process_does(ddp_run, monkeypatch):
    """The two ranks predict different items (Lightning deals them out in turn) and different
    images; each item's image is the one a single process predicts for it."""
    root, _ = ddp_run
    monkeypatch.chdir(root)
    ranks = [torch.load(root / f"predict_{rank}.pt") for rank in (0, 1)]
    args = ["predict", "--config", str(CONFIGS / "tiny/ddpm.yaml")]
    args += ["--ckpt_path", "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"]
    cli = DiffusionCLI(
        args=[*args, "--trainer.limit_predict_batches", "2", "--trainer.logger", "false"]
    )
    one = torch.cat(cli.trainer.predict_loop.predictions)  # items 0, 1, …, 15
    assert sorted(ranks[0]["indices"] + ranks[1]["indices"]) == list(range(len(one)))
    assert not torch.allclose(ranks[0]["images"], ranks[1]["images"], atol=1e-2)
    for rank in ranks:
        torch.testing.assert_close(rank["images"], one[rank["indices"]])
