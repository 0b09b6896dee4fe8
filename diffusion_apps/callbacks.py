"""Training callbacks shared by every method."""

from __future__ import annotations

import random
import signal
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, WeightAveraging
from lightning.pytorch.utilities import rank_zero_warn

from diffusion_apps import stop
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
        self._validating = False  # the EMA weights are in the model (swapped in for validation)

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

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self._validating = True

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        self._validating = False

    def restore_training_weights(self, trainer, pl_module) -> None:
        """Put the training weights back in the model when a validation stopped with the EMA
        weights in it (a stop inside its sampling); else nothing. Before ``last`` is written."""
        if self._validating:
            self.on_validation_epoch_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.restore_training_weights(trainer, pl_module)


class NonFiniteLossError(RuntimeError):
    """Training met a NaN/Inf loss or gradient and stopped before it reached the weights."""


def grad_scaler_active(trainer) -> bool:
    """Whether fp16 mixed precision's GradScaler is scaling the loss (and checks the gradients)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler is not None and scaler.is_enabled()


class FiniteLoss(Callback):
    """Never train on a NaN/Inf loss or gradient. Every ``fit`` has it (``--finite_loss.action``).

    Checked before the optimiser step: the loss (before backward) and every gradient (one host
    sync per step). ``stop`` raises :class:`NonFiniteLossError` naming the step and the last
    checkpoint written, from which ``--ckpt_path`` resumes; the weights, the optimiser and the
    checkpoints are untouched by the bad step. ``skip`` drops the step's gradients instead (AdamW
    then leaves weights and moments as they are; the step still counts), logs
    ``train/skipped_steps`` and trains on. Under fp16 mixed precision a gradient overflow with a
    finite loss is the GradScaler's to answer (it skips that step and halves its scale), so
    only the loss is checked then.

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
        if bad is None and (finite_grads or grad_scaler_active(trainer)):
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
    """ModelCheckpoint that also writes ``last`` at the final step and when the run is stopped,
    and replaces a checkpoint of the same name instead of writing ``-v1`` beside it.

    Lightning's writes ``last`` only with a periodic save, so a run that ends by ``max_steps``
    or ``max_time`` between two of them leaves a stale ``last``, and ``--ckpt_path last``
    would go back in time. Written at the final ``on_train_batch_end``, before the EMA callback
    copies the averaged weights into the model at the end of training.

    Stopped (SIGTERM, Ctrl-C: :mod:`diffusion_apps.stop`; Lightning trains on to the end of the
    epoch on SIGTERM and saves nothing on Ctrl-C): after a training step, every rank stops
    there, ``last`` written, by raising :class:`~diffusion_apps.stop.StopRequested`; inside a
    validation (its sampling loops stop within a step), ``last`` is written in ``on_exception``
    with the training weights (the EMA callback's swapped back). Not written inside a training
    step's update (a second Ctrl-C: the weights may be half updated), nor inside a validation
    on several ranks (the others wait in a collective). :attr:`stopped` says what was written,
    for the CLI's message.

    Args:
        enable_version_counter: ModelCheckpoint's, off here: a rerun into the same version
            (``make demo`` twice) replaces ``last.ckpt`` and a same-step ``epoch=…`` file
            (written whole, then renamed) instead of piling up ``last-v1.ckpt``,
            ``…-v1.ckpt`` copies beside them, while ``sample`` would read the first run's.
        **kwargs: ModelCheckpoint's other arguments.
    """

    def __init__(self, enable_version_counter: bool = False, **kwargs) -> None:
        super().__init__(enable_version_counter=enable_version_counter, **kwargs)
        self.stopped: str | None = None  # "at step 37: saved runs/…/last.ckpt", after a stop
        self._training = self._updating = False

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._training = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._updating = True  # until the batch ends: the weights are being changed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._updating = False
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        signum = stop.requested() or (signal.SIGTERM if trainer.received_sigterm else None)
        signalled = trainer.strategy.reduce_boolean_decision(signum is not None, all=False)
        if signalled:  # any rank
            trainer.should_stop = True
        last_epoch = trainer.max_epochs not in (None, -1) and (
            trainer.current_epoch + 1 >= trainer.max_epochs
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        )
        final = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step or last_epoch
        saved = trainer.fast_dev_run or last_saved_step(self) == trainer.global_step
        if final and self.save_last and not saved:
            save_last_checkpoint(self, trainer)
        if signalled:
            raise stop.StopRequested(signum or signal.SIGTERM)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.fast_dev_run:  # Lightning's writes `last` here even then (2.6)
            super().on_train_end(trainer, pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, *args) -> None:
        stop.check()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        for callback in trainer.callbacks:  # the training weights, before anything is saved
            if isinstance(callback, EMA):
                callback.restore_training_weights(trainer, pl_module)
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, stop.StopRequested | KeyboardInterrupt) or stop.requested():
            self.stopped = self._save_on_stop(trainer)

    def _save_on_stop(self, trainer) -> str:
        """Write ``last`` where the run stopped, if it can; what was written."""
        step = trainer.global_step
        if not self._training:
            return "before training started: nothing new to save"
        newest = self.last_model_path or self.best_model_path
        newest = f"the newest checkpoint is {newest}" if newest else "no checkpoint written"
        if self._updating:
            return f"inside the update of step {step + 1}: not saved, {newest}"
        if trainer.fast_dev_run or not self.save_last:
            return f"at step {step}: not saved (fast_dev_run or save_last off), {newest}"
        if last_saved_step(self) != step:
            if trainer.world_size > 1:
                return f"at step {step}, inside validation on {trainer.world_size} ranks: {newest}"
            save_last_checkpoint(self, trainer)
        return f"at step {step}: saved {self.last_model_path}"
