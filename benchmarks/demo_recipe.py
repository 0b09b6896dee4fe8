"""Quality per CPU-minute of the main job: train DDPM recipes on the embedded digits and score
their checkpoints with fd_digits (DDIM-50, N = 500) against wall-clock minutes.

    python benchmarks/demo_recipe.py --recipes old new --minutes 15 --emulate avx2
    python benchmarks/demo_recipe.py --recipes old min_snr --steps 600 --every 200 \
        --trainer.limit_val_batches 0      # pilots: any further arguments go to `fit`
    python benchmarks/demo_recipe.py --recipes old new v_min_snr_rb1_b32 --step_time 30 \
        --emulate avx2 --name seconds_avx2  # seconds per step
    R=benchmarks/results/demo_recipe; python benchmarks/demo_recipe.py \
        --compose $R/pilots/pilots.json --seconds $R/seconds_zen1.json \
        --final $R/final_zen1.json $R/final_zen3.json --to docs/ddpm_recipe  # one picture

Each recipe is ``configs/ddpm.yaml`` with command-line overrides (``RECIPES``). A run trains
through the real CLI (``python -m diffusion_apps fit``) in a child process, checkpointing every
``--every`` steps; a checkpoint's minute is its file's mtime after the child started, so it
counts start-up, data loading and the run's own validations, as ``make demo`` would. Then one
``eval`` scores every checkpoint (EMA weights, DDIM-50 sampled in ``--eval_precision``, fp32
by default, N = 500, the same x_T) and the results go to ``<out>/<name>.{json,md,png}``.

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
import statistics
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

# name -> overrides of configs/ddpm.yaml, as `fit` takes them ("new" is the config itself).
# The config before min-SNR gamma 1.5 was "gamma3"; before gamma 3 "beta2_0.99"; before Adam's
# beta2 = 0.99 "importance";
# before importance-sampled t "p2_attn4"; before 2x2 patches "v_min_snr_rb1"; before that "old".
# Pilots in benchmarks/results/demo_recipe/ keep these names.
GAMMA5 = [MODEL + "min_snr_gamma", "5.0"]  # every recipe before "gamma3" and "gamma1.5"
BETA2_999 = GAMMA5 + [MODEL + "adam_betas", "[0.9,0.999]"]  # every recipe before "beta2_0.99"
UNIFORM_T = BETA2_999 + [MODEL + "timestep_sampling", "uniform"]  # these drew t uniformly
PIXELS = UNIFORM_T + [UNET + "patch_size", "1", UNET + "attention_resolutions", "[8]"]
OLD = PIXELS + [
    MODEL + "prediction", "eps", MODEL + "min_snr_gamma", "null", UNET + "num_res_blocks", "2",
]  # fmt: skip
B32 = ["--data.init_args.batch_size", "32"]
RECIPES: dict[str, list[str]] = {
    "new": [],
    "old": OLD,
    "min_snr": OLD + [MODEL + "min_snr_gamma", "5"],
    "v_min_snr": OLD + [MODEL + "prediction", "v", MODEL + "min_snr_gamma", "5"],
    "rb1_min_snr": OLD + [UNET + "num_res_blocks", "1", MODEL + "min_snr_gamma", "5"],
    "v_min_snr_rb1": PIXELS,
    "v_min_snr_rb1_b32": PIXELS + B32,
    "rb1_lr2e-3": PIXELS + [MODEL + "lr", "2.0e-3"],
    "rb1_b32_lr1.4e-3": PIXELS + B32 + [MODEL + "lr", "1.4e-3"],
    # the UNet on 2x2 (4x4) patches folded into channels: every level at 1/4 (1/16) of its pixels
    "p2": UNIFORM_T + [UNET + "attention_resolutions", "[8]"],
    "p2_attn4": UNIFORM_T,  # attention at the 4x4 level, not the 8x8 one
    "p2_noattn": UNIFORM_T + [UNET + "attention_resolutions", "[]"],
    "p2_w64": UNIFORM_T + [UNET + "attention_resolutions", "[8]", UNET + "base_channels", "64"],
    "p2_b32": UNIFORM_T + [UNET + "attention_resolutions", "[8]"] + B32,
    # the lr decayed to 0 at --steps (the run's length): pilots are scored at their last step
    "cosine": UNIFORM_T + [MODEL + "lr_schedule", "cosine"],
    "linear_lr2e-3": UNIFORM_T + [MODEL + "lr_schedule", "linear", MODEL + "lr", "2.0e-3"],
    "b128_lr1.4e-3": UNIFORM_T + ["--data.init_args.batch_size", "128", MODEL + "lr", "1.4e-3"],
    "mult124": UNIFORM_T + [UNET + "channel_mult", "[1,2,4]"],
    "importance": BETA2_999,  # t drawn by the min-SNR weights
    "importance_linear_lr2e-3": BETA2_999
    + [MODEL + "lr_schedule", "linear", MODEL + "lr", "2.0e-3"],
    "noclip": BETA2_999 + ["--trainer.gradient_clip_val", "null"],  # no gradient-norm clipping
    "beta2_0.99": GAMMA5,  # Adam's second moment over ~100 steps
    "beta2_0.95": GAMMA5 + [MODEL + "adam_betas", "[0.9,0.95]"],
    "lr1.5e-3": GAMMA5 + [MODEL + "lr", "1.5e-3"],
    "gamma3": [MODEL + "min_snr_gamma", "3.0"],
    "gamma10": [MODEL + "min_snr_gamma", "10.0"],
    "gamma2": [MODEL + "min_snr_gamma", "2.0"],
    "gamma1.5": [],  # the pilots' name of "new"
    "gamma1": [MODEL + "min_snr_gamma", "1.0"],
    "gamma1.5_linear": [MODEL + "lr_schedule", "linear"],  # decayed to 0 at the run's end
    "gamma1.5_linear_lr2e-3": [MODEL + "lr_schedule", "linear", MODEL + "lr", "2.0e-3"],
    "noise_cosine": [MODEL + "schedule.init_args.kind", "cosine"],  # Nichol & Dhariwal's ᾱ_t
    "x0": [MODEL + "prediction", "x0"],  # the same min-SNR-γ loss in x0 space
    "p4": UNIFORM_T + [UNET + "patch_size", "4", UNET + "channel_mult", "[1,2]",
                UNET + "attention_resolutions", "[8]"],
}  # fmt: skip

# pilots whose step costs another recipe's: the loss and the parametrisation cost nothing
SAME_STEP = {
    "min_snr": "old", "v_min_snr": "old", "rb1_min_snr": "v_min_snr_rb1",
    "rb1_lr2e-3": "v_min_snr_rb1", "rb1_b32_lr1.4e-3": "v_min_snr_rb1_b32", "p2_attn4": "new",
    "cosine": "new", "linear_lr2e-3": "new", "importance": "new",
    "importance_linear_lr2e-3": "new", "noclip": "new", "beta2_0.99": "new",
    "beta2_0.95": "new", "lr1.5e-3": "new", "gamma3": "new", "gamma10": "new",
    "gamma2": "new", "gamma1.5": "new", "gamma1": "new", "gamma1.5_linear": "new",
    "gamma1.5_linear_lr2e-3": "new", "noise_cosine": "new", "x0": "new",
}  # fmt: skip

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
    hours, seconds = divmod(round(60 * minutes), 3600)
    trainer["max_time"] = f"00:{hours:02d}:{seconds // 60:02d}:{seconds % 60:02d}"
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


def step_seconds(recipe: str, args: argparse.Namespace) -> float:
    """Median seconds per training step of a recipe: a ``--step_time``-step run (no validation,
    a log line per step), the gaps between its TensorBoard events after the first five."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    quick = argparse.Namespace(**{**vars(args), "steps": args.step_time, "every": 10**6})
    quick.out = args.out / "step_time"
    quick.overrides = args.overrides + [
        "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
    ]  # fmt: skip
    train(recipe, quick)
    events = EventAccumulator(str(quick.out / "runs" / recipe / "version_0"))
    events.Reload()
    times = [e.wall_time for e in events.Scalars("train/loss")][5:]
    return statistics.median(b - a for a, b in zip(times[:-1], times[1:], strict=True))


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


def draw(curves: list[tuple], floor: float, xlabel: str, path: Path, title: str = "") -> None:
    """fd_digits (log scale) against minutes: ``curves`` of (label, minutes, fd, matplotlib
    format), the real-data floor, and the 15-minute / fd 30 target lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10.5, max(4.5, 1.0 + 0.2 * len(curves))))  # room for the legend
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 recipes, each its own colour
    for label, minutes, fd, fmt in curves:
        ax.plot(minutes, fd, fmt, label=label)
    ax.axhline(floor, color="gray", ls=":", label="real val vs train")
    ax.axhline(30, color="red", ls=":", lw=1, label="target: 30 in 15 min")
    ax.axvline(15, color="red", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fd_digits, DDIM-50, N = 500")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(result: dict, path: Path) -> None:
    m = result["machine"]
    where = f"emulated {m['emulate']}" if m["emulate"] else m["capability"]
    curves = [
        (name, [p["minutes"] for p in points], [p["fd_digits"] for p in points], "o-")
        for name, points in result["recipes"].items()
    ]
    draw(
        curves, result["floor"], "training minutes (wall clock, from launch)", path,
        f"configs/ddpm.yaml recipes, 2-core CPU ({where})",
    )  # fmt: skip


def compose(pilots: list[Path], seconds: Path, finals: list[Path], to: Path) -> None:
    """One picture and table of every recipe: pilot runs (trained elsewhere, any CPU) at
    steps x their measured seconds per step under ``seconds``' conditions, the ``finals`` (runs
    through the CLI on AVX2-only CPUs) each at its own wall clock, labelled with its CPU."""
    per_step = json.loads(seconds.read_text())
    runs = [json.loads(path.read_text()) for path in finals]
    first = runs[0]  # its floor and sampling precision head the picture and table
    m = per_step["machine"]
    where = f"{m['cpu']} capped at {m['emulate']}" if m["emulate"] else m["cpu"]
    lines = [
        "# fd_digits (DDIM-50, N = 500) against training minutes of configs/ddpm.yaml recipes",
        "",
        f"Minutes on 2 cores of an AVX2-only CPU: {where} ({m['emulation'] or 'native'}), "
        f"fp32, {m['threads']} threads. Pilot rows: trained elsewhere, placed at step x the "
        "recipe's median seconds per step measured there (no validation); final rows: that "
        f"run's own wall clock from launch on its own CPU, validations included. Samples "
        f"drawn in {'fp32' if first['eval_precision'] == '32' else first['eval_precision']}.",
        "",
        "| recipe | run | step | s/step | minutes | fd_digits |",
        "|---|---|---|---|---|---|",
    ]
    curves, unplaced = [], []
    for path in pilots:
        for name, points in json.loads(path.read_text())["recipes"].items():
            recipe = name.split(" (")[0]  # "importance (seed 1)": a second seed of a recipe
            s = per_step["step_seconds"].get(SAME_STEP.get(recipe, recipe))
            if s is None:  # its step was never timed on that CPU
                unplaced.append(name)
                continue
            minutes = [p["step"] * s / 60 for p in points]
            curves.append((f"{name} (pilot)", minutes, [p["fd_digits"] for p in points], "o--"))
            lines += [
                f"| {name} | pilot | {p['step']} | {s:.2f} | {t:.1f} | {p['fd_digits']:.1f} |"
                for p, t in zip(points, minutes, strict=True)
            ]
    for run in runs:
        where = f"{run['machine']['cpu']}, {run['machine']['date'][:10]}"
        for name, points in run["recipes"].items():
            fd = [p["fd_digits"] for p in points]
            curves.append((f"{name} (final: {where})", [p["minutes"] for p in points], fd, "s-"))
            lines += [
                f"| {name} | final: {where} | {p['step']} | – | {p['minutes']:.1f} | "
                f"{p['fd_digits']:.1f} |"
                for p in points
            ]
    if unplaced:
        lines += ["", f"Not placed (no seconds per step measured there): {', '.join(unplaced)}."]
    xlabel = "training minutes, 2 cores, AVX2-only (fp32)"
    draw(curves, first["floor"], xlabel, to.with_suffix(".png"))
    to.with_suffix(".md").write_text("\n".join(lines) + "\n")


def machine(args: argparse.Namespace) -> dict:
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
    p.add_argument(
        "--step_time", type=int, default=0,
        help="only measure each recipe's seconds per step over this many steps",
    )  # fmt: skip
    p.add_argument("--compose", type=Path, nargs="+", help="pilot results to draw with --final")
    p.add_argument("--final", type=Path, nargs="+", help="final runs' results (--compose)")
    p.add_argument("--seconds", type=Path, help="a --step_time result (--compose)")
    p.add_argument("--to", type=Path, help="file stem of the composed picture and table")
    args, args.overrides = p.parse_known_args(argv)  # the rest: `fit` overrides for every recipe
    if args.compose:
        return compose(args.compose, args.seconds, args.final, args.to)
    result = {
        "machine": machine(args),
        "num_samples": args.num_samples,
        "eval_precision": args.eval_precision,
        "overrides": args.overrides,
        "recipes": {},
    }
    if args.step_time:
        result["step_seconds"] = {r: step_seconds(r, args) for r in args.recipes}
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result["step_seconds"], indent=1))
        return
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
