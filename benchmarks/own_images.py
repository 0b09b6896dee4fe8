"""Our models on images that are not from their training data: digits drawn with fonts.

Draws a folder of digits (10 classes, DejaVu fonts when the system has them, else PIL's own;
random size, rotation and stroke width; PNG and JPEG, grayscale and RGB, 64 x 64) with an
attribute table (``Thick``: stroke width >= 2 px; ``Serif``), then runs the commands a user
would:

1. ``autoencode`` (reconstruct, 20 + 20 DDIM steps) of the DiffAE and PDAE checkpoints on the
   drawn folder, and on as many of their own val digits for comparison: MSE / PSNR / SSIM;
2. ``autoencode --mode manipulate`` with the probe fitted on the drawn folder and its table:
   the probe's val accuracy per attribute, a grid moving drawn digits towards ``Thick``;
3. ``sample`` 500 DDIM-50 images of the DDPM into samples.npz, and ``eval --samples
   samples.npz --reference DRAWN``, beside the embedded val digits scored the same way.

    python benchmarks/own_images.py --out reports/own_images

Writes ``<out>/own_images.md`` (the table) and the grids under ``<out>``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

FONTS = Path("/usr/share/fonts/truetype/dejavu")
SANS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf"]
SERIF = ["DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf"]


def font(name: str, size: int):
    from PIL import ImageFont

    path = FONTS / name
    return ImageFont.truetype(str(path), size) if path.is_file() else ImageFont.load_default(size)


def draw_digits(root: Path, per_class: int, seed: int = 0) -> Path:
    """``root/<digit>/<n>.png|jpg`` and ``root.parent/attributes.csv``; returns the table."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    rows = ["file,Thick,Serif"]
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            serif = rng.random() < 0.5
            stroke = rng.choice([0, 0, 1, 2, 3])
            face = font(rng.choice(SERIF if serif else SANS), rng.randint(34, 46))
            canvas = Image.new("L", (64, 64), 0)
            ImageDraw.Draw(canvas).text(
                (32 + rng.randint(-3, 3), 32 + rng.randint(-3, 3)), str(digit), fill=255,
                font=face, anchor="mm", stroke_width=stroke, stroke_fill=255,
            )  # fmt: skip
            canvas = canvas.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
            name = f"{digit}/{i:03d}." + ("jpg" if i % 3 == 2 else "png")
            (canvas.convert("RGB") if i % 2 else canvas).save(root / name, quality=95)
            rows.append(f"{name},{int(stroke >= 2)},{int(serif)}")
    table = root.parent / "attributes.csv"
    table.write_text("\n".join(rows) + "\n")
    return table


def run(*args: str) -> float:
    """One CLI command in this process; its wall seconds."""
    from diffusion_apps.cli import main

    print("$ python -m diffusion_apps " + " ".join(args), flush=True)
    tic = time.perf_counter()
    main(list(args))
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reports/own_images")
    parser.add_argument("--diffae", default="runs/diffae/version_0/checkpoints/last.ckpt")
    parser.add_argument("--pdae", default="runs/pdae/version_0/checkpoints/last.ckpt")
    parser.add_argument("--ddpm", default="runs/ddpm/version_0/checkpoints/last.ckpt")
    parser.add_argument("--per_class", type=int, default=30)
    parser.add_argument("--steps", default="20")
    parser.add_argument("--num_samples", default="500")
    args = parser.parse_args()
    out = Path(args.out)
    drawn = out / "drawn"
    table = draw_digits(drawn, args.per_class)
    n = str(10 * args.per_class)
    lines = ["| model | images | MSE | PSNR | SSIM | seconds |", "|---|---|---|---|---|---|"]
    for name, ckpt in (("DiffAE", args.diffae), ("PDAE", args.pdae)):
        for label, given in (("drawn digits", ["--images", str(drawn)]),
                             ("own val digits", ["--num_images", n])):  # fmt: skip
            folder = out / f"{name.lower()}_{label.split()[0]}"
            seconds = run("autoencode", "--ckpt_path", ckpt, "--steps", args.steps,
                          "--out_dir", str(folder), *given)  # fmt: skip
            m = json.loads((folder / "reconstruct.json").read_text())["metrics"]
            lines.append(f"| {name} | {n} {label} | {m['mse']:.2e} | {m['psnr']:.2f} | "
                         f"{m['ssim']:.3f} | {seconds:.0f} |")  # fmt: skip
    folder = out / "diffae_manipulate"
    originals = [str(drawn / str(d) / "000.png") for d in range(8)]
    run("autoencode", "--ckpt_path", args.diffae, "--mode", "manipulate", "--images", *originals,
        "--probe_images", str(drawn), "--attributes", str(table), "--attribute", "Thick",
        "--scales", "0", "0.3", "1", "2", "--steps", args.steps,
        "--out_dir", str(folder))  # fmt: skip
    probe = json.loads((folder / "probe.json").read_text())
    lines += ["", "| probe attribute (DiffAE z) | val accuracy | majority answer |"]
    lines += ["|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {probe['val_majority'][k]:.3f} |"
              for k, v in probe["val_accuracy"].items()]  # fmt: skip
    lines.append(f"\n(fitted on {probe['n_train']}, scored on {probe['n_val']} drawn digits)")

    samples = out / "ddpm_samples"
    run(
        "sample",
        "--ckpt_path",
        args.ddpm,
        "--num_samples",
        args.num_samples,
        "--sampler",
        "ddim",
        "--steps",
        "50",
        "--png",
        "false",
        "--out_dir",
        str(samples),
        "--precision",
        "32",
    )
    mnist = out / "val_digits.npz"
    from diffusion_apps.evaluation.digits import embedded_split

    val = embedded_split("val")[0][: int(args.num_samples)]
    np.savez(mnist, arr_0=((val + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    lines += ["", "| scored against the drawn digits | fd_digits | kid_digits | precision | "
              "recall |", "|---|---|---|---|---|"]  # fmt: skip
    for label, npz in (("DDPM, DDIM-50 samples", samples / "samples.npz"),
                       ("embedded val digits (real MNIST)", mnist)):  # fmt: skip
        report = out / f"eval_{npz.stem}_{label.split()[0].strip(',')}"
        run("eval", "--samples", str(npz), "--reference", str(drawn), "--out_dir", str(report))
        row = json.loads((report / "eval.json").read_text())["rows"][0]["metrics"]
        lines.append(f"| {label} | {row['fd_digits']:.1f} | {row['kid_digits']:.3f} | "
                     f"{row['precision_digits']:.3f} | {row['recall_digits']:.3f} |")  # fmt: skip
    (out / "own_images.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
