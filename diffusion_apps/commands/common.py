"""What the commands share: finding checkpoints, reading sampler settings, rebuilding data,
and loading a module onto the device at the precision the hardware runs."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from diffusion_apps.evaluation.protocol import SamplerSetting

TRAIN_HINT = (
    "train one with `python -m diffusion_apps fit --config configs/ddpm.yaml` (or `make demo`), "
    "or name checkpoints with --ckpt_paths"
)


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """One checkpoint per run version under ``run_dir``: its ``last.ckpt`` when there is one, else
    its newest ``*.ckpt``. Sorted by path."""
    by_run: dict[Path, list[Path]] = {}
    for path in Path(run_dir).rglob("*.ckpt"):
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        by_run.setdefault(run, []).append(path)
    chosen = []
    for paths in by_run.values():
        lasts = sorted(p for p in paths if p.name.startswith("last"))
        chosen.append(lasts[0] if lasts else max(paths, key=lambda p: (p.stat().st_mtime, p)))
    return sorted(chosen)


def checkpoint_paths(run_dir: str, ckpt_paths: list[str] | str | None, command: str) -> list[Path]:
    """The checkpoints named (a list, one path or comma-separated paths; each file once, in the
    order given), else those :func:`find_checkpoints` finds under ``run_dir``; exits naming
    what is missing."""
    if isinstance(ckpt_paths, str):
        ckpt_paths = [ckpt_paths]
    ckpt_paths = [p.strip() for item in ckpt_paths or () for p in item.split(",") if p.strip()]
    if not ckpt_paths:
        paths = find_checkpoints(run_dir)
        if not paths:
            sys.exit(f"{command}: no checkpoint (*.ckpt) under {run_dir}/: {TRAIN_HINT}")
        return paths
    named = {Path(p).resolve(): Path(p) for p in reversed(ckpt_paths)}
    paths = list(reversed(named.values()))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"{command}: checkpoint not found: {', '.join(missing)}; {TRAIN_HINT}")
    return paths


def parse_samplers(spec: str | Sequence[str]) -> list[SamplerSetting]:
    """``"ddpm:1000,dpmpp_2m:10:logsnr"`` (or the items as a list) → ``[("ddpm", 1000, None),
    ("dpmpp_2m", 10, "logsnr")]``.

    Whitespace around items is ignored; each item must be ``name:steps`` with steps >= 1,
    optionally followed by ``:spacing`` (a ``timestep_spacing`` of DDPM-based modules).
    """
    items = spec.split(",") if isinstance(spec, str) else [s for x in spec for s in x.split(",")]
    settings = []
    for item in (i.strip() for i in items):
        name, steps, *rest = item.split(":") + [""]
        spacing = rest[0] if len(rest) == 2 else None
        if not name or not steps.isdigit() or int(steps) < 1 or len(rest) > 2 or spacing == "":
            raise ValueError(
                f"--samplers: {item!r} is not 'sampler:steps' or 'sampler:steps:spacing' "
                "(e.g. 'ddim:50', 'dpmpp_2m:10:logsnr')"
            )
        settings.append(SamplerSetting(name, int(steps), spacing))
    if not settings:
        raise ValueError("--samplers: no sampler setting given (e.g. 'ddim:50')")
    return settings


def device_and_precision(device: str, precision: str):
    """(torch.device, "32" | "bf16"): ``device`` resolved ("auto": CUDA when available) and the
    network precision ``precision`` stands for on it (printed)."""
    from diffusion_apps.checkpoint import resolve_device
    from diffusion_apps.precision import sampling_precision

    dev = resolve_device(device)
    return dev, sampling_precision(precision, dev)


def checkpoint_data(ckpt: dict, module):
    """The checkpoint's data module, rebuilt from its saved config and set up (default: the
    embedded digits at the module's sample shape)."""
    from lightning.pytorch.cli import instantiate_module

    from diffusion_apps.checkpoint import check_class_paths, import_class
    from diffusion_apps.data import ImageDataModule

    hparams = dict(ckpt.get("datamodule_hyper_parameters") or {})
    check_class_paths(hparams, "the checkpoint's data config")
    class_path = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    if class_path is not None:
        data = instantiate_module(import_class(class_path, "the checkpoint's data config"), hparams)
    else:
        c, s, _ = module.sample_shape
        data = ImageDataModule(dataset="digits", image_size=s, channels=c)
    data.setup("validate")
    return data


def writable_folder(path: str | Path, flag: str = "--out_dir") -> Path:
    """``path`` as a folder this process can write to, created if missing; else a ValueError
    naming it, before any work starts (a file in its place, a read-only or missing parent)."""
    import os

    from diffusion_apps.checkpoint import first_line

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to {flag} {path} ({first_line(err)})") from None
    return path


def check_disk_room(folder: Path, needed: int, what: str) -> None:
    """Say how much ``what`` will write to ``folder`` at most, and refuse it when the disk holds
    less free space."""
    import shutil

    existing = next(p for p in (folder, *folder.parents) if p.exists())  # before it is made
    free = shutil.disk_usage(existing).free
    print(f"{what}: at most {_size(needed)} to {folder} ({_size(free)} free)")
    if needed > free:
        raise ValueError(f"{what} need up to {_size(needed)}, but {folder} has {_size(free)} free")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
