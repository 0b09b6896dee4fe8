"""Diffusion-autoencoder (DiffAE, PDAE) numbers beyond ``make eval``: reconstruction against
DDIM step count, how often z alone (random x_T) keeps a digit's class, and how often attribute
manipulation turns val digits into the target class.

    python benchmarks/autoencoder_extras.py --ckpt runs/diffae/version_0/checkpoints/last.ckpt

Manipulation success is judged by the evaluation's clean digit classifier (not the probe that
gave the direction), as is the class kept. Writes ``--out`` (default
``benchmarks/results/diffae/extras.md``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from diffusion_apps.checkpoint import load_module, read_checkpoint
from diffusion_apps.commands.common import checkpoint_data
from diffusion_apps.evaluation import ReconstructionMetrics, digit_classifier


def reconstruction_by_steps(module, x, steps_list) -> list[str]:
    lines = [
        "| DDIM steps (inversion = decoding) | MSE | PSNR | SSIM | seconds |",
        "|---|---|---|---|---|",
    ]
    z_sem = module.encode(x)
    for steps in steps_list:
        tic = time.perf_counter()
        x_hat = module.decode(z_sem, module.encode_stochastic(x, z_sem, steps), steps)
        seconds = time.perf_counter() - tic
        metric = ReconstructionMetrics()
        metric.update(x_hat, x)
        m = metric.compute()
        lines.append(
            f"| {steps} | {m['mse']:.2e} | {m['psnr']:.2f} | {m['ssim']:.4f} | {seconds:.1f} |"
        )
    return lines


def class_kept_by_z(module, x, labels, seed: int = 0) -> list[str]:
    """Share of decodings of z = Enc(x) from x_T ~ N(0, I) that the digit classifier puts in
    x's class: what the code alone carries."""
    judge = digit_classifier(progress=False)
    x_T = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        predicted = judge(module.decode(module.encode(x), x_T)).argmax(1)
        own = judge(x).argmax(1)
    kept = (predicted == labels).float().mean().item()
    return [
        f"Decoded from random x_T, {kept:.1%} of the digits keep their class "
        f"(the originals: {(own == labels).float().mean().item():.1%}; chance: 10%)."
    ]


def manipulation_success(module, data, x, labels, target, scales) -> list[str]:
    probe = module.fit_probe(DataLoader(data.train_set, batch_size=250))
    judge = digit_classifier(progress=False)
    frames = module.manipulate(x, probe, target, scales)  # (B, S, C, H, W)
    lines = [
        f"| scale s | share classified as {target} | share keeping its own class |",
        "|---|---|---|",
    ]
    with torch.no_grad():
        for i, s in enumerate(scales):
            predicted = judge(frames[:, i]).argmax(1)
            to_target = (predicted == target).float().mean().item()
            kept = (predicted == labels).float().mean().item()
            lines.append(f"| {s:g} | {to_target:.1%} | {kept:.1%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="runs/diffae/version_0/checkpoints/last.ckpt")
    parser.add_argument("--num_images", type=int, default=100)
    parser.add_argument("--target", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/diffae/extras.md")
    args = parser.parse_args()

    module = load_module(args.ckpt)
    data = checkpoint_data(read_checkpoint(args.ckpt), module)
    images, labels = next(iter(DataLoader(data.val_set, batch_size=len(data.val_set))))
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(images), generator=g)[: args.num_images]
    x, y = images[pick], labels[pick]
    others = labels[pick] != args.target
    scales = [0.0, 0.3, 1.0, 2.0, 3.0, 4.0]
    lines = [
        f"# {type(module).__name__} extras",
        "",
        f"Checkpoint `{args.ckpt}`, {args.num_images} val digits drawn with seed 0, fp32, CPU.",
        "",
        "## Reconstruction (x_T inferred) against DDIM steps",
        "",
        *reconstruction_by_steps(module, x, [10, 20, 50, 100]),
        "",
        "## What z alone carries",
        "",
        *class_kept_by_z(module, x, y),
        "",
        f"## Manipulation towards {args.target} ({int(others.sum())} digits of other classes)",
        "",
        "z' = denorm(norm(z) + s·√d·w/‖w‖), w the probe's weights for the class, decoded "
        "from the inferred x_T; judged by the evaluation's digit classifier.",
        "",
        *manipulation_success(module, data, x[others], y[others], args.target, scales),
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    with torch.no_grad():
        main()
