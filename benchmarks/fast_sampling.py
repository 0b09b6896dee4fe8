"""Fast sampling, measured: sample quality against network evaluations (NFE) for one DDPM teacher,
its ODE solvers, the consistency model distilled from it, and one trained without a teacher.

    python benchmarks/fast_sampling.py --teacher runs/ddpm/version_0/checkpoints/last.ckpt \
        --consistency runs/consistency/version_0/checkpoints/last.ckpt \
        --consistency_training runs/consistency_training/version_0/checkpoints/last.ckpt

Any of the three may be left out. Runs ``python -m diffusion_apps eval`` on the checkpoints with
every setting of ``--samplers`` that each offers
(each setting on the same x_T, N samples, scored against the real train digits), then writes
``<out>/curve.md`` (the table, with wall seconds per 1,000 samples), ``<out>/curve.json`` and
``<out>/curve.png`` (fd_digits against NFE, one line per sampler), next to eval's own report.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SAMPLERS = (
    "ddpm:1000,ddim:100,ddim:50,ddim:20,ddim:10,ddim:2,ddim:1,"
    "dpmpp_2m:20:logsnr,dpmpp_2m:10:logsnr,dpmpp_2m:5:logsnr,"
    "consistency:1,consistency:2,consistency:4"
)
COLUMNS = ("fd_digits", "precision_digits", "recall_digits", "confidence", "class_entropy")


CT_LABEL = "consistency training"  # the sampler column of ConsistencyTraining's rows


def family(row: dict) -> str:
    """The curve a row belongs to: its sampler name without the spacing, "(logsnr)"."""
    return re.sub(r" \(.*\)$", "", row["sampler"])


def table(rows: list[dict], floor: dict) -> list[str]:
    lines = [
        "| sampler | NFE | fd_digits | precision | recall | confidence | class entropy "
        "| s / 1,000 samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in [floor, *rows]:
        m = row["metrics"]
        per_1000 = (
            "–" if row["seconds"] is None else f"{1000 * row['seconds'] / row['num_samples']:.0f}"
        )
        nfe = "–" if row["nfe"] is None else str(row["nfe"])
        cells = [f"{m[c]:.3g}" if c in m else "–" for c in COLUMNS]
        lines.append(f"| {row['sampler']} | {nfe} | " + " | ".join(cells) + f" | {per_1000} |")
    return lines


def verdict(rows: list[dict]) -> list[str]:
    """The issue's two questions, answered from the rows present."""
    by = {(family(r), r["nfe"]): r["metrics"]["fd_digits"] for r in rows}
    lines = []
    if ("consistency", 1) in by:
        few = {n: v for (f, n), v in by.items() if f == "ddim" and n <= 2}
        if few:
            best = min(few.values())
            lines.append(
                f"- Consistency, 1 step: fd_digits {by['consistency', 1]:.1f} against "
                f"{best:.1f} for the best DDIM at ≤ 2 NFE ({by['consistency', 1] / best:.2f}x)."
            )
    ct = [n for n in (1, 2, 4) if (CT_LABEL, n) in by]
    if ct:
        cd = [f"{by['consistency', n]:.1f}" for n in ct if ("consistency", n) in by]
        lines.append(
            f"- Consistency training, {' / '.join(map(str, ct))} steps: fd_digits "
            + " / ".join(f"{by[CT_LABEL, n]:.1f}" for n in ct)
            + (f" (distillation: {' / '.join(cd)})." if cd else ".")
        )
    if ("ddpm", 1000) in by:
        ref = by["ddpm", 1000]
        for n in (10, 20):
            if ("dpmpp_2m", n) in by:
                got = by["dpmpp_2m", n]
                lines.append(
                    f"- DPM-Solver++(2M), {n} NFE: fd_digits {got:.1f}, "
                    f"{100 * (got / ref - 1):+.0f}% against DDPM-1000's {ref:.1f} "
                    "(target: within +20%)."
                )
    return lines


def plot(rows: list[dict], floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(family(r) for r in rows):
        points = sorted((r["nfe"], r["metrics"]["fd_digits"]) for r in rows if family(r) == name)
        ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.axhline(floor, color="gray", linestyle="--", label="real val (floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("fd_digits (lower is better)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", help="the DDPM checkpoint")
    p.add_argument("--consistency", help="the consistency model distilled from it")
    p.add_argument("--consistency_training", help="a consistency model trained without teacher")
    p.add_argument("--samplers", default=SAMPLERS)
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--precision", choices=["auto", "32", "bf16"], default="auto")
    p.add_argument("--out", default="benchmarks/results/fast_sampling")
    args = p.parse_args(argv)
    named = {
        "teacher": args.teacher,
        "consistency model": args.consistency,
        "consistency training": args.consistency_training,
    }
    ckpts = [path for path in named.values() if path]
    if not ckpts:
        p.error("give at least one of --teacher, --consistency, --consistency_training")

    from diffusion_apps.commands import evaluate

    out = Path(args.out)
    evaluate(
        ckpt_paths=ckpts,
        num_samples=args.num_samples,
        samplers=args.samplers,
        out_dir=str(out),
        batch_size=args.batch_size,
        precision=args.precision,
    )
    report = json.loads((out / "eval.json").read_text())
    floor, *rows = report["rows"]
    floor["sampler"] = "real val (floor)"
    for row in rows:
        if row["method"] == "ConsistencyTraining":
            row["sampler"] = CT_LABEL
    md = [
        "# Quality against network evaluations",
        "",
        "; ".join(f"{name} `{path}`" for name, path in named.items() if path)
        + f"; N = {args.num_samples} samples per row, the same x_T for every row of a checkpoint. "
        "Protocol (from eval.md):",
        "",
        *[f"- {line}" for line in report["header"]],
        "",
        *table(rows, floor),
        "",
        *verdict(rows),
        "",
        "![fd_digits against NFE](curve.png)",
    ]
    (out / "curve.md").write_text("\n".join(md) + "\n")
    (out / "curve.json").write_text(json.dumps({"floor": floor, "rows": rows}, indent=2) + "\n")
    plot(rows, floor["metrics"]["fd_digits"], out / "curve.png")
    print(f"wrote {out / 'curve.md'}, curve.json and curve.png")


if __name__ == "__main__":
    main()
