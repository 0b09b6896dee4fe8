"""What every method module shares: AdamW with warm-up, the saved config, image logging."""

from __future__ import annotations

import functools
import inspect
import math
import typing

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from diffusion_apps.checkpoint import PARTS_KEY, load_part, part_configs
from diffusion_apps.images import grid
from diffusion_apps.lightning_internals import cli_hyperparameters
from diffusion_apps.methods.protocol import Autoencoding, Generates

LRSchedule = typing.Literal["constant", "cosine", "linear"]


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: LRSchedule) -> float:
    """η_s / η at optimizer step s: a linear warm-up min(1, (s + 1)/W), times the decay.

    The decay is 1 ("constant"), ½(1 + cos πu) ("cosine") or 1 − u ("linear"), with
    u = (s − W)/(S − W) clipped to [0, 1], S the run's number of steps: it would reach 0 at
    the step after the last.
    """
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    if schedule == "constant":
        return warm
    u = min(1.0, max(0.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1)))
    return warm * (0.5 * (1 + math.cos(math.pi * u)) if schedule == "cosine" else 1 - u)


class DiffusionMethod(Generates, L.LightningModule):
    """Base of the method modules: AdamW with warm-up and decay, and TensorBoard image grids.

    Subclasses call :meth:`save_config` first thing in ``__init__`` and implement
    ``training_step``. Their checkpoints hold the YAML config of every part (when built by the
    CLI) so a checkpoint alone rebuilds the module with ``weights_only=True``.

    Args:
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: steps of linear warm-up from 0 to ``lr`` (DDPM uses 5000 on CIFAR-10).
        adam_betas: AdamW (β1, β2).
        lr_schedule: after the warm-up, keep ``lr`` ("constant") or decay it towards 0 at the
            run's end ("cosine", "linear"; see :func:`lr_factor`), which the Trainer's
            ``max_steps`` (or ``max_epochs``) sets. Whether it pays depends on the run: on the
            demo digits, 1,400 steps with a cosine decay scored worse than a constant lr with
            EMA (README, the demo's recipe).
        compile: ``torch.compile`` the trainable networks (:meth:`networks`) when the
            Trainer configures the model. The first steps then take minutes; meant for long GPU
            runs (on our CPU it gained nothing: README, Performance).

    What a method offers is declared by ``generation`` (with ``generate``, answering
    :meth:`~diffusion_apps.methods.protocol.Generates.sample`) and ``autoencoding``
    (:mod:`diffusion_apps.methods.protocol`); a base module offers neither.
    """

    autoencoding: Autoencoding | None = None

    def __init__(
        self,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        compile: bool = False,
        lr_schedule: LRSchedule = "constant",
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if lr_schedule not in typing.get_args(LRSchedule):
            raise ValueError(
                f"lr_schedule must be one of {typing.get_args(LRSchedule)}, got {lr_schedule!r}"
            )
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.lr_schedule = lr_schedule
        self.adam_betas = tuple(adam_betas)
        self.compile_networks = compile
        self._parts: dict[str, L.LightningModule] = {}

    def load_part(self, path: str, expected: type[L.LightningModule] = L.LightningModule):
        """The trained module at checkpoint ``path`` this one builds on (an autoencoder, a
        diffusion model), frozen. Its config is saved in this module's checkpoints, so they load
        without ``path`` (see :func:`diffusion_apps.checkpoint.load_part`)."""
        part = load_part(path, expected).requires_grad_(False).eval()
        self._parts[str(path)] = part
        return part

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._parts:
            checkpoint[PARTS_KEY] = part_configs(self._parts)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resume at the configured ``lr``, not the checkpoint's lr₀.

        Lightning restores the optimizer and scheduler states after this hook, their lr with
        them. Every param group is built at ``lr``, so for each lr₀ ≠ ``lr``:
        initial_lr, base_lrs ← lr;  lr_now ← lr · lr_now / lr₀ (the warm-up fraction is kept).
        A checkpoint trained at ``lr`` is left as is: its resume stays exact.
        """
        trained = set()
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                base = group.get("initial_lr", group["lr"])  # no scheduler: lr is the base
                if base != self.lr:
                    trained.add(base)
                    group["lr"] = self.lr * (group["lr"] / base)  # exactly lr once warmed up
                    if "initial_lr" in group:
                        group["initial_lr"] = self.lr
        for state in checkpoint.get("lr_schedulers", []):
            bases, last = state.get("base_lrs", []), state.get("_last_lr")
            for i, base in enumerate(bases):
                if base != self.lr:
                    trained.add(base)
                    bases[i] = self.lr
                    if last is not None:  # get_last_lr() until the next step
                        last[i] = self.lr * (last[i] / base)
        if trained:
            old = ", ".join(str(lr) for lr in sorted(trained))
            rank_zero_info(f"resuming with lr {self.lr} (the checkpoint trained at {old})")

    def save_config(self) -> None:
        """Save the constructor arguments as hyper-parameters, never as pickled modules.

        Under the CLI they are the parsed YAML (class paths and init args of every part); a module
        built in Python keeps only its plain arguments, and nn.Module arguments are dropped.
        """
        frame = inspect.currentframe().f_back
        # A subclass's __init__ calls its parent's: save the outermost one's arguments.
        while (outer := frame.f_back) is not None and (
            outer.f_code.co_name == "__init__" and outer.f_locals.get("self") is self
        ):
            frame = outer
        from_cli = cli_hyperparameters() is not None
        modules = [k for k, v in frame.f_locals.items() if isinstance(v, nn.Module) and k != "self"]
        self.save_hyperparameters(ignore=None if from_cli else modules, frame=frame, logger=False)

    def train(self, mode: bool = True):
        """Train mode, except for frozen children (every parameter without gradient: a loaded
        part, PDAE's DDPM), which stay in eval mode: their dropout and the like stay off."""
        super().train(mode)
        for child in self.children():
            params = list(child.parameters())
            if params and not any(p.requires_grad for p in params):
                child.eval()
        return self

    def networks(self) -> list[nn.Module]:
        """The trainable networks: the child modules with parameters that require gradients."""
        return [m for m in self.children() if any(p.requires_grad for p in m.parameters())]

    def configure_model(self) -> None:
        """Compile the networks in place (state-dict keys unchanged) if ``compile`` is set."""
        if self.compile_networks:
            for net in self.networks():
                if getattr(net, "_compiled_call_impl", None) is None:
                    net.compile()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=self.lr, weight_decay=self.weight_decay, betas=self.adam_betas
        )
        total = self.trainer.estimated_stepping_batches if self.lr_schedule != "constant" else 0
        if math.isinf(total):
            raise ValueError(
                f"lr_schedule={self.lr_schedule!r} decays the lr towards 0 at the run's end: "
                "set trainer.max_steps (or max_epochs)"
            )
        schedule = functools.partial(
            lr_factor, warmup_steps=self.warmup_steps, total_steps=int(total),
            schedule=self.lr_schedule,
        )  # fmt: skip
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def log_images(self, tag: str, images: Tensor, nrow: int | None = None) -> None:
        """Log images in [-1, 1] as one grid, ``nrow`` a row, to TensorBoard (a no-op for other
        loggers)."""
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, grid(images, nrow), self.global_step)
