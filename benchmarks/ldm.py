"""Latent diffusion, measured: guidance scale against class accuracy and fd_digits, caption
agreement, the speed of latent against pixel diffusion with the same UNet config, and the first
stages (KL and VQ) side by side.

    python benchmarks/ldm.py --ldm runs/ldm/version_0/checkpoints/last.ckpt \
        --caption runs/ldm_caption/version_0/checkpoints/last.ckpt
    python benchmarks/ldm.py --ldm "" --first_stages runs/ldm_autoencoder/version_0/checkpoints/\
last.ckpt,runs/ldm_autoencoder_vq/version_0/checkpoints/last.ckpt   # first stages only

* Class model: for each w, ``per_class`` samples of every digit (the same x_T for every w),
  judged by the evaluation's digit classifier: accuracy on the asked class, fd_digits against the
  real train split, the mean per-class fd_digits, precision/recall.
* Caption model: every caption "<thin|thick> <upright|slanted> <digit>", ``per_caption`` samples
  each; the share whose digit, stroke width and slant (measured as the training captions were)
  match the caption.
* Speed: a pixel-space UNet with the LDM UNet's config (1 channel, 32 px instead of 4 × 8 × 8;
  attention at the same levels, so at f× the resolutions):
  training images/s (forward, backward, AdamW step; the LDM's includes encoding by the frozen
  first stage) and seconds per sample of DDIM-50 at w = 1 (the LDM's includes decoding).
* First stages (``--first_stages``): each checkpoint's kind (KL or VQ), its reconstructions of
  the 500 val digits in fp32 (MSE per pixel on [0, 1], PSNR from it), and for VQ the codebook's
  perplexity and the share of its codes the val digits use (every position of every image).
Writes ``<out>/ldm.{md,json}`` (``<out>/first_stages.{md,json}``), and to ``docs/ldm`` sample
grids (rows: classes or captions) and the first stage's reconstructions of 16 val digits (rows:
input, reconstruction).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from guided import per_class_fd

from diffusion_apps.checkpoint import load_module, read_checkpoint, resolve_device
from diffusion_apps.data.captions import (
    DIGITS,
    SLANT,
    SLANT_MEDIAN,
    THICKNESS,
    WIDTH_MEDIAN,
    stroke_width,
)
from diffusion_apps.data.captions import slant as measure_slant
from diffusion_apps.diffusion import ddim_sample
from diffusion_apps.evaluation import FeatureStats, digit_classifier, mean_cov, reference_features
from diffusion_apps.evaluation.digits import embedded_split
from diffusion_apps.evaluation.metrics import space_input
from diffusion_apps.images import save_grid
from diffusion_apps.methods import AutoencoderKL, LatentDiffusion
from diffusion_apps.nn import UNet, codebook_usage
from diffusion_apps.precision import autocast, sampling_precision


def digits_at(split: str, n: int, size: int) -> torch.Tensor:
    """The first ``n`` embedded digits of ``split`` at ``size`` px."""
    images = embedded_split(split)[0][:n]
    if images.shape[-1] != size:
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True)
    return images


def draw(model, n, key, wanted, w, steps, batch_size, precision, seed, device):
    """``n`` samples cycling through ``wanted`` labels or prompts, and the seconds it took."""
    gen = torch.Generator(device).manual_seed(seed)
    images, seconds = [], 0.0
    for start in range(0, n, batch_size):
        chosen = [wanted[i % len(wanted)] for i in range(start, min(n, start + batch_size))]
        tic = time.perf_counter()
        with autocast(device, precision):
            x = model.sample(len(chosen), steps=steps, generator=gen, scale=w,
                             **{key: chosen})  # fmt: skip
        seconds += time.perf_counter() - tic
        images.append(x.float().cpu())
    return torch.cat(images), seconds


def class_rows(model, args, device, real, real_labels):
    metric = FeatureStats("digits")
    metric.set_reference(*mean_cov(real), real)
    labels = list(range(10))
    asked = torch.arange(10).repeat(args.per_class)  # 0..9, 0..9, … as ``draw`` cycles
    rows = []
    for w in args.scales:
        x, seconds = draw(model, len(asked), "labels", labels, w, args.steps, args.batch_size,
                          args.precision, args.seed, device)  # fmt: skip
        metric.update(x, real=False, labels=asked)
        m = metric.compute()
        fake = torch.cat(list(metric.fake_features)).cpu()
        m["fd_digits_per_class"] = per_class_fd(real, real_labels, fake, asked)
        metric.reset()
        rows.append({"w": w, **m, "seconds_per_sample": seconds / len(asked)})
        print(rows[-1])
        by_class = x.unflatten(0, (args.per_class, 10)).transpose(0, 1)[:, :8].flatten(0, 1)
        save_grid(by_class, args.docs / f"classes_w{w:g}.png", nrow=min(8, args.per_class))
    return rows


def caption_rows(model, args, device):
    classifier = digit_classifier(progress=False).to(device).eval()
    captions = [f"{t} {s} {d}" for d, t, s in itertools.product(DIGITS, THICKNESS, SLANT)]
    n = len(captions) * args.per_caption
    rows = []
    for w in args.scales:
        x, seconds = draw(model, n, "prompts", captions, w, args.steps, args.batch_size,
                          args.precision, args.seed, device)  # fmt: skip
        index = torch.arange(n) % len(captions)
        digit = index // 4
        thick, slanted = (index % 4) // 2 == 1, index % 2 == 1
        with torch.no_grad():
            x = space_input(x, "digits")  # the 32 px the classifier and the medians know
            predicted = torch.cat([classifier(b.to(device)).argmax(1).cpu() for b in x.split(500)])
        got_thick = stroke_width(x) >= WIDTH_MEDIAN
        got_slanted = measure_slant(x) >= SLANT_MEDIAN
        row = {
            "w": w,
            "digit": (predicted == digit).float().mean().item(),
            "thickness": (got_thick == thick).float().mean().item(),
            "slant": (got_slanted == slanted).float().mean().item(),
            "all_three": ((predicted == digit) & (got_thick == thick) & (got_slanted == slanted))
            .float().mean().item(),
            "seconds_per_sample": seconds / n,
        }  # fmt: skip
        rows.append(row)
        print(row)
        grid = x.unflatten(0, (args.per_caption, len(captions))).transpose(0, 1)
        save_grid(grid[:12, :8].flatten(0, 1), args.docs / f"captions_w{w:g}.png", nrow=8)
    return rows


def throughput(step, batch: int, reps: int) -> float:
    """Images per second of ``step()`` (one training step on ``batch`` images), after 3 warm-ups."""
    for _ in range(3):
        step()
    tic = time.perf_counter()
    for _ in range(reps):
        step()
    return batch * reps / (time.perf_counter() - tic)


def speed_row(name, net, encode, decode, shape, model, images, context, args, device) -> dict:
    """Training images/s of ``net`` on ``encode(images)`` (forward, backward, AdamW step) and
    seconds per sample of DDIM with it, ``decode`` included."""
    schedule = model.schedule
    t = torch.randint(0, schedule.num_timesteps, (len(images),), device=device)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=0.0)  # the full cost, the weights unchanged

    def step():
        with autocast(device, args.precision):
            x0 = encode(images)
            noise = torch.randn_like(x0)
            eps = net(schedule.q_sample(x0, t, noise), t, context=context).float()
            loss = (eps - noise).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    ips = throughput(step, len(images), args.reps)
    net.eval()
    n = min(args.batch_size, 100)
    ctx = context[:n] if context is not None else None
    tic = time.perf_counter()
    with torch.no_grad(), autocast(device, args.precision):
        x_T = torch.randn((n, *shape), device=device)
        decode(ddim_sample(lambda x, tt, **c: net(x, tt, **c).float(), schedule, x_T,
                           timesteps=model.timesteps(args.steps), context=ctx))  # fmt: skip
    seconds = (time.perf_counter() - tic) / n
    params = sum(p.numel() for p in net.parameters())
    row = {"space": name, "shape": list(shape), "train_images_per_s": ips,
           "seconds_per_sample": seconds, "unet_params": params}  # fmt: skip
    print(row)
    return row


def speed_rows(model, ldm_path, args, device):
    """Latent vs pixel diffusion with the LDM UNet's config: training images/s and DDIM s/sample."""
    config = read_checkpoint(ldm_path)["hyper_parameters"]["unet"]["init_args"]
    ae = model.first_stage.autoencoder
    # The same levels, widths and blocks, with attention at the same levels: resolutions × f.
    attention = [r * ae.factor for r in config.get("attention_resolutions", ())]
    pixel = UNet(**{**config, "in_channels": ae.in_channels, "image_size": ae.image_size,
                    "attention_resolutions": attention}).to(device)  # fmt: skip
    images = digits_at("train", args.batch_size, ae.image_size).to(device)
    labels = torch.arange(len(images), device=device) % 10
    context = model.condition(labels).detach() if model.condition is not None else None
    common = (model, images, context, args, device)
    image_shape = (ae.in_channels, ae.image_size, ae.image_size)
    return [
        speed_row("latent (LDM)", model.unet, model.diffused, model.decode, ae.latent_shape,
                  *common),
        speed_row("pixel", pixel, lambda x: x, lambda x: x, image_shape, *common),
    ]  # fmt: skip


@torch.no_grad()
def first_stage_row(path: str, device: torch.device) -> dict:
    """Kind, training batches, val reconstruction MSE/PSNR (fp32) and, for VQ, codebook usage."""
    ckpt = read_checkpoint(path)
    ae = load_module(path, AutoencoderKL).to(device).float()
    x = digits_at("val", 10_000, ae.sample_shape[-1]).to(device)
    tic = time.perf_counter()
    z = torch.cat([ae.encode(b).mode() for b in x.split(100)])
    recon = torch.cat([ae.decode(b).clamp(-1, 1) for b in z.split(100)])
    seconds = time.perf_counter() - tic
    mse = float((x - recon).square().mean() / 4)  # on [0, 1] images
    q = ae.quantizer
    row = {"checkpoint": path, "kind": "KL" if q is None else "VQ",
           "latent": list(ae.latent_shape), "global_step": ckpt["global_step"], "n": len(x),
           "mse": mse, "psnr": -10 * math.log10(mse), "seconds": seconds}  # fmt: skip
    if q is not None:
        perplexity, used = codebook_usage(q.nearest(z), q.num_embeddings)
        row |= {"codes": q.num_embeddings, "perplexity": float(perplexity), "usage": float(used)}
    print(row)
    return row


def write_first_stages(out: Path, rows: list[dict], name: str) -> None:
    lines = [
        "# LDM first stages: KL against VQ",
        "",
        f"Reconstructions of the {rows[0]['n']} val digits in fp32 on {name} (MSE per pixel on "
        "[0, 1] images, PSNR from it); VQ codebook usage over every latent position of them. "
        "`global_step` counts both optimisers' steps once the discriminator is on.",
        "",
        "| checkpoint | kind | latent | global_step | MSE | PSNR (dB) | codes | perplexity "
        "| codes used | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vq = ("–",) * 3
        if r["kind"] == "VQ":
            vq = (r["codes"], f"{r['perplexity']:.1f}", f"{r['usage']:.1%}")
        lines.append(
            f"| `{r['checkpoint']}` | {r['kind']} | {'×'.join(map(str, r['latent']))} | "
            f"{r['global_step']} | {r['mse']:.2e} | {r['psnr']:.2f} | {vq[0]} | {vq[1]} | "
            f"{vq[2]} | {r['seconds']:.1f} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "first_stages.md").write_text("\n".join(lines) + "\n")
    (out / "first_stages.json").write_text(json.dumps(rows, indent=2) + "\n")


def write(out: Path, header: str, classes, captions, speed) -> None:
    lines = ["# Latent diffusion", "", header, ""]
    if classes:
        lines += [
            "## Class-conditional: guidance scale w",
            "",
            "| w | accuracy | fd_digits | fd_digits per class (mean) | precision | recall "
            "| s/sample |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['w']:g} | {r['accuracy']:.1%} | {r['fd_digits']:.1f} | "
            f"{r['fd_digits_per_class']:.1f} | {r['precision_digits']:.3f} | "
            f"{r['recall_digits']:.3f} | {r['seconds_per_sample']:.4f} |"
            for r in classes
        ]
    if captions:
        lines += [
            "",
            "## Caption-conditional: share of samples matching their caption",
            "",
            "| w | digit | thickness | slant | all three | s/sample |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['w']:g} | {r['digit']:.1%} | {r['thickness']:.1%} | {r['slant']:.1%} | "
            f"{r['all_three']:.1%} | {r['seconds_per_sample']:.4f} |"
            for r in captions
        ]
    if speed:
        lat, pix = speed
        lines += [
            "",
            "## Latent against pixel diffusion, same UNet config",
            "",
            "| space | UNet input | UNet parameters | training images/s | s/sample (DDIM) |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['space']} | {'×'.join(map(str, r['shape']))} | {r['unet_params'] / 1e6:.2f} M "
            f"| {r['train_images_per_s']:.1f} | {r['seconds_per_sample']:.4f} |"
            for r in speed
        ]
        lines += [
            "",
            "Speed-up of latent over pixel: training "
            f"{lat['train_images_per_s'] / pix['train_images_per_s']:.1f}×, sampling "
            f"{pix['seconds_per_sample'] / lat['seconds_per_sample']:.1f}×.",
        ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "ldm.md").write_text("\n".join(lines) + "\n")
    data = {"header": header, "classes": classes, "captions": captions, "speed": speed}
    (out / "ldm.json").write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ldm", default="runs/ldm/version_0/checkpoints/last.ckpt")
    parser.add_argument("--caption", default="runs/ldm_caption/version_0/checkpoints/last.ckpt")
    parser.add_argument("--first_stages", default="", help="comma-separated first-stage ckpts")
    parser.add_argument("--scales", default="1,2,4")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--per_class", type=int, default=50)
    parser.add_argument("--per_caption", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--reps", type=int, default=10, help="timed training steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/ldm")
    parser.add_argument("--docs", type=Path, default=Path("docs/ldm"))
    args = parser.parse_args()
    args.scales = [float(s) for s in args.scales.split(",")]

    device = resolve_device(args.device)
    args.precision = sampling_precision(args.precision, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    if args.first_stages:
        rows = [first_stage_row(p, device) for p in args.first_stages.split(",")]
        write_first_stages(Path(args.out), rows, name)
    if not args.ldm:
        return
    model = load_module(args.ldm, LatentDiffusion).to(device)
    real = reference_features("digits", "train", progress=False)
    real_labels = embedded_split("train")[1]
    val = digits_at("val", 16, model.first_stage.sample_shape[-1]).to(device)
    recon = model.first_stage.reconstruct(val).float().cpu()
    save_grid(torch.cat([val.cpu(), recon]), args.docs / "reconstructions.png", nrow=16)
    classes = class_rows(model, args, device, real, real_labels)
    captions = []
    if Path(args.caption).is_file():
        captions = caption_rows(load_module(args.caption, LatentDiffusion).to(device), args, device)
    speed = speed_rows(model, args.ldm, args, device)
    header = (
        f"Class model `{args.ldm}` ({10 * args.per_class} samples per w, {args.per_class} per "
        f"class), caption model `{args.caption}` ({args.per_caption} per caption × 40 captions); "
        f"DDIM-{args.steps}, seed {args.seed} (the same x_T for every w), {args.precision} "
        f"networks on {name}, batches of {args.batch_size}. Judged by the evaluation's digit "
        "classifier; features against the 4,500 real train digits (real val vs train: "
        "fd_digits 10.44). w = 1: plain conditional sampling; w ≠ 1 costs two network "
        "evaluations per step."
    )
    write(Path(args.out), header, classes, captions, speed)


if __name__ == "__main__":
    main()
