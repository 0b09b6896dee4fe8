"""scripts/slurm_fit.sbatch as SLURM runs it on two nodes of one task each: each task executes
the script's ``srun`` line with the variables srun gives it (SLURM_PROCID, SLURM_NODEID, …), so
Lightning's SLURMEnvironment takes the ranks and the rendezvous from them, not from torchrun.
There is no SLURM here: ``srun`` is a stand-in that runs its command once, in the task it is
called from. A resubmission of the same command goes on from the first one's last.ckpt."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from diffusion_apps.checkpoint import read_checkpoint
from tests.conftest import CONFIGS, REPO

SCRIPT = REPO / "scripts" / "slurm_fit.sbatch"


def submit(root: Path, steps: int) -> None:
    """One ``sbatch --nodes 2`` of the tiny DDPM to ``steps``: its two tasks, run at once."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "diffusion_apps", "SLURM_NTASKS": "2",
           "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "1",
           "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    env = os.environ | job | {"ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env |= {"PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    env["PATH"] = f"{bin_dir}:{Path(sys.executable).parent}:{env['PATH']}"
    args = [str(CONFIGS / "tiny" / "ddpm.yaml"), "--trainer.max_steps", str(steps),
            "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "0"]  # fmt: skip
    tasks = [
        subprocess.Popen(
            ["bash", str(SCRIPT), *args],
            cwd=root,
            text=True,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env | {"SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank), "SLURM_LOCALID": "0"},
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for task in tasks:
        _, err = task.communicate(timeout=600)
        assert task.returncode == 0, err[-4000:]


def test_the_sbatch_script_trains_on_two_nodes_and_a_resubmission_resumes(tmp_path):
    """The first submission trains 2 steps as 2 ranks (the checkpoint holds both ranks' random
    states); the second, the same command to 4 steps, resumes it in the same version folder."""
    submit(tmp_path, 2)
    runs = tmp_path / "runs" / "tiny_ddpm"
    first = read_checkpoint(runs / "version_0" / "checkpoints" / "last.ckpt")
    random_states = next(v for k, v in first["callbacks"].items() if "RandomState" in k)
    assert first["global_step"] == 2 and len(random_states["ranks"]) == 2
    submit(tmp_path, 4)
    resumed = read_checkpoint(runs / "version_0" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 4
    assert [p.name for p in runs.iterdir()] == ["version_0"]
