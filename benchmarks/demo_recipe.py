"""Quality per CPU-minute of the main job: train DDPM recipes on the embedded digits and score
their checkpoints with fd_digits (DDIM-50, N = 500) against wall-clock minutes.

    python benchmarks/demo_recipe.py --recipes old new --minutes 15 --emulate avx2
    python benchmarks/demo_recipe.py --recipes old min_snr --steps 600 --every 200 \
        --trainer.limit_val_batches 0      # pilots: any further arguments go to `fit`

Each recipe is ``configs/ddpm.yaml`` with command-line overrides (``RECIPES``). A run trains
through the real CLI (``python -m diffusion_apps fit``) in a child process, checkpointing every
``--every`` steps; a checkpoint's minute is its file's mtime after the child started, so it
counts start-up, data loading and the run's own validations, as ``make demo`` would. Then one
``eval`` scores every checkpoint (EMA weights, DDIM-50, fp32, N = 500, the same x_T) and the
results go to ``<out>/<name>.{json,md,png}``.

``--emulate avx2`` runs training as an AVX2-only CPU would: torch's kernels dispatched at AVX2
(``ATEN_CPU_CAPABILITY``), oneDNN's convolutions and matmuls capped at AVX2
(``ONEDNN_MAX_CPU_ISA``) and fp32 (what ``precision: null`` picks where bf16 is emulated).
On a 2-core AVX512-BF16 Xeon this gives 1.33 s per ``configs/ddpm.yaml`` step in fp32 and
24 s in bf16, the 1.4 s and 26.5 s measured on a real AVX2-only EPYC. Scoring runs natively.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "demo_recipe"
MODEL = "--model.init_args."
UNET = MODEL + "unet.init_args."

# name -> overrides of configs/ddpm.yaml, as `fit` takes them
RECIPES: dict[str, list[str]] = {
    "old": [],
    "min_snr": [MODEL + "min_snr_gamma", "5"],
    "v_min_snr": [MODEL + "prediction", "v", MODEL + "min_snr_gamma", "5"],
    "cosine": [MODEL + "schedule.init_args.kind", "cosine"],
    "lr2e-3": [MODEL + "lr", "2e-3"],
    "batch32": ["--data.init_args.batch_size", "32"],
    "rb1_min_snr": [UNET + "num_res_blocks", "1", MODEL + "min_snr_gamma", "5"],
    "b32_min_snr": ["--data.init_args.batch_size", "32", MODEL + "min_snr_gamma", "5"],
    "v_min_snr_rb1": [UNET + "num_res_blocks", "1", MODEL + "prediction", "v"]
    + [MODEL + "min_snr_gamma", "5"],
    "v_min_snr_rb1_b32": [UNET + "num_res_blocks", "1", MODEL + "prediction", "v"]
    + [MODEL + "min_snr_gamma", "5", "--data.init_args.batch_size", "32"],
}

EMULATION = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    }
}


def run_config(recipe: str, out: Path, minutes: float, steps: int, every: int) -> Path:
    """configs/ddpm.yaml with the run's length, checkpoints every ``every`` steps (all kept) and
    its logs under ``out``."""
    config = yaml.safe_load((ROOT / "configs" / "ddpm.yaml").read_text())
    trainer = config["trainer"]
    trainer["max_steps"] = steps
    trainer["max_time"] = f"00:00:{int(minutes):02d}:{round(60 * (minutes % 1)):02d}"
    trainer["logger"]["init_args"].update(save_dir=str(out / "runs"), name=recipe, version=0)
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("Checkpoint"):
            callback["init_args"].update(every_n_train_steps=every, save_top_k=-1)
    path = out / "configs" / f"{recipe}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train(recipe: str, args: argparse.Namespace) -> list[dict]:
    """Train one recipe; (step, minutes) of each checkpoint it wrote."""
    config = run_config(recipe, args.out, args.minutes, args.steps, args.every)
    env = dict(os.environ, **EMULATION.get(args.emulate, {}))
    cmd = [sys.executable, "-m", "diffusion_apps", "fit", "--config", str(config)]
    cmd += RECIPES[recipe] + args.overrides
    if args.emulate:
        cmd += ["--trainer.precision", "32-true"]
    start = time.time()
    print(f"{recipe}: {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    folder = args.out / "runs" / recipe / "version_0" / "checkpoints"
    points = {}
    for path in [*folder.glob("*step=*.ckpt"), folder / "last.ckpt"]:
        # last.ckpt is the run's final step when max_time stopped it between two saves
        step = torch.load(path, map_location="cpu", weights_only=True)["global_step"]
        if step not in points:
            points[step] = {
                "step": step,
                "minutes": (path.stat().st_mtime - start) / 60,
                "checkpoint": str(path),
            }
    return [points[step] for step in sorted(points)]


def score(points: list[dict], out: Path, num_samples: int, precision: str) -> float:
    """fd_digits of every checkpoint (DDIM-50) into ``points``; returns the floor."""
    cmd = [
        sys.executable, "-m", "diffusion_apps", "eval",
        "--ckpt_paths", ",".join(p["checkpoint"] for p in points),
        "--samplers", "ddim:50", "--num_samples", str(num_samples), "--precision", precision,
        "--space", "digits", "--out_dir", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT)
    rows = json.loads((out / "eval.json").read_text())["rows"]
    fd = {r["checkpoint"]: r["metrics"]["fd_digits"] for r in rows}
    for p in points:
        p["fd_digits"] = fd[p["checkpoint"]]
    return next(r["metrics"]["fd_digits"] for r in rows if r["method"] == "FLOOR")


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# fd_digits (DDIM-50, N = {result['num_samples']}, sampled in "
        f"{result['eval_precision']}) against training minutes",
        "",
        f"{m['date']}; {m['cpu']}, capability {m['capability']}"
        + (f", emulating {m['emulate']} ({m['emulation']})" if m["emulate"] else "")
        + f"; {m['threads']} threads; precision {m['precision']}. "
        f"Real-data floor (val vs train): {result['floor']:.1f}.",
        "",
        "| recipe | overrides | step | minutes | fd_digits |",
        "|---|---|---|---|---|",
    ]
    for name, points in result["recipes"].items():
        overrides = " ".join(RECIPES[name] + result["overrides"]) or "configs/ddpm.yaml"
        for p in points:
            lines.append(
                f"| {name} | `{overrides}` | {p['step']} | {p['minutes']:.1f} | "
                f"{p['fd_digits']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in result["recipes"].items():
        ax.plot([p["minutes"] for p in points], [p["fd_digits"] for p in points], "o-", label=name)
    ax.axhline(result["floor"], color="gray", ls=":", label="real val vs train")
    ax.set_yscale("log")
    ax.set_xlabel("training minutes (wall clock, from launch)")
    ax.set_ylabel(f"fd_digits, DDIM-50, N = {result['num_samples']}")
    m = result["machine"]
    where = f"emulated {m['emulate']}" if m["emulate"] else m["capability"]
    ax.set_title(f"configs/ddpm.yaml recipes, 2-core CPU ({where})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine(args: argparse.Namespace) -> dict:
    import torch
    from speed import _cpu_name

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": _cpu_name(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "emulate": args.emulate,
        "emulation": " ".join(f"{k}={v}" for k, v in EMULATION.get(args.emulate, {}).items()),
        "threads": torch.get_num_threads(),
        "precision": "32-true" if args.emulate else "the config's (auto)",
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["old"], choices=list(RECIPES))
    p.add_argument("--minutes", type=float, default=15.0, help="max_time of each run")
    p.add_argument("--steps", type=int, default=-1, help="max_steps of each run (-1: no limit)")
    p.add_argument("--every", type=int, default=100, help="checkpoint every this many steps")
    p.add_argument("--emulate", choices=list(EMULATION), default=None)
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--eval_precision", choices=["32", "bf16"], default="32")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="demo_recipe", help="file stem of the results")
    args, args.overrides = p.parse_known_args(argv)  # the rest: `fit` overrides for every recipe
    result = {
        "machine": machine(args),
        "num_samples": args.num_samples,
        "eval_precision": args.eval_precision,
        "overrides": args.overrides,
        "recipes": {},
    }
    for recipe in args.recipes:
        points = train(recipe, args)
        result["floor"] = score(
            points, args.out / "eval" / recipe, args.num_samples, args.eval_precision
        )
        result["recipes"][recipe] = points
        stem = args.out / args.name
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        stem.with_suffix(".md").write_text(markdown(result))
        plot(result, stem.with_suffix(".png"))
        print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
