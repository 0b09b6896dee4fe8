"""``python -m diffusion_apps export``: one of our checkpoints → another codebase's format.

``--format diffusers`` writes a DDPM of ours as a diffusers ``DDPMPipeline`` folder, which
``DDPMPipeline.from_pretrained(out)`` loads and ``import --source diffusers`` reads back to the
same tensors and options::

    python -m diffusion_apps export --ckpt_path runs/ddpm/version_0/checkpoints/last.ckpt \\
        --format diffusers --out ddpm-pipeline
    out/model_index.json
    out/unet/config.json  out/unet/diffusion_pytorch_model.safetensors
    out/scheduler/scheduler_config.json

Only a plain DDPM whose UNet maps onto ``UNet2DModel`` exports; anything else is refused before
anything is written, naming the option (:func:`~diffusion_apps.interop.diffusers_export.
diffusers_config`): DiffAE, PDAE, LDM and latent DDIM are other methods, and ``cond_dim``,
``context_dim``, ``resblock_updown``, a null label, ... have no UNet2DModel layer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

MARKER = "_exported_by"  # model_index.json's key (private: diffusers ignores it) naming us
FILES = {  # what an export holds, and nothing else
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
}


def export(ckpt_path: str, out: str, format: Literal["diffusers"] = "diffusers") -> Path:
    """Write the DDPM checkpoint ``ckpt_path`` (EMA weights when it has them) as ``format``.

    Args:
        ckpt_path: a checkpoint of a DDPM of ours (``fit`` or ``import`` wrote it).
        out: the folder to write. Written atomically (a hidden folder beside it, renamed at the
            end): ``out`` is the complete export or what it was before. An existing ``out``
            must be empty or a previous export (a ``model_index.json`` that names us and only
            the four files an export writes), which is replaced; anything else is refused.
        format: "diffusers": a ``DDPMPipeline`` folder (UNet2DModel + DDPMScheduler).

    Returns:
        The folder written.
    """
    from safetensors.torch import save_file

    from diffusion_apps.checkpoint import load_module
    from diffusion_apps.interop import diffusers_export
    from diffusion_apps.methods import DDPM

    target = Path(out)
    _check_target(target)
    unet_options, ddpm = _options(ckpt_path)  # refused here, before the weights are read
    unet_config = diffusers_export.diffusers_config(unet_options)
    scheduler = diffusers_export.scheduler_config(ddpm)
    _check_outputs(unet_config, ddpm)
    unet = load_module(ckpt_path, DDPM).unet
    state = diffusers_export.diffusers_state_dict(unet.state_dict(), unet)
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": diffusers_export.DIFFUSERS_VERSION,
        MARKER: "diffusion_apps",
        "_exported_from": str(ckpt_path),
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }

    def write(folder: Path) -> None:
        (folder / "unet").mkdir(parents=True)
        (folder / "scheduler").mkdir()
        _write_json(folder / "model_index.json", index)
        _write_json(folder / "unet/config.json", unet_config)
        _write_json(folder / "scheduler/scheduler_config.json", scheduler)
        weights = folder / "unet/diffusion_pytorch_model.safetensors"
        save_file(state, str(weights), metadata={"format": "pt"})
        _sync(weights)

    _write_atomically(target, write)
    print(f"wrote {target}: DDPMPipeline (UNet2DModel + DDPMScheduler) from {ckpt_path}")
    return target


def _options(ckpt_path: str) -> tuple[dict, dict]:
    """(the UNet's constructor options, the DDPM's schedule / prediction / variance / clip_x0)
    from the checkpoint's config; a ValueError naming what is not a plain DDPM with our UNet."""
    import inspect

    from diffusion_apps.checkpoint import CheckpointError, import_class, read_tensors
    from diffusion_apps.methods import DDPM
    from diffusion_apps.nn import UNet

    ckpt = read_tensors(ckpt_path, mmap=True)
    hparams = (ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    if "_class_path" not in hparams:
        raise CheckpointError(f"{ckpt_path} holds no model config: it is no checkpoint of ours")
    cls = import_class(hparams["_class_path"])
    if cls is not DDPM:
        raise ValueError(
            f"{ckpt_path} holds a {cls.__name__} checkpoint: only a plain DDPM exports to "
            "diffusers' DDPMPipeline, a UNet2DModel on the images themselves with no encoder, "
            "first stage or conditioning"
        )
    unet = hparams.get("unet") or {}
    unet_cls = import_class(unet["class_path"]) if "class_path" in unet else None
    if unet_cls is not UNet:
        raise ValueError(f"{ckpt_path}: the DDPM's unet is {unet!r}, not our UNet")
    defaults = {k: p.default for k, p in inspect.signature(DDPM).parameters.items()}
    ddpm = {k: hparams.get(k, defaults[k]) for k in ("schedule", "prediction", "variance")}
    ddpm["clip_x0"] = hparams.get("clip_x0", defaults["clip_x0"])
    return dict(unet.get("init_args") or {}), ddpm


def _check_outputs(unet_config: dict, ddpm: dict) -> None:
    """DDPMScheduler reads C output channels as the prediction, 2C as [prediction, v] with
    ``learned_range`` only."""
    channels, outputs = unet_config["in_channels"], unet_config["out_channels"]
    learned = ddpm["variance"] == "learned"
    if outputs != (2 * channels if learned else channels):
        raise ValueError(
            f"UNet option out_channels={outputs} with in_channels={channels} and "
            f"variance={ddpm['variance']!r} cannot be exported: DDPMScheduler takes "
            f"{channels} output channels, or {2 * channels} with the learned variance only"
        )


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise ValueError(f"--out {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not _is_export(target):
        raise ValueError(
            f"--out {target} exists and is not empty, nor a previous export (model_index.json "
            f"with {MARKER} and only {', '.join(sorted(FILES))}): give a new folder"
        )


def _is_export(folder: Path) -> bool:
    """``folder`` holds exactly what :func:`export` writes, its model_index.json naming us."""
    found = {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()}
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return found == FILES and isinstance(index, dict) and index.get(MARKER) == "diffusion_apps"


def _write_atomically(target: Path, write) -> None:
    """``write(folder)`` into a hidden folder beside ``target``, then that folder renamed to
    ``target`` (an existing one moved aside first and deleted after): a failure at any point
    leaves ``target`` as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.partial"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    old = target.with_name(f".{target.name}.{os.getpid()}.old.partial")
    try:
        write(partial)
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(partial, target)
        except OSError:
            if old.exists():
                os.replace(old, target)
            raise
    finally:
        for leftover in (partial, old):
            shutil.rmtree(leftover, ignore_errors=True)


def _write_json(path: Path, value: dict) -> None:
    with open(path, "w") as file:
        json.dump(value, file, indent=2, sort_keys=True)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
