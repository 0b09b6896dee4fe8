"""Faults in training: a NaN/Inf loss stops the run with a message naming the step and the last
checkpoint (nothing trained on it), or skips the step when configured."""

import lightning as L
import pytest
import torch

from diffusion_apps.callbacks import FiniteLoss
from diffusion_apps.checkpoint import read_checkpoint
from diffusion_apps.cli import main
from tests.conftest import CONFIGS

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
    ckpt = read_checkpoint(in_tmp / CKPT_DIR / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )


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
