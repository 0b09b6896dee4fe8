"""Load checkpoints safely (``weights_only=True``) and rebuild the module that wrote them."""

from __future__ import annotations

import importlib
import pickle
import zipfile
from pathlib import Path
from typing import TypeVar

import torch
from lightning import LightningModule

M = TypeVar("M", bound=LightningModule)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of the wrong kind."""


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated, corrupt, or it holds objects that "
            f"weights_only=True refuses ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def _import_class(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def load_module(path: str | Path, expected: type[M] = LightningModule) -> M:
    """Rebuild the LightningModule saved at ``path`` from the config inside it, with its weights.

    The checkpoint's ``hyper_parameters`` hold the YAML config the CLI parsed (class paths and
    init args of every part), so nothing but the file is needed. The weights are the EMA weights
    when the run used the EMA callback.

    Args:
        path: a ``.ckpt`` written by ``python -m diffusion_apps fit``.
        expected: the method class (or a base) the caller needs; another kind is an error.

    Returns:
        The module in eval mode on the CPU.
    """
    from lightning.pytorch.cli import instantiate_module

    ckpt = read_checkpoint(path)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    class_path = hparams.get("_class_path")
    if class_path is None:
        raise CheckpointError(
            f"{path} holds no model config: it was not written by `python -m diffusion_apps fit`"
        )
    cls = _import_class(class_path)
    if not issubclass(cls, expected):
        raise CheckpointError(
            f"{path} holds a {cls.__name__} checkpoint, but a {expected.__name__} is expected"
        )
    hparams.pop("_instantiator", None)
    module = instantiate_module(cls, hparams)
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"weights in {path} do not fit the {cls.__name__} its config builds:\n{err}"
        ) from None
    return module.eval()
