"""fp32 against bf16-mixed on this CPU, side by side: configs/ddpm.yaml's training step (through
the CLI, as ``make demo`` runs it) and its sampling network call (ε̂ of a batch of 64), with the
CPU flags the automatic precision choice reads (diffusion_apps/precision.py).

    python benchmarks/precision.py --steps 20 --rounds 2

The precisions alternate within each round, so a machine that slows down mid-run slows both.
Writes ``<out>/precision.md`` and ``precision.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.reliability import REPO, config, fit  # noqa: E402
from benchmarks.speed import _cpu_name  # noqa: E402
from diffusion_apps import precision  # noqa: E402

PRECISIONS = ("32-true", "bf16-mixed")
NO_VALIDATION = ["--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]


@torch.no_grad()
def eps_seconds(ckpt: Path, mixed: bool, calls: int = 10) -> float:
    """Median seconds of one ε̂(x_t, t) call of the checkpoint's DDPM on a batch of 64."""
    from diffusion_apps.checkpoint import load_module

    model = load_module(ckpt).eval()
    x, t = torch.randn(64, *model.sample_shape), torch.full((64,), 500)
    times = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
        for _ in range(calls + 1):  # the first call warms up
            tic = time.perf_counter()
            model.eps(x, t)
            times.append(time.perf_counter() - tic)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/precision"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = {p: [] for p in PRECISIONS}
    sample = {p: [] for p in PRECISIONS}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(Path(tmp), args.steps)
        for r in range(args.rounds):
            for p in PRECISIONS:
                run = fit(cfg, f"{p}_{r}", args.steps, "--trainer.precision", p, *NO_VALIDATION)
                train[p].append(run["seconds"] / run["steps"])
                ckpt = Path(tmp) / f"runs/{p}_{r}/version_0/checkpoints/last.ckpt"
                sample[p].append(eps_seconds(ckpt, mixed=p == "bf16-mixed"))
    chosen, why = precision.choose("cpu")
    results = {
        "cpu": _cpu_name(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16_flags": sorted(precision.cpu_flags()),
        "threads": torch.get_num_threads(),
        "auto": {"precision": chosen, "why": why},
        "train_s_per_step": train,
        "eps_s_per_call": sample,
    }
    (out / "precision.json").write_text(json.dumps(results, indent=2))
    med = {k: {p: statistics.median(v) for p, v in d.items()} for k, d in
           (("train", train), ("eps", sample))}  # fmt: skip
    lines = [
        "# fp32 and bf16-mixed on this CPU (configs/ddpm.yaml, batch 64)",
        "",
        f"CPU: {results['cpu']}; torch capability {results['capability']}; native bf16 flags: "
        f"{', '.join(results['native_bf16_flags']) or 'none'}; {results['threads']} threads. "
        f"`python benchmarks/precision.py --steps {args.steps} --rounds {args.rounds}`; medians "
        f"over {args.rounds} rounds, the precisions alternating.",
        "",
        "| | fp32 (32-true) | bf16-mixed | bf16 speed-up |",
        "|---|---|---|---|",
        f"| training step, s | {med['train']['32-true']:.3f} | {med['train']['bf16-mixed']:.3f} "
        f"| {med['train']['32-true'] / med['train']['bf16-mixed']:.2f}x |",
        f"| sampling ε̂ call, s | {med['eps']['32-true']:.3f} | {med['eps']['bf16-mixed']:.3f} "
        f"| {med['eps']['32-true'] / med['eps']['bf16-mixed']:.2f}x |",
        "",
        f"The automatic choice here: **{chosen}** ({why}).",
    ]
    (out / "precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
