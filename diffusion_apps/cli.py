"""Command line: ``python -m diffusion_apps {fit,validate,test,predict,sample,eval,autoencode,
import,export}``.

fit/validate/test/predict are LightningCLI subcommands; the model and the data are chosen by
``class_path`` in the YAML config. The others are ours (:mod:`diffusion_apps.commands`):
``sample`` draws images from a checkpoint alone; ``eval`` scores every checkpoint under a run
directory and writes ``reports/eval.md``; ``autoencode`` draws an autoencoder's
reconstructions, interpolations, variations or manipulations; ``import`` turns another
codebase's released checkpoint into one of ours, ``export`` one of ours into a diffusers folder.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from diffusion_apps.commands import COMMANDS
from diffusion_apps.lightning_internals import KeepConfiguredModel

PACKAGE = Path(__file__).parent


class DiffusionCLI(KeepConfiguredModel, LightningCLI):
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

        from diffusion_apps.checkpoint import SafeCheckpointIO

        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the user chose
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer

    def before_instantiate_classes(self) -> None:
        from diffusion_apps import precision

        precision.configure(
            (self.config[self.subcommand] if self.subcommand else self.config).trainer
        )
        self._last = None  # the checkpoint `--ckpt_path last` stands for, when found
        if self.subcommand == "fit" and self.config.fit.ckpt_path == "last":
            self._last = continue_last_version(self.config.fit.trainer.logger)

    def _check_ckpt_path(self) -> None:
        """A checkpoint to resume from or evaluate must fit the model, or stop here, before
        Lightning loads it into the model (a traceback from deep inside torch)."""
        from diffusion_apps.checkpoint import check_resumable

        path = self.config[self.subcommand].ckpt_path
        if path == "last":
            path = self._last  # None in a first run: Lightning starts from scratch
        if path is None or path in ("best", "hpc") or "://" in str(path):
            return
        check_resumable(path, self.model)

    before_fit = before_validate = before_test = before_predict = _check_ckpt_path


def continue_last_version(logger) -> Path | None:
    """With ``--ckpt_path last``, log to the version directory whose ``checkpoints/last.ckpt``
    is newest, so the resumed run finds that checkpoint and goes on in the same TensorBoard run;
    returns that checkpoint.

    Lightning would open a new version directory, find no checkpoint there and train from
    scratch. Nothing changes when no checkpoint exists yet (a first run) or the logger's
    ``version`` is set, nor for a logger without ``save_dir``/``name``/``version``.
    """
    args = getattr(logger, "init_args", None)
    if args is None or not {"save_dir", "name", "version"} <= set(vars(args)):
        return None
    runs = Path(args.save_dir) / (args.name or "")
    version = args.version
    if version is not None:
        last = runs / (f"version_{version}" if isinstance(version, int) else version)
        last = last / "checkpoints/last.ckpt"
        return last if last.is_file() else None
    lasts = sorted(runs.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not lasts:
        return None
    args.version = lasts[-1].parents[1].name
    return lasts[-1]


def run_command(name: str, args: Sequence[str]) -> None:
    """One of :data:`~diffusion_apps.commands.COMMANDS`: a jsonargparse CLI of its typed
    function."""
    from jsonargparse import auto_cli

    auto_cli(COMMANDS[name], args=list(args), as_positional=False)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point; ``args`` replaces ``sys.argv[1:]`` (tests call ``main([...])`` in-process)."""
    given, args = args, list(sys.argv[1:] if args is None else args)
    from diffusion_apps.callbacks import NonFiniteLossError
    from diffusion_apps.checkpoint import CheckpointError

    try:
        if args and args[0] in COMMANDS:
            run_command(args[0], args[1:])
        else:
            DiffusionCLI(args=None if given is None else args)  # None: Lightning reads argv
    except (NonFiniteLossError, CheckpointError) as err:  # the message says it all
        sys.exit(f"error: {err}")
    except (ValueError, FileNotFoundError) as err:
        check = failed_check(err)
        if check is None:
            raise
        sys.exit(f"error: {check}")


def failed_check(err: BaseException) -> BaseException | None:
    """The error of one of this package's input checks behind ``err`` (itself, or what it was
    raised from, as when jsonargparse wraps a constructor's error): the innermost frame of its
    traceback is ours, and its message names the problem. None for anything else, which keeps
    its traceback."""
    while err is not None:
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        ours = tb is not None and Path(tb.tb_frame.f_code.co_filename).is_relative_to(PACKAGE)
        if ours and isinstance(err, ValueError | FileNotFoundError):
            return err
        err = err.__cause__ or err.__context__
    return None
