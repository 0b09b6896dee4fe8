"""``python -m diffusion_apps autoencode``: an autoencoder's inference modes on val images.

Modes, each a PNG grid of the checkpoint's first val images (one image a row unless said):
    reconstruct   rows: originals, inferred x_T, random x_T
    interpolate   original a, lerp z / slerp x_T strip, original b
    trajectory    as interpolate, mixing the G_ψ of the two codes at every step (PDAE only)
    variations    original, then decodings of its z from random x_T
    manipulate    original, then z moved towards ``attribute`` by each of ``scales``
                  (the probe is fitted on the train split's codes and labels)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

Mode = Literal["reconstruct", "interpolate", "trajectory", "variations", "manipulate"]


def autoencode(
    ckpt_path: str,
    mode: Mode = "reconstruct",
    num_images: int = 8,
    attribute: int | None = None,
    scales: list[float] | None = None,
    steps: int | None = None,
    encode_steps: int | None = None,
    seed: int = 0,
    out_dir: str | None = None,
    device: str = "auto",
) -> Path:
    """Write ``<mode>.png`` for the diffusion autoencoder in ``ckpt_path``.

    Args:
        ckpt_path: checkpoint written by ``fit`` of a diffusion autoencoder (DiffAE, PDAE):
            a module whose ``autoencoding`` declares the mode.
        mode: see the module docstring.
        num_images: val images used (manipulate: the first ones not already of ``attribute``).
        attribute: manipulate: the class (attribute index) to move towards, e.g. 8.
        scales: manipulate: the s of z' = denorm(norm(z) + s·√d·w/‖w‖); default 0, 0.3 (the
            paper's), 1, 2, 3 (a digit's class needs s ≈ 2–4).
        steps: DDIM decoding steps, and inversion steps unless ``encode_steps`` are given;
            default: the checkpoint's ``sample_steps`` (and ``encode_steps``).
        encode_steps: DDIM inversion steps; default: ``steps``, else the checkpoint's.
        seed: seed of the random x_T.
        out_dir: default ``<run dir>/autoencode``.
        device: "auto" (CUDA when available), "cpu", "cuda", …

    Returns:
        The path of the grid.
    """
    from torch.utils.data import DataLoader

    from diffusion_apps.checkpoint import load_module, read_checkpoint, resolve_device
    from diffusion_apps.commands.common import checkpoint_data, writable_folder
    from diffusion_apps.images import save_grid
    from diffusion_apps.methods.protocol import autoencoding_of

    least = 2 if mode in ("interpolate", "trajectory") else 1
    if num_images < least:
        raise ValueError(f"num_images must be >= {least} for {mode}, got {num_images}")
    dev = resolve_device(device)
    module = load_module(ckpt_path).to(dev)
    out = writable_folder(out_dir or Path(ckpt_path).parent.parent / "autoencode")
    modes = getattr(autoencoding_of(module), "modes", ())
    if not modes:
        raise SystemExit(
            f"autoencode: {ckpt_path} holds a {type(module).__name__}, which has no "
            "encode/encode_stochastic/decode (train configs/diffae.yaml or configs/pdae.yaml)"
        )
    if mode not in modes:
        raise SystemExit(
            f"autoencode: {mode} is not a mode of the {type(module).__name__} in {ckpt_path} "
            f"(it offers {', '.join(modes)}; trajectory is PDAE's)"
        )
    data = checkpoint_data(read_checkpoint(ckpt_path), module)
    images, labels = next(iter(DataLoader(data.val_set, batch_size=len(data.val_set))))
    gen = torch.Generator(dev).manual_seed(seed)

    if mode == "manipulate":
        if attribute is None or not data.num_classes or not 0 <= attribute < data.num_classes:
            raise ValueError(
                f"manipulate needs --attribute, a class of the labelled data in "
                f"[0, {data.num_classes or 0}), got {attribute}"
            )
        images = images[labels != attribute]
    x = images[:num_images].to(dev)
    paired = dict(steps=steps, encode_steps=encode_steps)  # inversion and decoding
    if mode == "reconstruct":
        random = module.reconstruct(x, False, steps, gen)
        rows = [x, module.reconstruct(x, **paired), random]
        grid, nrow = torch.cat(rows), len(x)
    elif mode in ("interpolate", "trajectory"):
        half = len(x) // 2
        interpolate = module.interpolate if mode == "interpolate" else module.interpolate_trajectory
        strips = interpolate(x[:half], x[half : 2 * half], **paired)
        framed = [x[:half, None], strips, x[half : 2 * half, None]]
        grid, nrow = torch.cat(framed, dim=1), strips.shape[1] + 2
    elif mode == "variations":
        grid = module.stochastic_variations(x, num=7, steps=steps, generator=gen)
        grid, nrow = torch.cat([x[:, None], grid], dim=1), 8
    else:
        loader = DataLoader(data.train_set, batch_size=250)
        probe = module.fit_probe(loader)
        scales = [0.0, 0.3, 1.0, 2.0, 3.0] if scales is None else scales
        grid = module.manipulate(x, probe, attribute, scales, **paired)
        grid, nrow = torch.cat([x[:, None], grid], dim=1), len(scales) + 1
    path = out / f"{mode}.png"
    save_grid(grid.flatten(0, 1) if grid.dim() == 5 else grid, path, nrow=nrow)
    print(f"wrote {path}")
    return path
