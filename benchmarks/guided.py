"""Classifier guidance and classifier-free guidance, measured against scale and sampler.

    python benchmarks/guided.py --ddpm runs/ddpm/version_0/checkpoints/last.ckpt \
        --classifier runs/guided_classifier/version_0/checkpoints/last.ckpt

``--cfg runs/ddpm_cfg/version_0/checkpoints/last.ckpt`` (a class-conditional DDPM trained with
label dropout, configs/ddpm_cfg.yaml) adds, in one table ``<out>/guided_cfg.{md,json}``: its
classifier-free guidance at Ho & Salimans's weights w (``--cfg_scales``; w = 0 the conditional
model unguided), and the classifier's guidance of it at w = 0 (ADM-G on a conditional model),
beside the classifier's guidance of the unconditional ``--ddpm`` (``--ddpm ""``: none; the
classifier is only needed for those rows, ``--classifier ""``: none).

For each sampler setting and scale, N samples per digit class (labels 0..9, the same x_T and
noise for every scale) are judged by the evaluation's clean digit classifier (not the guiding
one): accuracy on the target class, fd_digits against the real train split, the mean over
classes of the per-class fd_digits (each class's samples against that class's train digits),
precision/recall, and seconds per sample. Writes ``<out>/guided.{md,json}`` after every row.
On a GPU (``--device cuda``, the default when one is present) the full 1000-step ancestral
column takes minutes; on 2 CPU cores, hours: there pass e.g. ``--samplers ddim:50,ddpm:100``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusion_apps.checkpoint import load_module, resolve_device
from diffusion_apps.commands.common import parse_samplers
from diffusion_apps.evaluation import FeatureStats, frechet_distance, mean_cov, reference_features
from diffusion_apps.evaluation.digits import embedded_split
from diffusion_apps.images import save_grid
from diffusion_apps.methods import DDPM, ClassifierGuidedDDPM, NoisyClassifier
from diffusion_apps.precision import autocast, sampling_precision


def per_class_fd(real, real_labels, fake, fake_labels) -> float:
    """Mean over classes of the Fréchet distance between that class's real and fake features."""
    distances = []
    for c in range(10):
        r, f = real[real_labels == c], fake[fake_labels == c]
        distances.append(frechet_distance(*mean_cov(r), *mean_cov(f)))
    return sum(distances) / len(distances)


def run(guided, sampler, steps, scale, labels, batch_size, precision, seed, device):
    """Samples (on the CPU) for ``labels`` and the seconds the sampling took."""
    gen = torch.Generator(device).manual_seed(seed)
    images, seconds = [], 0.0
    for start in range(0, len(labels), batch_size):
        tic = time.perf_counter()
        with autocast(device, precision):
            chosen = labels[start : start + batch_size]
            x = guided.sample(
                len(chosen), labels=chosen, scale=scale, sampler=sampler, steps=steps,
                generator=gen,
            )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - tic
        images.append(x.float().cpu())
    return torch.cat(images), seconds


def write_table(out: Path, header: str, rows: list[dict], name: str = "guided") -> None:
    """``<out>/<name>.{md,json}``: a row per guided model, sampler and scale."""
    free = any("classifier-free" in r["model"] for r in rows)
    lines = [
        "# Classifier guidance" + (" and classifier-free guidance" if free else ""),
        "",
        header,
        "",
        "| model, guidance | sampler | s or w | accuracy | fd_digits | fd_digits per class (mean) "
        "| precision | recall | s/sample |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sampler']} | {r['scale']:g} | {r['accuracy']:.1%} | "
            f"{r['fd_digits']:.1f} | {r['fd_digits_per_class']:.1f} | "
            f"{r['precision_digits']:.3f} | {r['recall_digits']:.3f} | "
            f"{r['seconds_per_sample']:.4f} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")


def guided_models(args) -> list[tuple[str, str, object, list[float]]]:
    """(name, file tag, module, scales) of each guided model the arguments ask for: ``--cfg``'s
    classifier-free guidance (its own ``sample(scale=w)``), the classifier's guidance of it at
    w = 0 and of ``--ddpm``."""
    classifier = load_module(args.classifier, NoisyClassifier) if args.classifier else None
    cg_scales = [float(s) for s in args.scales.split(",")]
    models = []
    if args.cfg:
        cfg = load_module(args.cfg, DDPM)
        w = [float(w) for w in args.cfg_scales.split(",")]
        models.append(("CFG DDPM, classifier-free w", "cfg_w_", cfg, w))
        if classifier is not None:  # s = 0 would repeat the w = 0 row
            guided, scales = ClassifierGuidedDDPM(cfg, classifier), [s for s in cg_scales if s]
            models.append(("CFG DDPM at w = 0, classifier s", "cfg_cond_cg_", guided, scales))
    if args.ddpm and classifier is not None:
        ddpm = load_module(args.ddpm, DDPM)
        kind = "conditional" if ddpm.class_conditional else "unconditional"
        guided = ClassifierGuidedDDPM(ddpm, classifier)
        tag = "cfg_uncond_cg_" if args.cfg else ""
        models.append((f"{kind} DDPM, classifier s", tag, guided, cg_scales))
    if not models:
        raise SystemExit("guided.py: nothing to measure: give --ddpm and --classifier, or --cfg")
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ddpm", default="runs/ddpm/version_0/checkpoints/last.ckpt")
    parser.add_argument(
        "--classifier", default="runs/guided_classifier/version_0/checkpoints/last.ckpt"
    )
    parser.add_argument("--scales", default="0,1,2,5,10", help="classifier guidance s")
    parser.add_argument("--cfg", default="", help="a DDPM trained with label_dropout")
    parser.add_argument("--cfg_scales", default="0,1,3", help="Ho & Salimans w (0: unguided)")
    parser.add_argument("--samplers", default="ddim:50,ddpm:1000")
    parser.add_argument(
        "--per_class", type=int, default=150, help="≥ 129 for full-rank per-class FD"
    )
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/guided")
    args = parser.parse_args()

    device = resolve_device(args.device)
    args.precision = sampling_precision(args.precision, device)
    models = [(n, tag, m.to(device), sc) for n, tag, m, sc in guided_models(args)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    header = (
        f"DDPM `{args.ddpm or '-'}`, noisy classifier `{args.classifier or '-'}`"
        + (
            f", classifier-free-guidance DDPM `{args.cfg}` (scale: Ho & Salimans's w)"
            if args.cfg
            else ""
        )
        + f"; {args.per_class} samples per "
        f"class (N = {10 * args.per_class}), seed {args.seed}, {args.precision} networks on "
        f"{name}, batches of {args.batch_size}. Judged by the evaluation's digit classifier, "
        "features against the 4,500 real train digits (real val vs train: fd_digits 10.44)."
    )
    labels = torch.arange(10).repeat_interleave(args.per_class)
    real = reference_features("digits", "train", progress=False)
    real_labels = embedded_split("train")[1]
    metric = FeatureStats("digits")
    metric.set_reference(*mean_cov(real), real)
    out, table = Path(args.out), "guided_cfg" if args.cfg else "guided"
    rows = []
    for sampler, steps, _ in parse_samplers(args.samplers):
        for model_name, tag, guided, scales in models:
            for scale in scales:
                x, seconds = run(
                    guided, sampler, steps, scale, labels, args.batch_size, args.precision,
                    args.seed, device,
                )  # fmt: skip
                metric.update(x, real=False, labels=labels)
                m = metric.compute()
                fake = torch.cat(list(metric.fake_features)).cpu()
                m["fd_digits_per_class"] = per_class_fd(real, real_labels, fake, labels)
                metric.reset()
                row = {"model": model_name, "sampler": f"{sampler}-{steps}", "scale": scale, **m}
                row["seconds_per_sample"] = seconds / len(labels)
                rows.append(row)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
                rows_of_8 = x.unflatten(0, (10, args.per_class))[:, :8].flatten(0, 1)
                grid = out / f"{tag}{sampler}{steps}_s{scale:g}.png"
                save_grid(rows_of_8, grid, nrow=min(8, args.per_class))
                write_table(out, header, rows, table)


if __name__ == "__main__":
    main()
