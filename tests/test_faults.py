"""Faults in training: a NaN/Inf loss stops the run with a message naming the step and the last
checkpoint (nothing trained on it), or skips the step when configured; a run killed with SIGKILL
resumes from its last checkpoint, which is never half-written."""

import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
import yaml

from diffusion_apps.callbacks import FiniteLoss
from diffusion_apps.checkpoint import read_checkpoint
from diffusion_apps.cli import main
from tests.conftest import CONFIGS, REPO

POISONED_STEP = 3
CKPT_DIR = "runs/tiny_ddpm/version_0/checkpoints"


class PoisonBatch(L.Callback):
    """Fault injection: the images of the batch at step ``POISONED_STEP`` become NaN."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == POISONED_STEP:
            batch[0].fill_(float("nan"))


def fit(*extra: str) -> None:
    main(
        ["fit", "--config", str(CONFIGS / "tiny" / "ddpm.yaml"), "--trainer.max_steps", "6",
         "--trainer.callbacks+=tests.test_faults.PoisonBatch", *extra]
    )  # fmt: skip


def test_a_nan_loss_stops_the_run_and_names_step_and_checkpoint(in_tmp):
    """The tiny config checkpoints at its validation (step 2); the NaN batch is step 3."""
    with pytest.raises(SystemExit, match=r"loss nan at step 3 .*Last checkpoint: .*last\.ckpt"):
        fit()
    written = {p.name: read_checkpoint(p)["global_step"] for p in (in_tmp / CKPT_DIR).iterdir()}
    assert written == {"last.ckpt": 2, "epoch=0-step=2.ckpt": 2}  # nothing after the bad step


def test_skip_leaves_the_weights_and_trains_on(in_tmp):
    fit("--finite_loss.action", "skip", "--trainer.val_check_interval", "6")
    ckpt = read_checkpoint(in_tmp / CKPT_DIR / "last.ckpt")
    assert ckpt["global_step"] == 6  # the skipped step counts
    weights = ckpt["state_dict"]  # NaN gradients applied once would have made them NaN
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("FiniteLoss")]
    assert state == {"skipped": 1}


def test_bad_action_is_named():
    with pytest.raises(ValueError, match="finite_loss.action must be 'stop' or 'skip'"):
        FiniteLoss("ignore")


def test_sigkill_mid_training_resumes_from_last_as_if_never_killed(tmp_path):
    """Kill -9 a run that checkpoints every step; each file left loads, and ``--ckpt_path last``
    finishes the run with the weights of a run never killed."""
    config = yaml.safe_load((CONFIGS / "tiny/ddpm.yaml").read_text())
    config["trainer"]["callbacks"][1]["init_args"]["every_n_train_steps"] = 1
    (tmp_path / "every_step.yaml").write_text(yaml.safe_dump(config))
    args = ["fit", "--config", "every_step.yaml", "--trainer.max_steps", "16"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # threads as in-process
    command = [sys.executable, "-m", "diffusion_apps", *args, "--ckpt_path", "last"]
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    last = tmp_path / CKPT_DIR / "last.ckpt"
    deadline = time.monotonic() + 120
    while not (last.exists() and read_checkpoint(last)["global_step"] >= 4):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    steps = {p.name: read_checkpoint(p)["global_step"] for p in last.parent.glob("*.ckpt")}
    assert 4 <= steps["last.ckpt"] < 16  # every file left is whole (read_checkpoint would say)

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Restored all states from the checkpoint at {last}" in resumed.stderr
    main(["fit", "--config", str(tmp_path / "every_step.yaml"), "--trainer.max_steps", "16",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "whole")])  # fmt: skip
    whole = read_checkpoint(tmp_path / "whole/tiny_ddpm/version_0/checkpoints/last.ckpt")
    killed = read_checkpoint(last)
    assert killed["global_step"] == whole["global_step"] == 16
    for key in ("state_dict", "current_model_state"):
        for name, value in whole[key].items():
            assert torch.equal(killed[key][name], value), f"{key}.{name}"


def test_sigterm_stops_after_the_step_with_last_written(tmp_path):
    """A preempted job (SIGTERM) stops after its current step and writes ``last`` there, instead
    of training on to the end of the epoch (562 steps here) and exiting without a checkpoint."""
    config = yaml.safe_load((CONFIGS / "tiny/ddpm.yaml").read_text())
    config["trainer"]["callbacks"][1]["init_args"]["every_n_train_steps"] = 1000
    config["trainer"]["val_check_interval"] = 1000
    (tmp_path / "rare_saves.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "diffusion_apps", "fit", "--config", "rare_saves.yaml"]
    command += ["--trainer.max_steps", "1000"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        run = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=stderr)
        logs, deadline = tmp_path / "runs/tiny_ddpm/version_0", time.monotonic() + 120
        while not list(logs.glob("events.out.tfevents.*")):  # the trainer is set up
            assert run.poll() is None and time.monotonic() < deadline, "no training started"
            time.sleep(0.1)
        time.sleep(1.0)  # some steps in
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
    last = read_checkpoint(tmp_path / CKPT_DIR / "last.ckpt")
    assert 1 <= last["global_step"] < 500
    assert [p.name for p in (tmp_path / CKPT_DIR).iterdir()] == ["last.ckpt"]
