"""Exact (EDICT) against DDIM inversion for a diffusion autoencoder: reconstruction MSE, PSNR,
SSIM and seconds of the first ``--num_images`` val digits at each step count (inversion steps =
decoding steps), written as a Markdown table to ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/exact_inversion.py \
        --ckpt runs/diffae/version_0/checkpoints/last.ckpt

Seconds are the wall time of inversion plus decoding of all the images in one batch, fp32.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from diffusion_apps.checkpoint import load_module, read_checkpoint
from diffusion_apps.commands.common import checkpoint_data
from diffusion_apps.diffusion import Inversion
from diffusion_apps.evaluation import ReconstructionMetrics


def rows(module, x, steps_list, inversions) -> list[str]:
    lines = [
        "| steps | inversion | NFE | MSE | PSNR | SSIM | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    z = module.encode(x)
    for steps in steps_list:
        for inversion in inversions:
            module.inversion = inversion
            tic = time.perf_counter()
            x_hat = module.decode(z, module.encode_stochastic(x, z, steps), steps)
            seconds = time.perf_counter() - tic
            metric = ReconstructionMetrics()
            metric.update(x_hat, x)
            m = metric.compute()
            name = "DDIM" if inversion.kind == "ddim" else f"EDICT p = {inversion.mix:g}"
            lines.append(
                f"| {steps} | {name} | {inversion.nfe(2 * steps)} | {m['mse']:.2e} | "
                f"{m['psnr']:.2f} | {m['ssim']:.4f} | {seconds:.1f} |"
            )
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--mix", type=float, default=0.93)
    parser.add_argument("--out", default="benchmarks/results/exact_inversion/diffae.md")
    args = parser.parse_args()
    module = load_module(args.ckpt).float().eval()
    data = checkpoint_data(read_checkpoint(args.ckpt), module)
    x = next(iter(DataLoader(data.val_set, batch_size=args.num_images)))[0]
    with torch.no_grad():
        table = rows(module, x, args.steps, [Inversion(), Inversion("edict", args.mix)])
    head = [
        f"# Exact (EDICT) vs DDIM inversion: {type(module).__name__} `{args.ckpt}`",
        "",
        f"First {len(x)} val images, inversion and decoding with the same steps (uniform "
        f"spacing), fp32, torch {torch.__version__}, {platform.processor() or platform.machine()}"
        f", {torch.get_num_threads()} threads. NFE per image, both directions.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(head + table) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
