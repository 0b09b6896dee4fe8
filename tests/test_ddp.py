"""Every method's tiny config trains under DDP with 2 CPU processes, through the CLI in a
torchrun subprocess (in-process DDP would re-run the pytest session in rank 1), and ``sample``
splits its batches across the ranks. The launch by Lightning itself (``python -m diffusion_apps
fit --trainer.devices 2``) and the metric sync are tested in evaluation/test_eval_callback.py,
``eval`` under torchrun in evaluation/test_eval_command.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO, run_cli_in

ORDER = [  # each after the checkpoints it builds on
    "ddpm", "diffae", "ldm_autoencoder", "pdae", "guided_classifier", "consistency",
    "diffae_latent", "ldm", "ldm_caption", "pdae_latent",
]  # fmt: skip
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    configs = [str(CONFIGS / "tiny" / f"{name}.yaml") for name in ORDER]
    command = [str(TORCHRUN), "--nproc_per_node", "2", str(REPO / "tests/ddp_fits.py")]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [*command, "seen.json", *configs], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return root, json.loads((root / "seen.json").read_text())


def test_every_method_trains_in_step_on_two_processes(ddp_run):
    _, seen = ddp_run
    assert sorted(ORDER) == sorted(p.stem for p in (CONFIGS / "tiny").glob("*.yaml"))
    for config, (rank0, rank1) in seen.items():
        assert (rank0["rank"], rank1["rank"]) == ([0, 2], [1, 2]), config
        assert rank0["step"] == rank1["step"] == 2, config
        # DDP averaged the gradients: the ranks trained on different batches to equal weights
        assert rank0["weights"] == rank1["weights"], config
        assert not set(rank0["indices"]) & set(rank1["indices"]), config


def test_sample_splits_batches_across_ranks_as_one_process_would(ddp_run):
    root, _ = ddp_run
    args = ["sample", "--ckpt_path", "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"]
    args += ["--num_samples", "5", "--batch_size", "2", "--out_dir", "samples_one"]
    run_cli_in(root, [*args, "--device", "cpu"])
    two, one = (sorted((root / d).iterdir()) for d in ("samples_ddp", "samples_one"))
    assert [p.name for p in two] == [f"{i:06d}.png" for i in range(5)] + ["grid.png"]
    assert [p.name for p in one] == [p.name for p in two]
    for a, b in zip(two, one, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
