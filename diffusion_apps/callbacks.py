"""Training callbacks shared by every method."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging


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
