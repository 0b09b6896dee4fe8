"""Stopping: SIGTERM (a preempted job) or Ctrl-C stops a run within seconds wherever it is (a
training step, the validation grid, ``sample``), writes what there is to write (``last``, with
the training weights), exits with 128 + the signal's number and says, in one line, what was
saved and how to resume."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from diffusion_apps import stop
from diffusion_apps.checkpoint import read_checkpoint
from diffusion_apps.cli import main
from diffusion_apps.diffusion import NoiseSchedule, ddim_sample, ddpm_sample, dpm_solver_pp_2m
from tests.conftest import CONFIGS, REPO, assert_same_training_state

TINY = str(CONFIGS / "tiny/ddpm.yaml")
VERSION = Path("runs/tiny_ddpm/version_0")
LAST = VERSION / "checkpoints/last.ckpt"
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # threads as in-process
RARE_SAVES = ["--trainer.max_steps", "1000", "--trainer.val_check_interval", "1000"]


@pytest.fixture(autouse=True)
def no_stop_left():
    yield
    stop.clear()


# The flag and the loops that check it


def test_a_signal_makes_the_next_check_raise_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop.on_signals():
        stop.check()  # nothing asked yet
        signal.raise_signal(signal.SIGTERM)  # in this thread: the handler has run on return
        assert stop.requested() == signal.SIGTERM
        with pytest.raises(stop.StopRequested) as stopped:
            stop.check()
    assert stopped.value.code == 128 + signal.SIGTERM and "SIGTERM" in str(stopped.value)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert stop.requested() is None


@pytest.fixture
def ctrl_c_on():
    """Python's own SIGINT handler, as in a terminal: a process started in the background (nohup,
    CI) inherits SIGINT ignored, and on_signals leaves an ignored signal ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_second_ctrl_c_interrupts_at_once(ctrl_c_on):
    with stop.on_signals():
        signal.raise_signal(signal.SIGINT)  # the first asks for a stop at the next check
        assert stop.requested() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
            time.sleep(1)


@pytest.mark.parametrize(
    "sampler",
    [ddpm_sample, ddim_sample, dpm_solver_pp_2m],
    ids=["ddpm", "ddim", "dpmpp_2m"],
)
def test_samplers_stop_at_the_next_step(sampler):
    calls = []

    def eps_fn(x, t):
        calls.append(int(t[0]))
        if len(calls) == 3:
            stop.request(signal.SIGTERM)
        return torch.zeros_like(x)

    with pytest.raises(stop.StopRequested):
        sampler(eps_fn, NoiseSchedule(num_timesteps=100), torch.randn(2, 1, 4, 4))
    assert len(calls) == 3  # of 100 steps


# End to end, in subprocesses that get the signal


class MarkValidation(L.Callback):
    """Touches ``validating`` in the working directory when a validation (not the sanity check)
    starts, so a test knows when to send its signal."""

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            Path("validating").touch()


class MarkStep(L.Callback):
    """Touches ``stepped`` in the working directory when a training step has ended: a signal
    sent before it finds nothing to save (the TensorBoard file appears before training starts,
    so it made a test race the first step on a loaded machine)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        Path("stepped").touch()


def start(tmp_path: Path, *args: str) -> subprocess.Popen:
    """``python -m diffusion_apps *args`` in ``tmp_path``, stderr to ``stderr.txt``; SIGINT as a
    terminal delivers it (not ignored, as in a background job of a non-interactive shell)."""
    with open(tmp_path / "stderr.txt", "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "diffusion_apps", *args],
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def wait_for(condition, run: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def signal_and_wait(run: subprocess.Popen, signum: int, tmp_path: Path) -> tuple[int, float, str]:
    """Send ``signum``; the exit code, the seconds it took to exit, the line saying so."""
    sent = time.monotonic()
    run.send_signal(signum)
    try:
        code = run.wait(timeout=120)
    finally:
        run.kill()
    stderr = (tmp_path / "stderr.txt").read_text()
    lines = re.findall(r"stopped by [^\r\n]*", stderr)  # after a progress bar, maybe
    assert len(lines) == 1, stderr[-3000:]
    return code, time.monotonic() - sent, lines[0]


# Ctrl-C in a child run is in `make test-all`: its handler is the one tested in-process above
CTRL_C = pytest.param(signal.SIGINT, id="ctrl-c", marks=pytest.mark.slow)


@pytest.mark.parametrize("signum", [CTRL_C, pytest.param(signal.SIGTERM, id="sigterm")])
def test_a_signal_mid_training_writes_last_and_exits_non_zero(tmp_path, signum):
    """Ctrl-C used to save nothing (and exit 1), SIGTERM to exit 0 as if the run had ended: a
    script (``make demo``) went on to sample a half-trained model."""
    mark = "--trainer.callbacks+=tests.test_stopping.MarkStep"
    run = start(tmp_path, "fit", "--config", TINY, *RARE_SAVES, mark)
    wait_for((tmp_path / "stepped").exists, run, "a training step")
    code, seconds, line = signal_and_wait(run, signum, tmp_path)
    assert code == 128 + signum, line
    assert seconds < 20  # a step, and the save
    step = read_checkpoint(tmp_path / LAST)["global_step"]
    assert 1 <= step < 500
    name = signal.Signals(signum).name
    assert re.fullmatch(
        rf"stopped by {name} at step {step}: saved \S*{LAST}; resume with: \S*python\S* -m "
        rf"diffusion_apps fit --config {re.escape(TINY)} .*--ckpt_path last",
        line,
    ), line
    assert [p.name for p in (tmp_path / LAST).parent.iterdir()] == ["last.ckpt"]


def test_sigterm_mid_validation_stops_within_seconds_with_the_training_weights(
    tmp_path, monkeypatch
):
    """The validation grid (512 samples, 100 DDIM steps: about 30 s here) is interrupted at its
    next sampling step; ``last`` holds the training weights (not the EMA weights validation
    swapped in) and resumes to the state of a run never stopped."""
    args = ["fit", "--config", TINY, "--trainer.num_sanity_val_steps", "0"]
    long_grid = ["--model.init_args.num_val_samples", "512", "--model.init_args.sample_steps"]
    long_grid += ["100", "--trainer.callbacks+=tests.test_stopping.MarkValidation"]
    run = start(tmp_path, *args, *long_grid)
    wait_for((tmp_path / "validating").exists, run, "validation")
    time.sleep(1.0)  # into the grid
    code, seconds, line = signal_and_wait(run, signal.SIGTERM, tmp_path)
    assert code == 128 + signal.SIGTERM, line
    assert seconds < 10, line
    assert re.fullmatch(rf"stopped by SIGTERM at step 2: saved \S*{LAST}; resume with: .*", line)

    monkeypatch.chdir(tmp_path)
    main([*args, "--ckpt_path", "last"])  # on to step 4, the small grid
    main([*args, "--trainer.logger.init_args.save_dir", "whole"])
    whole = read_checkpoint(tmp_path / "whole" / LAST.relative_to("runs"))
    assert_same_training_state(read_checkpoint(tmp_path / LAST), whole, 4)


def test_sigterm_in_sample_stops_within_seconds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", TINY, "--trainer.max_steps", "1"])
    args = ["sample", "--ckpt_path", str(LAST), "--num_samples", "2048", "--batch_size", "64"]
    args += ["--sampler", "ddim", "--steps", "100", "--out_dir", "out", "--device", "cpu"]
    run = start(tmp_path, *args, "--precision", "32")
    wait_for((tmp_path / "out/000000.png").exists, run, "a sample")
    code, seconds, line = signal_and_wait(run, signal.SIGTERM, tmp_path)
    assert code == 128 + signal.SIGTERM, line
    assert seconds < 10, line
    written = len(list((tmp_path / "out").glob("*.png")))
    assert 64 <= written < 2048 and written % 64 == 0
    assert re.fullmatch(rf"stopped by SIGTERM: {written} of 2048 samples drawn, .*", line), line
