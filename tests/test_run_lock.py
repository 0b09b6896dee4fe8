"""One run at a time in a version folder: a second training (or ``--ckpt_path last`` resume) into
the folder of a running one is refused, naming the holder's PID; a dead holder's lock does not
block."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusion_apps.cli import main
from tests.conftest import CONFIGS, REPO

TINY = str(CONFIGS / "tiny/ddpm.yaml")
VERSION = Path("runs/tiny_ddpm/version_0")
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
HOLD = """
import sys, time
from diffusion_apps.run_lock import lock_run
lock_run(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_a_lock_names_its_holder_and_dies_with_it(tmp_path):
    from diffusion_apps.run_lock import RunLocked, lock_run

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        in_use = rf"{tmp_path} is in use by another run \(PID {holder.pid},"
        with pytest.raises(RunLocked, match=in_use):
            lock_run(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up; its PID stays in the file
        holder.wait()
    lock = lock_run(tmp_path)  # the dead holder's lock does not block
    try:
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    finally:
        lock.release()


def test_a_second_run_into_a_running_version_is_refused(tmp_path, monkeypatch):
    """As ``make demo`` twice at once (``version 0``), or two ``--ckpt_path last`` started
    together: both trained, interleaving their checkpoints and event files."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", TINY, "--trainer.max_steps", "1"])  # version_0, for the resumes
    resume = ["fit", "--config", TINY, "--trainer.max_steps", "1000", "--ckpt_path", "last"]
    first = subprocess.Popen(
        [sys.executable, "-m", "diffusion_apps", *resume, "--trainer.val_check_interval", "1000"],
        cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline, sizes = time.monotonic() + 120, []
        while len(sizes) < 2 or sizes[-1] == sizes[0]:  # the first has logged a training step
            assert first.poll() is None and time.monotonic() < deadline, "no training started"
            time.sleep(0.05)
            events = sorted(VERSION.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
            sizes += [events[-1].stat().st_size] if len(events) == 2 else []
        config = (VERSION / "config.yaml").read_text()
        in_use = rf"error: {VERSION} is in use by another run \(PID {first.pid},"
        second = ["fit", "--config", TINY, "--trainer.max_steps", "2"]
        with pytest.raises(SystemExit, match=in_use):
            main([*second, "--trainer.logger.init_args.version", "0"])
        with pytest.raises(SystemExit, match=in_use):
            main([*second, "--ckpt_path", "last"])
        assert (VERSION / "config.yaml").read_text() == config
        assert len(list(VERSION.glob("events.out.tfevents.*"))) == 2
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
        first.kill()
