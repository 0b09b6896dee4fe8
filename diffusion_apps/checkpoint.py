"""Write checkpoints atomically; load them safely (``weights_only=True``) and rebuild the module
that wrote them."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TypeVar

import torch
from lightning import LightningModule
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.overrides import TorchFunctionMode

M = TypeVar("M", bound=LightningModule)
PARTS_KEY = "part_configs"  # {path: hyper_parameters} of the parts a module loaded by path
_parts: ContextVar[dict[str, dict] | None] = ContextVar("parts", default=None)
# What a checkpoint's config may name: our classes, and the instantiator Lightning records.
TRUSTED_ROOTS = ("diffusion_apps",)
TRUSTED_PATHS = frozenset({"lightning.pytorch.cli.instantiate_module"})
TRUST_ENV = "DIFFUSION_APPS_TRUSTED_MODULES"  # comma-separated roots of the user's own methods
DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
# Parameters and buffers a checkpoint's config may build, over the tensors its file holds.
SIZE_FACTOR, SIZE_SLACK = 2, 10_000_000


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of the wrong kind."""


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reader and writer, made safe; the CLI uses it in every run.

    Reads with ``weights_only=True`` whatever the environment says (``--ckpt_path`` restores
    tensors, numbers and strings, never arbitrary pickled objects).

    Writes to a hidden temporary file beside the target, syncs it to disk and renames it over
    the target: a run killed at any moment leaves the old checkpoint or the new one, never part
    of one. Lightning's own writer goes through the system temporary directory and then moves
    the file, which is a copy (not atomic) when that directory is on another file system than
    the run, as with /tmp against a network or scratch disk. URLs (``s3://`` ...) are left to it.
    """

    def load_checkpoint(self, path, map_location=lambda storage, _: storage, weights_only=None):
        return super().load_checkpoint(path, map_location, weights_only=True)

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.partial"):  # left by a killed run
            stale.unlink(missing_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def read_tensors(path: str | Path, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file.
    ``mmap``: memory-map the file's tensors instead of reading them into RAM (a file in torch's
    zip format; an older one is read whole)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated, corrupt, or it holds objects that "
            f"weights_only=True refuses ({first_line(err)})"
        ) from None


def first_line(err: BaseException) -> str:
    """``"Type: first line of the message"``, or the type alone for an empty message (torch's
    EOFError on a 0-byte file)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def read_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint at ``path``, read by :func:`read_tensors`."""
    ckpt = read_tensors(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def check_resumable(path: str | Path, module: LightningModule) -> None:
    """That ``--ckpt_path`` can restore ``module``: the file reads with ``weights_only=True``,
    holds the same method, and every tensor has the module's name and shape. Else a
    CheckpointError that names the difference, before anything runs or is written."""
    ckpt = read_checkpoint(path)
    name = type(module).__name__
    saved = (ckpt.get("hyper_parameters") or {}).get("_class_path", "").rpartition(".")[2]
    if saved and saved != name:
        raise CheckpointError(
            f"{path} holds a {saved} checkpoint, but this run's model is a {name}"
        )
    own, theirs = module.state_dict(), ckpt["state_dict"]
    problems = [f"{k} missing from the file" for k in own.keys() - theirs.keys()]
    problems += [f"{k} not in the model" for k in theirs.keys() - own.keys()]
    problems += [
        f"{k} is {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
        for k, v in theirs.items()
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        shown = "; ".join(sorted(problems)[:4]) + (" …" if len(problems) > 4 else "")
        raise CheckpointError(
            f"{path} does not fit this run's {name} ({len(problems)} tensors differ: {shown}): "
            "use the config of the run that wrote it"
        )


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available (under torchrun the GPU of ``LOCAL_RANK``), else the CPU;
    otherwise ``torch.device(device)``, which must exist here (a ValueError says why not)."""
    if device == "auto":
        cuda = torch.cuda.is_available()
        return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from None
    available = {
        "cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()
    }.get(resolved.type, False)  # fmt: skip
    if resolved.type == "cuda" and available and resolved.index is not None:
        available = resolved.index < torch.cuda.device_count()
    if not available:
        raise ValueError(
            f"--device {device!r}: no such device on this machine (CUDA available: "
            f"{torch.cuda.is_available()}, {torch.cuda.device_count()} GPUs); use auto or cpu"
        )
    return resolved


def trusted(path: str) -> bool:
    """Whether a checkpoint may name ``path``: under ``diffusion_apps`` or a root listed in
    ``$DIFFUSION_APPS_TRUSTED_MODULES``, or Lightning's instantiator."""
    extra = tuple(r.strip() for r in os.environ.get(TRUST_ENV, "").split(",") if r.strip())
    return path in TRUSTED_PATHS or path.split(".")[0] in TRUSTED_ROOTS + extra


def untrusted_error(path: str, where: str) -> CheckpointError:
    return CheckpointError(
        f"{where} names {path!r}, which is not a class of diffusion_apps: refused before "
        f"importing anything (a checkpoint's config could run any installed module's code). "
        f"If you trust this file and {path.split('.')[0]!r} holds your own method, set "
        f"{TRUST_ENV}={path.split('.')[0]}"
    )


def check_class_paths(config, where: str) -> None:
    """Refuse a saved config that names code outside the trusted roots (:func:`trusted`), before
    anything is imported: every ``class_path`` / ``_class_path`` / ``_instantiator`` value, and
    any other dotted name of an importable module (jsonargparse imports a string given for a
    class-typed argument)."""
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                named = key in ("class_path", "_class_path", "_instantiator")
                if named and isinstance(value, str) and not trusted(value):
                    raise untrusted_error(value, where)
                stack.append(value)
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, str) and DOTTED.fullmatch(item) and not trusted(item):
            root = item.split(".")[0]
            if importlib.util.find_spec(root) is not None:  # finding a module runs nothing
                raise untrusted_error(item, where)


def import_class(class_path: str, where: str = "the checkpoint") -> type:
    """The class named by a dotted path, e.g. ``"diffusion_apps.methods.DDPM"``; a path outside
    the trusted roots (:func:`trusted`) is refused before its module is imported."""
    if not trusted(class_path):
        raise untrusted_error(class_path, where)
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn})


def _requested(args: tuple) -> tuple[int, ...]:
    """The shape a factory call (``torch.empty(2, 3)`` or ``torch.empty((2, 3))``) asks for."""
    size = args[0] if args and isinstance(args[0], tuple | list | torch.Size) else args
    return tuple(int(n) for n in size if isinstance(n, int))


class _FactoryLimit(TorchFunctionMode):
    """Refuses a tensor factory call larger than ``limit`` elements before it allocates."""

    def __init__(self, limit: int, refuse) -> None:
        super().__init__()
        self.limit, self.refuse = limit, refuse

    def __torch_function__(self, func, types, args=(), kwargs=None):
        shape = _requested(args) if func in FACTORIES else ()
        if math.prod(shape) > self.limit:
            self.refuse(math.prod(shape), "a new tensor", shape)
        return func(*args, **(kwargs or {}))


@contextmanager
def size_limit(state: dict, where: str) -> Iterator[None]:
    """Refuse, while a module is built from a checkpoint's config, a model far larger than the
    file's weights: more parameter and buffer elements in all than ``SIZE_FACTOR`` × the file's
    tensors + ``SIZE_SLACK`` (schedule tables, frozen helpers), or one tensor factory call above
    that, which stops before the allocation."""
    from torch.nn.modules import module as nn_module

    stored = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    limit, built = SIZE_FACTOR * stored + SIZE_SLACK, 0

    def refuse(asked: int, name: str, shape: tuple) -> None:
        raise CheckpointError(
            f"{where}: its config asks for {asked:,} or more parameter elements (at {name}, "
            f"{shape}), but the file holds {stored:,} weights: refused before allocating"
        )

    def count(module, name, tensor):
        nonlocal built
        built += 0 if tensor is None else tensor.numel()
        if built > limit:
            refuse(built, f"a {type(module).__name__}'s {name}", tuple(tensor.shape))

    hooks = [
        nn_module.register_module_parameter_registration_hook(count),
        nn_module.register_module_buffer_registration_hook(count),
    ]
    try:
        with _FactoryLimit(limit, refuse):
            yield
    finally:
        for hook in hooks:
            hook.remove()


def check_finite(state: dict, where: str) -> None:
    """Refuse weights holding NaN or ±Inf (they sample black images), naming the first tensor."""
    for key, value in state.items():
        floating = isinstance(value, torch.Tensor) and value.is_floating_point()
        if floating and not torch.isfinite(value).all():
            bad = (~torch.isfinite(value)).sum().item()
            raise CheckpointError(
                f"{where}: weight {key!r} {tuple(value.shape)} holds {bad} NaN/Inf values"
            )


def _build(hparams: dict, expected: type[M], what: str, parts: dict | None) -> M:
    """The module a saved config (``hyper_parameters`` with ``_class_path``) describes, built
    while ``parts`` (``PARTS_KEY`` of its checkpoint) are what :func:`load_part` finds."""
    from lightning.pytorch.cli import instantiate_module

    from diffusion_apps.lightning_internals import given_hyperparameters

    check_class_paths(hparams, what)
    hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
    cls = import_class(hparams["_class_path"], what)
    if not issubclass(cls, expected):
        raise CheckpointError(
            f"{what} holds a {cls.__name__} checkpoint, but a {expected.__name__} is expected"
        )
    token = _parts.set(parts)
    try:  # the module saves this config as its hyper-parameters, as under the CLI
        with given_hyperparameters(hparams):
            return instantiate_module(cls, hparams)
    except ValueError as err:  # jsonargparse wraps a CheckpointError raised while building
        cause = err
        while cause is not None and not isinstance(cause, CheckpointError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None
    finally:
        _parts.reset(token)


def build_module(hparams: dict, expected: type[M] = LightningModule) -> M:
    """The module a config describes (``_class_path`` and its init args, as a checkpoint's
    ``hyper_parameters`` hold it), built as the CLI builds it, so it saves that config."""
    return _build(hparams, expected, "the config", None)


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
    ckpt = read_checkpoint(path)
    hparams = ckpt.get("hyper_parameters") or {}
    if "_class_path" not in hparams:
        raise CheckpointError(
            f"{path} holds no model config: it was not written by `python -m diffusion_apps fit`"
        )
    check_finite(ckpt["state_dict"], str(path))
    with size_limit(ckpt["state_dict"], str(path)):
        module = _build(hparams, expected, str(path), dict(ckpt.get(PARTS_KEY) or {}))
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"weights in {path} do not fit the {type(module).__name__} its config builds:\n{err}"
        ) from None
    return module.eval()


def load_part(path: str | Path, expected: type[M] = LightningModule) -> M:
    """A trained module another one builds on, named by its checkpoint path (LatentDDIM's
    autoencoder, a guided sampler's diffusion model…).

    While :func:`load_module` rebuilds a module whose checkpoint saved this part's config under
    ``PARTS_KEY`` (see :func:`part_configs`), the part is built from that config and gets its
    weights from the enclosing state dict: such a checkpoint stands alone, whatever became of
    the file at ``path``. Otherwise the part is :func:`load_module` of ``path``.
    """
    hparams = (_parts.get() or {}).get(str(path))
    if hparams is None or "_class_path" not in hparams:
        return load_module(path, expected)
    return _build(hparams, expected, f"the part saved for {path}", _parts.get()).eval()


def part_configs(parts: dict[str, LightningModule]) -> dict[str, dict]:
    """``{path: hyper_parameters}`` of parts loaded with :func:`load_part` and of the parts they
    load in turn (a latent DDIM's PDAE's DDPM), for a checkpoint's ``PARTS_KEY`` (in
    ``on_save_checkpoint``); a part built in Python (no saved class path) is left to its file."""
    configs: dict[str, dict] = {}
    for path, part in parts.items():
        configs.update(part_configs(getattr(part, "_parts", {})))
        if "_class_path" in part.hparams:
            configs[str(path)] = dict(part.hparams)
    return configs
