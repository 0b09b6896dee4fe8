"""Faults in training: a NaN/Inf loss stops the run with a message naming the step and the last
checkpoint (nothing trained on it), or skips the step when configured; a run killed with SIGKILL
resumes from its newest checkpoint, which is never half-written, without duplicating any; a
rerun into the same version replaces its checkpoints. (SIGTERM and Ctrl-C: test_stopping.py.)"""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from diffusion_apps.callbacks import FiniteLoss
from diffusion_apps.checkpoint import read_checkpoint
from diffusion_apps.cli import main
from tests.conftest import CONFIGS, REPO, assert_same_training_state, run_cli_in

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


def test_sigkill_mid_training_resumes_from_last_as_if_never_killed(tmp_path, caplog, capfd):
    """Kill -9 a run that checkpoints every step; each file left loads, and ``--ckpt_path last``
    finishes the run from the newest with the weights of a run never killed."""
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

    # last.ckpt, or the epoch=…-step=N.ckpt of a save killed before it wrote last.ckpt
    newest = max(last.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    capfd.readouterr()
    with caplog.at_level(logging.INFO):  # resumed in-process: a fresh process adds only imports
        run_cli_in(tmp_path, command[3:])
    said = caplog.text + capfd.readouterr().err  # Lightning logs to either, by its handlers
    assert f"Restored all states from the checkpoint at {newest}" in said
    main(["fit", "--config", str(tmp_path / "every_step.yaml"), "--trainer.max_steps", "16",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "whole")])  # fmt: skip
    whole = read_checkpoint(tmp_path / "whole/tiny_ddpm/version_0/checkpoints/last.ckpt")
    killed = read_checkpoint(last)
    assert killed["global_step"] == whole["global_step"] == 16
    for key in ("state_dict", "current_model_state"):
        for name, value in whole[key].items():
            assert torch.equal(killed[key][name], value), f"{key}.{name}"


class KillDuringLastWrite(L.Callback):
    """Fault injection: SIGKILL this process halfway through writing ``last`` at step 4, after
    the ``epoch=0-step=4`` checkpoint of the same save (its temporary file begun, not renamed)."""

    def setup(self, trainer, pl_module, stage):
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def save_or_die(checkpoint, path, storage_options=None):
            if Path(path).name == "last.ckpt" and checkpoint["global_step"] == 4:
                Path(path).with_name(f".last.ckpt.{os.getpid()}.partial").write_bytes(b"half")
                os.kill(os.getpid(), signal.SIGKILL)
            save(checkpoint, path, storage_options)

        io.save_checkpoint = save_or_die


def test_sigkill_while_writing_last_resumes_from_the_newer_one(tmp_path, monkeypatch, capsys):
    """``last`` is left one save behind ``epoch=0-step=4``: ``--ckpt_path last`` resumes from the
    newer one, instead of training steps 3-4 again and saving ``epoch=0-step=4-v1`` beside it."""
    args = ["fit", "--config", str(CONFIGS / "tiny/ddpm.yaml"), "--trainer.max_steps", "6"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    killed = [sys.executable, "-m", "diffusion_apps", *args]
    killed += ["--trainer.callbacks+=tests.test_faults.KillDuringLastWrite"]
    run = subprocess.run(killed, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    ckpts = tmp_path / CKPT_DIR
    steps = {p.name: read_checkpoint(p)["global_step"] for p in ckpts.glob("*.ckpt")}
    assert steps == {"last.ckpt": 2, "epoch=0-step=4.ckpt": 4}

    monkeypatch.chdir(tmp_path)
    main([*args, "--ckpt_path", "last"])
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert f"--ckpt_path last: {CKPT_DIR}/epoch=0-step=4.ckpt (step 4)" in capsys.readouterr().err
    main([*args, "--trainer.logger.init_args.save_dir", "whole"])
    whole = read_checkpoint(tmp_path / "whole/tiny_ddpm/version_0/checkpoints/last.ckpt")
    assert_same_training_state(read_checkpoint(ckpts / "last.ckpt"), whole, 6)


def test_a_rerun_into_the_same_version_replaces_its_checkpoints(in_tmp):
    """``make demo`` twice: the second run's checkpoints replace the first's, instead of piling
    up ``last-v1.ckpt``, ``epoch=0-step=2-v1.ckpt`` beside them (``last.ckpt``, which ``sample``
    reads, would still be the first run's)."""
    args = ["fit", "--config", str(CONFIGS / "tiny/ddpm.yaml"), "--trainer.max_steps", "4"]
    args += ["--trainer.logger.init_args.version", "0"]
    main(args)
    main([*args, "--model.init_args.lr", "1e-4"])
    ckpts = in_tmp / CKPT_DIR
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert read_checkpoint(ckpts / "last.ckpt")["hyper_parameters"]["lr"] == 1e-4


def test_fast_dev_run_writes_no_checkpoint(in_tmp):
    """Lightning's "checkpointing is suppressed" holds: a smoke run leaves no ``last`` in
    ``./checkpoints`` (ModelCheckpoint's ``on_train_end`` and our final step wrote one)."""
    main(["fit", "--config", str(CONFIGS / "tiny/ddpm.yaml"), "--trainer.fast_dev_run", "true"])
    assert list(in_tmp.rglob("*.ckpt")) == []
