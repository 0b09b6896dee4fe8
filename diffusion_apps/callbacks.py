"""Training callbacks shared by every method."""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, WeightAveraging
from lightning.pytorch.utilities import rank_zero_warn

from diffusion_apps.distributed import gather
from diffusion_apps.lightning_internals import last_saved_step, save_last_checkpoint


class EMA(WeightAveraging):
    """Exponential moving average of the weights, used for validation, sampling and checkpoints.

    θ_ema ← d_n·θ_ema + (1 − d_n)·θ after each optimizer step, with the warm-up
    d_n = min(decay, (1 + n)/(10 + n)) of guided-diffusion/diffusers (n = updates so far), so
    short runs are not dominated by the random initialisation (0.9999 needs ~10⁴ steps).
    Built on Lightning's WeightAveraging: validation swaps the EMA weights in, and a checkpoint's
    ``state_dict`` holds the EMA weights (the raw ones go to ``current_model_state``).

    Args:
        decay: the final decay d (DDPM/DiffAE use 0.9999).
        warmup: use the warm-up above; False gives a constant d.
        update_every_n_steps: update the average every this many optimizer steps.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, update_every_n_steps: int = 1):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps must be >= 1, got {update_every_n_steps}")
        # Buffers (normalisation statistics and the like) are state, not weights: they are
        # copied from the live model at every update instead of averaged.
        super().__init__(use_buffers=False, multi_avg_fn=self._update)
        self.decay, self.warmup, self.update_every_n_steps = decay, warmup, update_every_n_steps

    def decay_at(self, num_updates: int) -> float:
        """d_n for the n-th update."""
        return (
            min(self.decay, (1 + num_updates) / (10 + num_updates)) if self.warmup else self.decay
        )

    def _update(self, averaged: list, current: list, num_averaged: torch.Tensor) -> None:
        weight = 1.0 - self.decay_at(int(num_averaged))
        # The average is made before bf16-true/16-true casts the model, and stays float32.
        current = [c.to(a.dtype) for a, c in zip(averaged, current, strict=True)]
        torch._foreach_lerp_(averaged, current, weight)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.update_every_n_steps == 0


class NonFiniteLossError(RuntimeError):
    """Training met a NaN/Inf loss or gradient and stopped before it reached the weights."""


class FiniteLoss(Callback):
    """Never train on a NaN/Inf loss or gradient. Every ``fit`` has it (``--finite_loss.action``).

    Checked before the optimiser step: the loss (before backward) and every gradient (one host
    sync per step). ``stop`` raises :class:`NonFiniteLossError` naming the step and the last
    checkpoint written, from which ``--ckpt_path`` resumes; the weights, the optimiser and the
    checkpoints are untouched by the bad step. ``skip`` drops the step's gradients instead (AdamW
    then leaves weights and moments as they are; the step still counts), logs
    ``train/skipped_steps`` and trains on.

    Args:
        action: "stop" or "skip".
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop") -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"finite_loss.action must be 'stop' or 'skip', got {action!r}")
        self.action, self.skipped, self._bad_loss = action, 0, None

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss).all()):
            self._bad_loss = float(loss.detach().float().mean())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite_grads = not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())
        bad, self._bad_loss = self._bad_loss, None
        if bad is None and finite_grads:
            return
        what = f"loss {bad}" if bad is not None else "a gradient with NaN/Inf"
        if self.action == "stop":
            last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none yet"
            raise NonFiniteLossError(
                f"{what} at step {trainer.global_step} (epoch {trainer.current_epoch}): training "
                f"stopped before it reached the weights. Last checkpoint: {last} (resume with "
                "--ckpt_path). Lower the learning rate, check the data, or pass "
                "--finite_loss.action skip to skip such steps."
            )
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        pl_module.log("train/skipped_steps", float(self.skipped))

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def random_state(device: torch.device) -> dict:
    """The torch (CPU and ``device``), numpy and python random states, as tensors, numbers and
    tuples, which ``torch.load(weights_only=True)`` reads."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": (torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def set_random_state(state: dict, device: torch.device) -> None:
    """Inverse of :func:`random_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


class RandomState(Callback):
    """A resumed run draws the random numbers the uninterrupted run would have. In every ``fit``.

    Each checkpoint holds every rank's random state (:func:`random_state`); a resumed run sets
    them when training starts, after the sanity check. Validation (and the sanity check) run on
    the training state and put it back when done, so a resume is exact whether or not it skips
    the validation that ran when the checkpoint was written. Resuming on another number of
    ranks gives every rank the state of rank 0 (with a warning): no longer exact.
    """

    def __init__(self) -> None:
        self._trainer = None
        self._outside_validation: dict | None = None  # the training state, during validation
        self._to_restore: list[dict] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict:
        trainer = self._trainer
        if trainer is None:
            return {}
        state = self._outside_validation or random_state(trainer.strategy.root_device)
        # Every rank builds the checkpoint dict (a collective is safe), rank 0 saves it.
        return {"ranks": gather(state, trainer.world_size)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_restore = state_dict.get("ranks")

    def on_train_start(self, trainer, pl_module) -> None:
        ranks, self._to_restore = self._to_restore, None
        if not ranks:
            return
        if len(ranks) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the random state of {len(ranks)} rank(s), this run has "
                f"{trainer.world_size}: every rank resumes with rank 0's, not exactly"
            )
        mine = ranks[trainer.global_rank] if len(ranks) == trainer.world_size else ranks[0]
        set_random_state(mine, trainer.strategy.root_device)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._outside_validation = random_state(trainer.strategy.root_device)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._outside_validation is not None:
            set_random_state(self._outside_validation, trainer.strategy.root_device)
            self._outside_validation = None


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes ``last`` at the final step, and on SIGTERM.

    Lightning's writes ``last`` only with a periodic save, so a run that ends by ``max_steps``
    or ``max_time`` between two of them leaves a stale ``last``, and ``--ckpt_path last``
    would go back in time. On SIGTERM (a preempted job), Lightning trains on to the end of the
    epoch and exits without saving; here the run stops after the current step, with ``last``
    written. Written at the final ``on_train_batch_end``, before the EMA callback copies the
    averaged weights into the model at the end of training.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        signalled = trainer.received_sigterm
        if trainer.strategy.reduce_boolean_decision(signalled, all=False):  # any rank
            trainer.should_stop = True
        last_epoch = trainer.max_epochs not in (None, -1) and (
            trainer.current_epoch + 1 >= trainer.max_epochs
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        )
        final = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step or last_epoch
        if final and self.save_last and last_saved_step(self) != trainer.global_step:
            save_last_checkpoint(self, trainer)
