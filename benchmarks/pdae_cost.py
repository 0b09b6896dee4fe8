"""PDAE's training cost against DiffAE's (PDAE's efficiency claim, on our data).

    python benchmarks/pdae_cost.py --pdae_run runs/pdae/version_0 \
        --diffae runs/diffae/version_0/checkpoints/last.ckpt

Every checkpoint the PDAE run kept (configs/pdae.yaml saves one each 250 steps) reconstructs
the first ``--num_images`` val digits with inferred x_T (the module's own DDIM steps, fp32),
as does the final DiffAE; the report gives the first PDAE step, and the training wall time to
it (read from the run's TensorBoard events, validations included), whose MSE is at or below
DiffAE's final MSE. PDAE's cost excludes its pretrained DDPM (``make demo``); DiffAE trains its
own decoder. Writes ``<out>/cost.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_apps.checkpoint import load_module
from diffusion_apps.evaluation.digits import embedded_split
from diffusion_apps.evaluation.reconstruction import ReconstructionMetrics
from diffusion_apps.methods import PDAE, DiffAE


def wall_minutes(run_dir: Path) -> dict[int, float]:
    """Minutes from the run's first event to each logged ``train/loss`` step."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    start = events.FirstEventTimestamp()
    return {e.step + 1: (e.wall_time - start) / 60 for e in events.Scalars("train/loss")}


def minutes_at(step: int, minutes: dict[int, float]) -> float:
    """The wall time at the logged step nearest to ``step``."""
    return minutes[min(minutes, key=lambda s: abs(s - step))]


def reconstruction(module, images: torch.Tensor, batch_size: int) -> dict[str, float]:
    metric = ReconstructionMetrics()
    with torch.no_grad():
        for x in images.split(batch_size):
            metric.update(module.reconstruct(x), x)
    return {k: float(v) for k, v in metric.compute().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdae_run", default="runs/pdae/version_0")
    parser.add_argument("--diffae", default="runs/diffae/version_0/checkpoints/last.ckpt")
    parser.add_argument("--num_images", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/pdae")
    args = parser.parse_args()
    images = embedded_split("val")[0][: args.num_images]

    pdae_run = Path(args.pdae_run)
    ckpts = {
        int(m.group(1)): p
        for p in (pdae_run / "checkpoints").glob("*.ckpt")
        if (m := re.search(r"step=(\d+)", p.name))
    }
    if not ckpts:
        raise SystemExit(f"{pdae_run}/checkpoints holds no step=N checkpoints")
    pdae_minutes = wall_minutes(pdae_run)
    diffae = load_module(args.diffae, DiffAE)
    diffae_minutes = wall_minutes(Path(args.diffae).parents[1])
    target = reconstruction(diffae, images, args.batch_size)
    diffae_step = max(diffae_minutes)  # its last.ckpt: the end of the run
    rows = [{"method": "DiffAE", "step": diffae_step,
             "minutes": minutes_at(diffae_step, diffae_minutes), **target}]  # fmt: skip
    print(rows[-1])
    for step in sorted(ckpts):
        metrics = reconstruction(load_module(ckpts[step], PDAE), images, args.batch_size)
        rows.append(
            {"method": "PDAE", "step": step, "minutes": minutes_at(step, pdae_minutes), **metrics}
        )
        print(rows[-1])
    reached = [r for r in rows[1:] if r["mse"] <= target["mse"]]
    verdict = (
        f"PDAE first reaches DiffAE's final MSE ({target['mse']:.3e}, {rows[0]['step']} steps, "
        f"{rows[0]['minutes']:.1f} min) at step {reached[0]['step']}, after "
        f"{reached[0]['minutes']:.1f} min of training."
        if reached
        else f"PDAE does not reach DiffAE's final MSE ({target['mse']:.3e}) within "
        f"{max(ckpts)} steps; its best is {min(r['mse'] for r in rows[1:]):.3e}."
    )
    lines = [
        "# PDAE's training cost against DiffAE's",
        "",
        f"Reconstructions with inferred x_T of the first {len(images)} val digits (fp32, the "
        "modules' own DDIM steps; MSE on [0, 1]). Minutes: training wall time to that step "
        "on this machine, validations included; PDAE's excludes its pretrained DDPM.",
        "",
        verdict,
        "",
        "| method | step | minutes | mse | psnr | ssim |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['method']} | {r['step']} | {r['minutes']:.1f} | {r['mse']:.3e} | "
            f"{r['psnr']:.2f} | {r['ssim']:.4f} |"
            for r in rows
        ),
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.md").write_text("\n".join(lines) + "\n")
    (out / "cost.json").write_text(json.dumps({"verdict": verdict, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
