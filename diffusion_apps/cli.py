"""Command line: ``python -m diffusion_apps {fit,validate,test,predict,sample,eval,autoencode}``.

fit/validate/test/predict are LightningCLI subcommands; the model and the data are chosen by
``class_path`` in the YAML config. ``sample`` draws images from a checkpoint alone; ``eval``
scores every checkpoint under a run directory and writes ``reports/eval.md``; ``autoencode``
draws an autoencoder's reconstructions, interpolations, variations or manipulations.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class DiffusionCLI(LightningCLI):
    """LightningCLI whose subclass-mode model and data come from the YAML ``class_path``."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        from diffusion_apps.callbacks import FiniteLoss, RandomState

        parser.add_lightning_class_args(FiniteLoss, "finite_loss")  # in every run
        parser.add_lightning_class_args(RandomState, "random_state")

    def instantiate_trainer(self, **kwargs):
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        from diffusion_apps.checkpoint import AtomicCheckpointIO

        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the user chose
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit" and self.config.fit.ckpt_path == "last":
            continue_last_version(self.config.fit.trainer.logger)


def continue_last_version(logger) -> None:
    """With ``--ckpt_path last``, log to the version directory whose ``checkpoints/last.ckpt``
    is newest, so the resumed run finds that checkpoint and goes on in the same TensorBoard run.

    Lightning would open a new version directory, find no checkpoint there and train from
    scratch. Nothing changes when the logger's ``version`` is set or no checkpoint exists yet (a
    first run), nor for a logger without ``save_dir``/``name``/``version``.
    """
    args = getattr(logger, "init_args", None)
    if (
        args is None
        or not {"save_dir", "name", "version"} <= set(vars(args))
        or args.version is not None
    ):
        return
    runs = Path(args.save_dir) / (args.name or "")
    lasts = sorted(runs.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if lasts:
        args.version = lasts[-1].parents[1].name


def _function_cli(name: str, args: Sequence[str]) -> None:
    """``sample``, ``eval``, ``autoencode``: a jsonargparse CLI of the command's typed function."""
    from importlib import import_module

    from jsonargparse import auto_cli

    module, function = {
        "sample": ("diffusion_apps.sample", "sample"),
        "eval": ("diffusion_apps.evaluation.evaluate", "evaluate"),
        "autoencode": ("diffusion_apps.autoencode", "autoencode"),
    }[name]
    auto_cli(getattr(import_module(module), function), args=list(args), as_positional=False)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point; ``args`` replaces ``sys.argv[1:]`` (tests call ``main([...])`` in-process)."""
    args = list(sys.argv[1:] if args is None else args)
    from diffusion_apps.callbacks import NonFiniteLossError
    from diffusion_apps.checkpoint import CheckpointError

    try:
        if args and args[0] in ("sample", "eval", "autoencode"):
            _function_cli(args[0], args[1:])
        else:
            DiffusionCLI(args=args)
    except (NonFiniteLossError, CheckpointError) as err:  # the message says it all
        sys.exit(f"error: {err}")
