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

import errno
import re
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
        from diffusion_apps import stop

        self._command = list(sys.argv[1:] if args is None else args)
        self._lock = None  # the run folder's, while fit runs
        self._new_run_dir: Path | None = None  # made by this run: removed if it fails unsaved
        with stop.on_signals():  # SIGTERM, Ctrl-C: stop at the next step, `last` written
            try:
                super().__init__(
                    LightningModule,
                    LightningDataModule,
                    subclass_mode_model=True,
                    subclass_mode_data=True,
                    save_config_kwargs={"overwrite": True},
                    parser_kwargs={"exit_on_error": False},  # main() prints its error short
                    args=args,
                    run=run,
                )
            except Exception:
                self._remove_new_run_dir()
                raise
            except (SystemExit, KeyboardInterrupt):  # Lightning exits 1 on a KeyboardInterrupt
                signum = stop.requested()
                if signum is None:
                    raise
                trainer = getattr(self, "trainer", None)
                if trainer is None or trainer.is_global_zero:
                    print(self._stopped(signum), file=sys.stderr, flush=True)
                raise SystemExit(128 + signum) from None
            finally:
                if self._lock is not None:
                    self._lock.release()

    def _remove_new_run_dir(self) -> None:
        """After an error, the version folder this run made, unless a checkpoint was written
        in it: a failed run leaves nothing (the next run would otherwise be version_1)."""
        import shutil

        folder = self._new_run_dir
        if folder is not None and folder.is_dir() and not any(folder.rglob("*.ckpt")):
            shutil.rmtree(folder, ignore_errors=True)

    def _stopped(self, signum: int) -> str:
        """The line a stopped run ends with: what was saved, and the command that resumes."""
        import os
        import shlex

        from diffusion_apps.callbacks import Checkpoint
        from diffusion_apps.stop import signal_name

        name, subcommand = signal_name(signum), getattr(self, "subcommand", None)
        if subcommand != "fit":
            return f"stopped by {name}" + (f" during {subcommand}" if subcommand else "")
        callbacks = getattr(getattr(self, "trainer", None), "callbacks", [])
        what = "with nothing saved (no diffusion_apps.callbacks.Checkpoint)"
        for checkpoint in (c for c in callbacks if isinstance(c, Checkpoint)):
            what = checkpoint.stopped or "before training started: nothing new to save"
            break
        kept, args = [], iter(self._command)  # the command, its --ckpt_path replaced by `last`
        for arg in args:
            if arg == "--ckpt_path":
                next(args, None)
            elif not arg.startswith("--ckpt_path="):
                kept.append(arg)
        python = os.path.relpath(sys.executable)
        python = sys.executable if python.startswith("..") else python
        python = "torchrun …" if "TORCHELASTIC_RUN_ID" in os.environ else shlex.quote(python)
        command = shlex.join(["-m", "diffusion_apps", *kept, "--ckpt_path", "last"])
        return f"stopped by {name} {what}; resume with: {python} {command}"

    def subcommands(self) -> dict[str, set[str]]:
        """Lightning's subcommands, only the one being run where the command names it: each
        subcommand's parser introspects the whole Trainer (~0.3 s), and a run parses one."""
        every = LightningCLI.subcommands()
        named = self._command[0] if self._command else None
        return {named: every[named]} if named in every else every

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
            if self._last is not None:  # Lightning's `last` would be the newest last*.ckpt
                self.config.fit.ckpt_path = str(self._last.absolute())

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

    before_validate = before_test = before_predict = _check_ckpt_path

    def before_fit(self) -> None:
        """The checkpoint check; then one run at a time in a version folder
        (:mod:`diffusion_apps.run_lock`), taken by rank 0 before anything is written there."""
        from diffusion_apps.run_lock import lock_run

        self._check_ckpt_path()  # a run refused here leaves no version folder
        log_dir = self.trainer.log_dir  # a broadcast from rank 0: every rank must ask
        if self.trainer.is_global_zero and log_dir is not None:  # fast_dev_run: None
            if not Path(log_dir).exists():
                self._new_run_dir = Path(log_dir)
            self._lock = lock_run(log_dir)


def continue_last_version(logger) -> Path | None:
    """With ``--ckpt_path last``, the checkpoint to resume: the newest whole one of the version
    directory (the logger's ``version``, else the version whose newest checkpoint is newest, to
    which the logger is then set, so the resumed run goes on in the same TensorBoard run).

    Lightning would open a new version directory, find no checkpoint there and train from
    scratch. Newest by time of writing: ``last.ckpt``, unless a run killed while writing it
    left it one save behind an ``epoch=…`` file (said on stderr), from which Lightning's
    ``last`` would train the steps again and write an ``epoch=…-v1`` copy beside it.
    Unreadable files are skipped (said on stderr); none readable is a CheckpointError. None
    when no checkpoint exists yet (a first run), or for a logger without
    ``save_dir``/``name``/``version``.
    """
    from diffusion_apps.checkpoint import CheckpointError, read_tensors

    args = getattr(logger, "init_args", None)
    if args is None or not {"save_dir", "name", "version"} <= set(vars(args)):
        return None
    runs = Path(args.save_dir) / (args.name or "")
    version = args.version
    if version is not None:
        folders = [runs / (f"version_{version}" if isinstance(version, int) else version)]
    else:
        folders = list(runs.glob("version_*"))
    ckpts = [p for folder in folders for p in (folder / "checkpoints").glob("*.ckpt")]
    if not ckpts:
        return None
    newest = max(ckpts, key=lambda p: p.stat().st_mtime_ns)
    if version is None:
        args.version = newest.parents[1].name

    def step_of(path: Path) -> int | None:  # None: not a whole Lightning checkpoint
        try:
            ckpt = read_tensors(path, mmap=True)  # the tensors stay on disk
        except CheckpointError as err:
            print(f"--ckpt_path last: skipped {err}", file=sys.stderr)
            return None
        return ckpt.get("global_step") if isinstance(ckpt, dict) and "state_dict" in ckpt else None

    ckpts = sorted(newest.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for path in ckpts:
        step = step_of(path)
        if step is None:
            continue
        last = path.with_name("last.ckpt")
        if path != last:
            behind = f"{last.name} (step {step_of(last)})" if last.is_file() else "no last.ckpt"
            print(
                f"--ckpt_path last: {path} (step {step}) is newer than {behind}: resuming from it",
                file=sys.stderr,
            )
        return path
    raise CheckpointError(f"--ckpt_path last: no readable checkpoint in {newest.parent}")


# A full or read-only disk, a quota, a file where a folder should be: the machine, not a bug.
ENVIRONMENT_ERRORS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
    errno.ENOTDIR, errno.EISDIR,
})  # fmt: skip


LIGHTNING_COMMANDS = {
    "fit": "train a model from a config (--config configs/ddpm.yaml)",
    "validate": "the validation loop of a config and checkpoint",
    "test": "the test loop of a config and checkpoint",
    "predict": "one sample per predict item (prefer sample)",
}
ALL_COMMANDS = (*LIGHTNING_COMMANDS, *COMMANDS)
MAX_CONFIG_VALUES = 1_000_000  # a config's values once YAML aliases are expanded
NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", re.IGNORECASE)


def overview() -> str:
    """``python -m diffusion_apps --help``: every command, ours and Lightning's."""
    ours = {name: (fn.__doc__ or "").strip().splitlines()[0] for name, fn in COMMANDS.items()}
    ours = {name: text.replace("``", "") for name, text in ours.items()}
    lines = [f"usage: python -m diffusion_apps {{{','.join(ALL_COMMANDS)}}} ...", ""]
    lines += [f"  {name:<11} {text}" for name, text in {**LIGHTNING_COMMANDS, **ours}.items()]
    lines += ["", "python -m diffusion_apps <command> --help lists a command's options."]
    return "\n".join(lines)


def negative_values_joined(args: Sequence[str]) -> list[str]:
    """``--opt -1e-3`` as ``--opt=-1e-3``: argparse reads a value that starts with ``-`` as an
    option ("expected one argument"), and a negative number cannot be an option's name."""
    out: list[str] = []
    for arg in args:
        if NUMBER.fullmatch(arg) and out and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def list_options(function) -> dict[str, type]:
    """``--name`` → item type of each list-typed parameter of a command's ``function``."""
    import typing

    options = {}
    for name, hint in typing.get_type_hints(function).items():
        for option in (hint, *typing.get_args(hint)):  # list[X] or list[X] | None
            if typing.get_origin(option) is list:
                options[f"--{name}"] = typing.get_args(option)[0]
    return options


def list_values_joined(args: Sequence[str], options: dict[str, type]) -> list[str]:
    """``--images a.png b.jpg`` as ``--images=["a.png", "b.jpg"]`` (and ``--images DIR`` as a
    one-item list) for the list ``options``: argparse takes one value per option. A list
    written in brackets stays as it is; strings are JSON-quoted, so names with spaces, commas
    or colons survive the YAML parse of the value."""
    import json

    out: list[str] = []
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        i += 1
        if flag not in options:
            out.append(args[i - 1])
            continue
        values = [value] if eq else []
        while i < len(args) and not args[i].startswith("--"):
            values.append(args[i])
            i += 1
        if not values:
            out.append(flag)  # the parser says that a value is missing
        elif len(values) == 1 and values[0].lstrip().startswith("["):
            out.append(f"{flag}={values[0]}")
        elif options[flag] is str:
            out.append(f"{flag}={json.dumps(values)}")
        else:
            out.append(f"{flag}=[{', '.join(values)}]")
    return out


def config_files(args: Sequence[str]) -> list[Path]:
    """The files given to ``--config`` (``--config X`` or ``--config=X``)."""
    files = [b for a, b in zip(args, args[1:], strict=False) if a == "--config"]
    files += [a.partition("=")[2] for a in args if a.startswith("--config=")]
    return [Path(f) for f in files if Path(f).is_file()]


def check_config_file(path: Path) -> None:
    """A ValueError for a config file that is empty, not a mapping, or expands through YAML
    aliases to more than :data:`MAX_CONFIG_VALUES` values (a "billion laughs"), counted on the
    composed node graph, which shares an aliased node instead of copying it."""
    import yaml

    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"config {path} is not valid YAML: {err}") from None
    if root is None:
        raise ValueError(f"config {path} is empty")
    if not isinstance(root, yaml.MappingNode):
        raise ValueError(f"config {path} must be a mapping of options (fit: trainer:, model: …)")
    sizes: dict[int, int] = {}

    def size(node) -> int:  # the values of ``node`` once expanded, each shared node once
        if id(node) not in sizes:
            children = node.value if isinstance(node.value, list) else []
            flat = [n for c in children for n in (c if isinstance(c, tuple) else (c,))]
            sizes[id(node)] = 1 + sum(size(c) for c in flat)
        return sizes[id(node)]

    if size(root) > MAX_CONFIG_VALUES:
        raise ValueError(
            f"config {path} expands to {size(root):,} values through YAML aliases (at most "
            f"{MAX_CONFIG_VALUES:,} are read)"
        )


def short_parse_error(message: str) -> str:
    """jsonargparse's error without its scaffolding (the union's subtypes, "Expected a
    NoneType", the value echoed back): the path to the bad option and what is wrong with it."""
    noise = ("Does not validate against any of the Union", "Subtypes", "Errors", "Given value")
    lines = (line.strip().lstrip("- ").rstrip(":") for line in message.splitlines())
    kept = [ln for ln in lines if ln and not ln.startswith(noise) and "NoneType" not in ln]
    return "; ".join(kept) or message


def run_command(name: str, args: Sequence[str]) -> None:
    """One of :data:`~diffusion_apps.commands.COMMANDS`: a jsonargparse CLI of its typed
    function."""
    from jsonargparse import auto_cli

    prog = f"python -m diffusion_apps {name}"
    args = list_values_joined(args, list_options(COMMANDS[name]))
    auto_cli(COMMANDS[name], args=args, as_positional=False, prog=prog, exit_on_error=False)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point; ``args`` replaces ``sys.argv[1:]`` (tests call ``main([...])`` in-process)."""
    given, args = args, negative_values_joined(sys.argv[1:] if args is None else args)
    if given is None:
        sys.argv[1:] = args
    if not args or args[0] in ("-h", "--help"):
        print(overview())
        return
    if args[0] not in (*LIGHTNING_COMMANDS, *COMMANDS) and not args[0].startswith("-"):
        sys.exit(f"error: unknown command {args[0]!r}: choose from {', '.join(ALL_COMMANDS)}")
    from argparse import ArgumentError

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from diffusion_apps.callbacks import NonFiniteLossError
    from diffusion_apps.checkpoint import CheckpointError, first_line

    try:
        for path in config_files(args):
            check_config_file(path)
        if args[0] in COMMANDS:
            run_command(args[0], args[1:])
        else:
            DiffusionCLI(args=None if given is None else args)  # None: Lightning reads argv
    except (NonFiniteLossError, CheckpointError) as err:  # the message says it all
        sys.exit(f"error: {err}")
    except ArgumentError as err:  # jsonargparse's, raised (exit_on_error=False), not printed
        command = "python -m diffusion_apps" + (f" {args[0]}" if args[0] in ALL_COMMANDS else "")
        command += " --help"
        sys.exit(f"error: {short_parse_error(str(err))} ({command} lists the options)")
    except MisconfigurationException as err:  # Lightning's checks of the trainer's options
        sys.exit(f"error: trainer: {first_line(err).partition(': ')[2] or err}")
    except (ValueError, FileNotFoundError) as err:
        check = failed_check(err)
        if check is None:
            raise
        sys.exit(f"error: {check}")
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRORS:
            raise
        sys.exit(f"error: {err.strerror}: {err.filename or 'the output'}")


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
