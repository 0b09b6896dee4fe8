"""The one place the package touches Lightning's private names, each where no public API does it.

One small adapter per use. Importing this module never fails; an adapter whose private name is
gone raises :class:`LightningChanged`, naming the Lightning version, instead of silently doing
nothing. ``tests/test_lightning_internals.py`` fails when Lightning changes one of them, and
scans the package so that no other module uses a Lightning private name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_CLI_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


class LightningChanged(RuntimeError):
    """A private Lightning name this package relies on is gone or no longer works as it did."""


def _private(owner: Any, name: str, use: str, where: str | None = None) -> Any:
    """``owner.name``, or :class:`LightningChanged` saying what needed it."""
    try:
        return getattr(owner, name)
    except AttributeError:
        import lightning

        where = where or getattr(owner, "__name__", type(owner).__name__)
        raise LightningChanged(
            f"Lightning {lightning.__version__} has no {where}.{name}, which diffusion_apps uses "
            f"to {use}: see diffusion_apps/lightning_internals.py (written for Lightning 2.5-2.6)"
        ) from None


def _hparams_mixin():
    from lightning.pytorch.core.mixins import hparams_mixin

    return hparams_mixin


def cli_hyperparameters() -> dict | None:
    """The hyper-parameters the CLI is building a module with (the parsed YAML of its
    ``class_path`` and ``init_args``), or None when the module is built in Python.

    Relies on ``lightning.pytorch.core.mixins.hparams_mixin._given_hyperparameters``, the context
    variable the CLI sets around the constructor. Nothing public says that the CLI is
    instantiating: the only trace is the ``_instantiator`` key that ``save_hyperparameters``
    puts in ``hparams``, too late to choose what to ignore (and after its nn.Module warning).
    """
    given = _private(_hparams_mixin(), "_given_hyperparameters", "know the CLI builds a module")
    return given.get()


@contextmanager
def given_hyperparameters(hparams: dict, instantiator: str = _CLI_INSTANTIATOR) -> Iterator[None]:
    """Build modules in this context as the CLI does: their ``save_hyperparameters`` saves
    ``hparams`` (a config saved in a checkpoint) instead of their arguments.

    Relies on ``hparams_mixin._given_hyperparameters_context``. The public
    ``lightning.pytorch.cli.instantiate_module`` builds a module from such a config but leaves
    its hyper-parameters to its own arguments, which drops the class paths of its parts.
    """
    context = _private(
        _hparams_mixin(), "_given_hyperparameters_context", "rebuild a module from its config"
    )
    with context(hparams, instantiator):
        yield


def last_saved_step(checkpoint_cb) -> int:
    """The global step of ``checkpoint_cb``'s latest save (of any checkpoint, ``last`` included).

    Relies on ``ModelCheckpoint._last_global_step_saved``: nothing public tells the step; the
    public ``last_model_path`` names the file, not when it was written.
    """
    return _private(checkpoint_cb, "_last_global_step_saved", "know when `last` was written")


def save_last_checkpoint(checkpoint_cb, trainer) -> None:
    """Write ``checkpoint_cb``'s ``last`` checkpoint now, with its name, version counter and
    ``save_last="link"`` handling (a no-op when ``save_last`` is off).

    Relies on ``ModelCheckpoint._save_last_checkpoint`` and ``_monitor_candidates`` (the metrics
    its file name is formatted with). ``trainer.save_checkpoint(path)`` is public but bypasses
    all of that, and would leave ``last_model_path`` pointing at the previous file.
    """
    candidates = _private(checkpoint_cb, "_monitor_candidates", "name the `last` checkpoint")
    save = _private(checkpoint_cb, "_save_last_checkpoint", "write `last` at the final step")
    save(trainer, candidates(trainer))


def find_unused_parameters(strategy) -> None:
    """Have ``strategy`` (a DDPStrategy, already built) wrap the model with
    ``DistributedDataParallel(find_unused_parameters=True)``; call before it wraps the model
    (a LightningModule's ``setup``).

    Relies on ``DDPStrategy._ddp_kwargs``, the keyword arguments it passes to
    DistributedDataParallel. The public ways, ``DDPStrategy(find_unused_parameters=True)`` or
    ``strategy="ddp_find_unused_parameters_true"``, are the user's choice when the Trainer is
    built; a module that needs it (two optimizers over different parameters) has no public way.
    """
    kwargs = _private(strategy, "_ddp_kwargs", "have DDP find unused parameters")
    if not isinstance(kwargs, dict):
        import lightning

        raise LightningChanged(
            f"Lightning {lightning.__version__}: {type(strategy).__name__}._ddp_kwargs is a "
            f"{type(kwargs).__name__}, not the dict diffusion_apps/lightning_internals.py expects"
        )
    kwargs["find_unused_parameters"] = True


class KeepConfiguredModel:
    """LightningCLI mixin: keep the model of the config when ``--ckpt_path`` is given.

    Lightning's CLI would rebuild the model from the hyper-parameters in ``--ckpt_path``,
    silently training another method than configured, or dropping a changed option (a lower
    ``lr`` to resume with). The subclass checks instead that the checkpoint fits the configured
    model (``DiffusionCLI._check_ckpt_path``).

    Relies on ``LightningCLI._parse_ckpt_path``, which ``LightningCLI.__init__`` calls after
    parsing; there is no public switch for it. Overridden as a no-op; ``instantiate_classes``
    raises :class:`LightningChanged` if Lightning did not call it (renamed or moved: the
    override would be dead and the checkpoint's hyper-parameters would win).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        use = "keep the configured model on --ckpt_path"
        _private(super(), "_parse_ckpt_path", use, where="LightningCLI")
        self._ckpt_path_hparams_skipped = False
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        self._ckpt_path_hparams_skipped = True

    def instantiate_classes(self) -> None:
        if not self._ckpt_path_hparams_skipped:
            import lightning

            raise LightningChanged(
                f"Lightning {lightning.__version__}'s LightningCLI no longer calls "
                "_parse_ckpt_path, which diffusion_apps overrides to keep the configured model "
                "on --ckpt_path: see diffusion_apps/lightning_internals.py"
            )
        super().instantiate_classes()
