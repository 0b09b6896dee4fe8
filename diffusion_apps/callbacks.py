"""Training callbacks shared by every method."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging


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
