"""``python -m diffusion_apps autoencode``: a diffusion autoencoder on the user's own images.

Inputs: ``--images a.png b.jpg`` or ``--images DIR`` (read as the data module reads a folder, at
the checkpoint's channels and resolution: :mod:`diffusion_apps.data.files`), ``--codes codes.pt``
(written by ``--mode encode``), or by default the first images of the checkpoint's val split.

Modes, each a PNG grid ``<mode>.png`` and ``<mode>.json`` (the inputs, how they were read, the
settings, the numbers):
    reconstruct   rows: originals, inferred x_T, random x_T; every inferred reconstruction as
                  ``reconstruct/NNNN_<file>.png``; MSE/PSNR/SSIM against the inputs
    encode        ``codes.pt`` (z_sem, x_T — EDICT's pair with ``--inversion edict`` —, the steps
                  and spacing, the file names)
    decode        the codes' images (``decode/NNNN_<file>.png``), bit for bit the reconstruction
    interpolate   a, lerp z / slerp x_T strip, b (the first half of the inputs with the second)
    trajectory    as interpolate, mixing the G_ψ of the two codes at every step (PDAE only)
    variations    original, then decodings of its z from random x_T
    manipulate    original, then z moved towards ``attribute`` by each of ``scales`` (the probe:
                  :mod:`diffusion_apps.commands.attribute_probe`)
Modes after the first two take ``--codes`` as well as images: encode once, edit many times.
``--inversion edict`` infers x_T by EDICT's exact inversion instead of DDIM's (codes decode as
they were made: :mod:`diffusion_apps.diffusion.exact_inversion`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from diffusion_apps.diffusion.exact_inversion import EDICT_MIX, Inversion, InversionKind

Mode = Literal[
    "reconstruct", "encode", "decode", "interpolate", "trajectory", "variations", "manipulate"
]
FROM_CODES = ("decode", "interpolate", "trajectory", "variations", "manipulate")
GRID_IMAGES = 16  # inputs shown in a grid; the files hold every one


def autoencode(
    ckpt_path: str,
    mode: Mode = "reconstruct",
    images: list[str] | None = None,
    codes: str | None = None,
    out: str | None = None,
    num_images: int | None = None,
    attribute: str | None = None,
    scales: list[float] | None = None,
    probe_images: list[str] | None = None,
    attributes: str | None = None,
    steps: int | None = None,
    encode_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    out_dir: str | None = None,
    device: str = "auto",
    bad_images: Literal["stop", "skip"] = "stop",
    inversion: InversionKind | None = None,
    mix: float = EDICT_MIX,
) -> Path:
    """Write ``<mode>.png`` (``codes.pt`` for encode) for the diffusion autoencoder in
    ``ckpt_path``.

    Args:
        ckpt_path: checkpoint written by ``fit`` of a diffusion autoencoder (DiffAE, PDAE):
            a module whose ``autoencoding`` declares the mode.
        mode: see the module docstring.
        images: image files, or one folder of them (any size or mode: converted to the
            checkpoint's channels, the shorter side resized and center-cropped to its
            resolution); default: the checkpoint's val split.
        codes: a ``codes.pt`` of ``--mode encode`` (for decode, interpolate, trajectory,
            variations, manipulate), made with this checkpoint.
        out: encode: where to write the codes; default ``<out_dir>/codes.pt``.
        num_images: use the first N inputs; default: every one given, 8 of the val split
            (manipulate: the first ones not already of ``attribute``).
        attribute: manipulate: the attribute (or class) to move towards, by name (``Smiling``,
            a sub-folder's name, a digit ``8``) or index.
        scales: manipulate: the s of z' = denorm(norm(z) + s·√d·w/‖w‖); default 0, 0.3 (the
            paper's), 1, 2, 3 (a digit's class needs s ≈ 2–4).
        probe_images: manipulate: labelled images to fit the attribute probe on (a folder with
            one sub-folder per class, or images named in ``attributes``); default: the
            checkpoint's labelled data.
        attributes: manipulate: an attribute table for ``probe_images``: CelebA's
            ``list_attr_celeba.txt`` layout, or a CSV with a ``file`` column and 0/1 or ±1
            columns.
        steps: DDIM decoding steps, and inversion steps unless ``encode_steps`` are given;
            default: the checkpoint's ``sample_steps`` (and ``encode_steps``); with ``codes``,
            the steps they were encoded for.
        encode_steps: DDIM inversion steps; default: ``steps``, else the checkpoint's.
        seed: seed of the random x_T.
        batch_size: images per forward pass (keep it the same from encode to decode for
            bit-identical decodings: a batch's kernels may round differently at another size).
        out_dir: default ``<run dir>/autoencode``.
        device: "auto" (CUDA when available), "cpu", "cuda", …
        bad_images: a file that cannot be read: "stop" naming it, or "skip" it with a warning.
        inversion: how x_T is inferred: "ddim" (the default: approximate) or "edict" (exact,
            twice the network calls); with ``codes``, default theirs, and another is an error.
        mix: EDICT's mixing p in (0, 1] (the paper's 0.93).

    Returns:
        The path of the grid (of ``codes.pt`` for encode).
    """
    from diffusion_apps.checkpoint import load_module, resolve_device
    from diffusion_apps.commands.autoencode_inputs import Run, read_inputs
    from diffusion_apps.commands.codes_file import CodesFile, inversion_of
    from diffusion_apps.commands.common import writable_folder
    from diffusion_apps.evaluation.metrics import state_hash
    from diffusion_apps.images import save_grid, to_uint8
    from diffusion_apps.methods.diffusion_autoencoder import Codes
    from diffusion_apps.methods.protocol import autoencoding_of, has_stochastic_code

    if batch_size < 1 or (num_images is not None and num_images < 1):
        raise ValueError(f"batch_size and num_images must be >= 1, got {batch_size}, {num_images}")
    if codes is not None and mode not in FROM_CODES:
        raise ValueError(f"--codes: {mode} works on images; give --images instead")
    if mode == "decode" and codes is None:
        raise ValueError("--mode decode needs --codes, a codes.pt written by --mode encode")
    if codes is not None and images is not None:
        raise ValueError("give --images or --codes, not both")
    module = load_module(ckpt_path).to(resolve_device(device))
    modes = (*getattr(autoencoding_of(module), "modes", ()), "encode", "decode")
    if not has_stochastic_code(module):
        raise SystemExit(
            f"autoencode: {ckpt_path} holds a {type(module).__name__}, which has no "
            "encode/encode_stochastic/decode (train configs/diffae.yaml or configs/pdae.yaml)"
        )
    if mode not in modes:
        raise SystemExit(
            f"autoencode: {mode} is not a mode of the {type(module).__name__} in {ckpt_path} "
            f"(it offers {', '.join(modes)}; trajectory is PDAE's)"
        )
    folder = writable_folder(out_dir or Path(ckpt_path).parent.parent / "autoencode")
    weights = state_hash(module)
    probe = target = None
    if mode == "manipulate":
        probe = _probe(module, ckpt_path, probe_images, attributes, batch_size, bad_images)
        target = probe.index(str(attribute)) if attribute is not None else None
        if target is None:
            raise ValueError(f"manipulate needs --attribute, one of {', '.join(probe.names)}")
        probe.report(folder / "probe.json")
    asked = Inversion(inversion, mix) if inversion is not None else None
    source = read_inputs(module, ckpt_path, images, codes, weights, bad_images, asked)
    module.inversion = inversion_of(source.codes) if source.codes else asked or Inversion()
    if mode == "trajectory" and module.inversion.kind == "edict":
        raise ValueError("trajectory interpolation decodes with DDIM only: drop --inversion edict")
    if source.from_val and mode == "manipulate" and probe_images is None:
        source = source.subset(source.labels != target)  # the val images not yet of the class
    n = num_images or (8 if source.from_val else len(source))
    source = source.subset(torch.arange(len(source)) < n)
    least = 2 if mode in ("interpolate", "trajectory") else 1
    if len(source) < least:
        raise ValueError(f"{mode} needs at least {least} images, got {len(source)}")

    stored = source.codes
    if stored is not None:  # decoded as encoded, unless told otherwise
        steps, encode_steps = steps or stored.steps, stored.encode_steps
    else:
        encode_steps = encode_steps or steps or module.encode_steps
        steps = steps or module.sample_steps
    run = Run(module, batch_size, encode_steps, seed)
    record = {
        "checkpoint": str(ckpt_path), "mode": mode, "inputs": source.where,
        "files": source.names, "recipe": source.recipe, "decode_steps": steps,
        "encode_steps": encode_steps, "spacing": module.timestep_spacing, "seed": seed,
        "inversion": module.inversion.kind,
    }  # fmt: skip
    if module.inversion.kind == "edict":
        record["mix"] = module.inversion.mix
    x = source.images
    if mode == "encode":
        path = Path(out) if out else folder / "codes.pt"
        CodesFile(
            run.codes(x), to_uint8(x), source.names, encode_steps,
            module.timesteps(encode_steps), steps, module.timestep_spacing, source.recipe,
            str(ckpt_path), weights,
        ).save(path)  # fmt: skip
        _write_record(record, folder / "encode.json")
        print(f"wrote the codes of {len(x)} images to {path}")
        return path
    both = stored.codes if stored else (run.codes(x) if mode != "variations" else None)
    if mode in ("reconstruct", "decode"):
        decoded = run.each(lambda z, x_T: module.decode(z, x_T, steps), *both)
        _save_each(decoded, source.names, folder / mode)
        record["metrics"] = _metrics(decoded, x)
        print(f"{mode}: " + ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items()))
        rows = [x, decoded]
        if mode == "reconstruct":
            rows.append(run.each(lambda b: module.reconstruct(b, False, steps, run.generator), x))
        rows = [r[:GRID_IMAGES] for r in rows]
        grid, nrow = torch.cat(rows), len(rows[0])
    elif mode in ("interpolate", "trajectory"):
        half = len(x) // 2
        interpolate = module.interpolate if mode == "interpolate" else module.interpolate_trajectory

        def strip(z_a, t_a, z_b, t_b):
            return interpolate(Codes(z_a, t_a), Codes(z_b, t_b), steps=steps)

        pairs = [c[s] for s in (slice(0, half), slice(half, 2 * half)) for c in both]
        grid = torch.cat([x[:half, None], run.each(strip, *pairs), x[half : 2 * half, None]], 1)
        nrow = grid.shape[1]
    elif mode == "variations":

        def vary(*given):
            code = Codes(*given) if len(given) == 2 else given[0]
            return module.stochastic_variations(code, 7, steps, run.generator)

        grid = torch.cat([x[:, None], run.each(vary, *(both or (x,)))], dim=1)
        nrow = grid.shape[1]
    else:
        scales = [0.0, 0.3, 1.0, 2.0, 3.0] if scales is None else scales

        direction = probe.probe.to(module.device)

        def edit(z, x_T):
            return module.manipulate(Codes(z, x_T), direction, target, scales, steps)

        grid = torch.cat([x[:, None], run.each(edit, *both)], dim=1)
        nrow = grid.shape[1]
        record.update(attribute=probe.names[target], scales=scales, probe=probe.accuracy)
    path = folder / f"{mode}.png"
    save_grid(grid.flatten(0, 1) if grid.dim() == 5 else grid, path, nrow=nrow)
    _write_record(record, folder / f"{mode}.json")
    print(f"wrote {path}")
    return path


def _probe(module, ckpt_path, probe_images, attributes, batch_size: int, bad_images: str):
    from diffusion_apps.commands import attribute_probe

    if attributes is not None and probe_images is None:
        raise ValueError("--attributes labels the images of --probe_images: give both")
    if probe_images is not None:
        probe = attribute_probe.probe_from_images(
            module, probe_images, attributes, batch_size, bad_images
        )
    else:
        from diffusion_apps.checkpoint import read_checkpoint
        from diffusion_apps.commands.common import checkpoint_data

        data = checkpoint_data(read_checkpoint(ckpt_path), module)
        probe = attribute_probe.probe_from_data(module, data, batch_size)
    return probe


def _metrics(decoded: Tensor, x: Tensor) -> dict[str, float]:
    """MSE, PSNR, SSIM (on [0, 1]) of the decodings against the inputs."""
    from diffusion_apps.evaluation.reconstruction import ReconstructionMetrics

    metric = ReconstructionMetrics()
    metric.update(decoded, x)
    return {k: float(v) for k, v in metric.compute().items() if k != "n"}


def _save_each(images: Tensor, names: list[str], folder: Path) -> None:
    """Every image as ``NNNN_<stem>.png`` (numbered: two files may share a stem)."""
    from diffusion_apps.images import save_png, to_unit

    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, name) in enumerate(zip(to_unit(images), names, strict=True)):
        save_png(image, folder / f"{i:04d}_{Path(name).stem}.png")


def _write_record(record: dict, path: Path) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n")
