"""Checkpoints load with weights_only=True, rebuild their module, and fail loudly when wrong."""

import ast
import os
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning import LightningModule

from diffusion_apps.checkpoint import (
    CheckpointError,
    SafeCheckpointIO,
    load_module,
    read_checkpoint,
)
from diffusion_apps.cli import main
from diffusion_apps.methods import DDPM
from tests.conftest import CONFIGS, REPO


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "tiny/ddpm.yaml"),
            "--trainer.max_steps",
            "2",
            "--trainer.logger.init_args.save_dir",
            str(root),
        ]
    )
    return root / "tiny_ddpm/version_0/checkpoints/last.ckpt"


def test_load_module_rebuilds_the_model_with_its_ema_weights(ckpt):
    module = load_module(ckpt, DDPM)
    assert isinstance(module, DDPM) and not module.training
    assert module.unet.base_channels == 8 and module.schedule.num_timesteps == 100
    saved = read_checkpoint(ckpt)["state_dict"]
    for name, value in module.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*absent.ckpt"):
        load_module(tmp_path / "absent.ckpt")


def test_truncated_file_is_named(ckpt, tmp_path):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*cut.ckpt: truncated"):
        load_module(cut)


def test_pickled_objects_are_refused(tmp_path):
    bad = tmp_path / "pickle.ckpt"
    torch.save({"state_dict": {}, "payload": object()}, bad)
    with pytest.raises(CheckpointError, match="weights_only=True refuses"):
        read_checkpoint(bad)


def test_another_kind_is_named(ckpt):
    class Classifier(LightningModule):
        pass

    with pytest.raises(CheckpointError, match="holds a DDPM checkpoint, but a Classifier"):
        load_module(ckpt, Classifier)


def test_checkpoint_without_config_is_refused(ckpt, tmp_path):
    saved = read_checkpoint(ckpt)
    saved.pop("hyper_parameters")
    bare = tmp_path / "bare.ckpt"
    torch.save(saved, bare)
    with pytest.raises(CheckpointError, match="holds no model config"):
        load_module(bare)


def test_mismatched_shapes_are_named(ckpt, tmp_path):
    saved = read_checkpoint(ckpt)
    saved["hyper_parameters"]["unet"]["init_args"]["base_channels"] = 16
    other = tmp_path / "other.ckpt"
    torch.save(saved, other)
    with pytest.raises(CheckpointError, match="do not fit the DDPM(.|\n)*size mismatch"):
        load_module(other)


WRITER = """
import sys, torch
from diffusion_apps.checkpoint import SafeCheckpointIO
io, i = SafeCheckpointIO(), 0
while True:  # 16 MB checkpoints, one after the other
    w = torch.full((4_000_000,), float(i))
    io.save_checkpoint({"state_dict": {"w": w}, "i": i}, sys.argv[1])
    i += 1
    print(i, flush=True)
"""


def test_a_checkpoint_killed_while_written_is_the_old_or_the_new_one(tmp_path):
    """SIGKILL a process that does nothing but write checkpoints, at a random moment: the file
    left is whole every time (with the system temp dir on another file system, as Lightning's
    own writer would copy from it)."""
    path, env = tmp_path / "last.ckpt", os.environ | {"PYTHONPATH": str(REPO)}
    if Path("/dev/shm").is_dir():
        env["TMPDIR"] = "/dev/shm"
    rng = random.Random(0)
    for _ in range(2):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], env=env, stdout=subprocess.PIPE, text=True
        )
        while int(writer.stdout.readline()) < 2:
            pass
        time.sleep(rng.uniform(0.0, 0.2))
        writer.kill()
        writer.wait()
        ckpt = read_checkpoint(path)
        assert ckpt["state_dict"]["w"].eq(ckpt["i"]).all()
    SafeCheckpointIO().save_checkpoint({"state_dict": {}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # killed writes cleaned up


def test_resuming_reads_weights_only_whatever_the_caller_asks(tmp_path):
    bad = tmp_path / "pickle.ckpt"
    torch.save({"state_dict": {}, "payload": LightningModule}, bad)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        SafeCheckpointIO().load_checkpoint(bad, weights_only=False)


def test_every_torch_load_of_the_package_is_weights_only():
    """A scan of the source: no call of torch.load without ``weights_only=True``."""
    calls = []
    for path in [*(REPO / "diffusion_apps").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("torch.load"):
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                safe = isinstance(flag, ast.Constant) and flag.value is True
                calls.append((f"{path.name}:{node.lineno}", safe))
    assert len(calls) >= 3 and all(safe for _, safe in calls), calls
