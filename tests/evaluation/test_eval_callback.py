"""SampleQuality in tiny fits through the CLI: what it logs, that it samples with the EMA weights
whatever the callback order, and that under DDP the ranks' samples add up to one metric."""

import json
import os
import subprocess
import sys

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_apps.checkpoint import load_module, read_checkpoint
from diffusion_apps.cli import DiffusionCLI
from diffusion_apps.distributed import rank_share
from diffusion_apps.evaluation.callback import SampleQuality
from tests.conftest import CONFIGS

TINY = str(CONFIGS / "tiny" / "ddpm.yaml")
QUALITY = "diffusion_apps.evaluation.callback.SampleQuality"


def callbacks_config(path, quality_first, **quality_args):
    """A config whose trainer.callbacks replace the tiny config's, with SampleQuality first or
    last (JSON is YAML)."""
    quality = {"class_path": QUALITY, "init_args": quality_args}
    ema = {"class_path": "diffusion_apps.callbacks.EMA", "init_args": {"decay": 0.9}}
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {}}
    ckpt["init_args"]["save_last"] = True
    callbacks = [quality, ema, ckpt] if quality_first else [ema, quality, ckpt]
    path.write_text(json.dumps({"trainer": {"callbacks": callbacks}}))
    return str(path)


def scalars(run_dir):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = events.Tags()
    return {tag: events.Scalars(tag) for tag in tags["scalars"]}, tags["images"], tags


@pytest.mark.parametrize("quality_first", [True, False], ids=["before-ema", "after-ema"])
def test_logs_metrics_of_the_ema_weights(in_tmp, quality_first):
    config = callbacks_config(in_tmp / "cb.json", quality_first, num_samples=8, steps=2)
    cli = DiffusionCLI(
        args=["fit", "--config", TINY, "--config", config, "--trainer.max_steps", "2"]
    )
    metrics = cli.trainer.callback_metrics
    for key in ("fd_digits", "kid_digits", "precision_digits", "recall_digits", "confidence"):
        assert torch.isfinite(metrics[f"quality/{key}@8"]), key
    assert metrics["quality/n_fake"] == 8 and metrics["quality/n_real"] == 4500

    # One validation (the sanity check does not count), saved to TensorBoard beside val/loss.
    logged, images, tags = scalars(in_tmp / "runs/tiny_ddpm/version_0")
    steps = [e.step for e in logged["val/loss"]]
    assert [(e.step, e.value) for e in logged["quality/n_fake"]] == [(steps[0], 8.0)]
    assert "quality/fd_digits@8" in logged and "quality/samples" in images
    assert "quality/protocol/text_summary" in tags["tensors"]

    # The checkpoint saved after that validation holds the EMA weights (state_dict) and the raw
    # ones (current_model_state): the callback's samples are the EMA model's.
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SampleQuality)]
    ckpt = in_tmp / "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"
    model = load_module(ckpt)

    def draw():
        return model.sample(8, steps=2, generator=torch.Generator().manual_seed(0))

    torch.testing.assert_close(callback.last_samples, draw())
    model.load_state_dict(read_checkpoint(ckpt)["current_model_state"])
    assert not torch.allclose(callback.last_samples, draw(), atol=1e-3)


def test_fast_dev_run(in_tmp):
    quality = {"class_path": QUALITY, "init_args": {"num_samples": 4, "steps": 1}}
    cli = DiffusionCLI(
        args=[
            "fit",
            "--config",
            TINY,
            "--trainer.fast_dev_run",
            "true",
            f"--trainer.callbacks+={json.dumps(quality)}",
        ]
    )
    assert cli.trainer.callback_metrics["quality/n_fake"] == 4
    assert "quality/fd_digits@4" in cli.trainer.callback_metrics


def test_skips_modules_without_sample(caplog):
    trainer = Trainer(
        fast_dev_run=2,
        callbacks=[SampleQuality(num_samples=4)],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with caplog.at_level("INFO"):
        trainer.fit(BoringModel())
    assert not [k for k in trainer.callback_metrics if k.startswith("quality/")]
    assert caplog.text.count("does not sample unconditionally") == 1


@pytest.mark.parametrize("kwargs", [{"num_samples": 3}, {"every_n_val_epochs": 0}, {"steps": 0}])
def test_bad_options_are_named(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SampleQuality(**kwargs)


def test_rank_shares_add_up():
    for n, world in [(7, 2), (1000, 3), (4, 4)]:
        shares = [rank_share(n, r, world) for r in range(world)]
        assert sum(shares) == n and max(shares) - min(shares) <= 1


def test_ddp_ranks_sample_their_share_and_sync(in_tmp):
    """2 CPU processes through a CLI subprocess (in-process DDP would re-run pytest in rank 1).

    7 samples: rank 0 draws 4, rank 1 draws 3; the logged n_fake is 7 only when the metric
    gathered both ranks' features. every_n_val_epochs=2 of the two validations: logged once."""
    config = callbacks_config(
        in_tmp / "cb.json",
        quality_first=False,
        num_samples=7,
        batch_size=2,
        steps=2,
        every_n_val_epochs=2,
    )
    command = [sys.executable, "-m", "diffusion_apps", "fit", "--config", TINY, "--config", config]
    command += ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    command += ["--trainer.accelerator", "cpu", "--trainer.max_steps", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=in_tmp, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    logged, images, _ = scalars(in_tmp / "runs/tiny_ddpm/version_0")
    second_validation = [e.step for e in logged["val/loss"]][1]
    assert [(e.step, e.value) for e in logged["quality/n_fake"]] == [(second_validation, 7.0)]
    assert len(logged["quality/fd_digits@7"]) == 1 and "quality/samples" in images
