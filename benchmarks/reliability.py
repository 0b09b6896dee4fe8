"""Resume and DDP, measured on the real DDPM config (configs/ddpm.yaml, batch 64).

    python benchmarks/reliability.py --steps 40

1. Exact resume: ``fit`` for N steps in one go, and N/2 steps then ``--ckpt_path last`` for the
   rest, through the CLI as a user runs it; validation with the SampleQuality callback runs at
   N/2 (where the split run stops). Reports whether the final checkpoints match bit for bit
   (EMA and raw weights, AdamW moments) and the seconds of each run and of the restore.
2. DDP: the same N steps with 2 CPU processes (``--trainer.devices 2 --trainer.strategy ddp``,
   one thread each) against one process (two threads): training images per second.

Writes ``<out>/reliability.md`` and ``reliability.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from diffusion_apps import precision

REPO = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Prints the training seconds from the start of the second step to the end of training, and
    the seconds from process start to the first step (startup and checkpoint restore)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "first"):
            self.first = time.perf_counter()
            self.startup = time.time() - float(os.environ["BENCH_T0"])
            self.first_step = trainer.global_step
        elif not hasattr(self, "second"):
            self.second = time.perf_counter()
            self.second_step = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            seconds = time.perf_counter() - self.second
            steps = trainer.global_step - self.second_step
            line = {"startup": self.startup, "steps": steps, "seconds": seconds}
            print("STEPTIMER " + json.dumps(line), flush=True)


def config(root: Path, steps: int) -> Path:
    cfg = yaml.safe_load((REPO / "configs/ddpm.yaml").read_text())
    cfg["trainer"]["val_check_interval"] = steps // 2
    cfg["trainer"]["max_time"] = None
    callbacks = cfg["trainer"]["callbacks"]
    callbacks[:] = [c for c in callbacks if not c["class_path"].endswith("RichProgressBar")]
    for c in callbacks:
        if c["class_path"].endswith("SampleQuality"):
            c["init_args"] |= {"num_samples": 16, "batch_size": 16, "steps": 5}
    callbacks.append({"class_path": "benchmarks.reliability.StepTimer"})
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(root / "runs")
    path = root / "ddpm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(cfg: Path, name: str, steps: int, *extra: str, launcher=(sys.executable, "-m")) -> dict:
    command = [*launcher, "diffusion_apps", "fit", "--config", str(cfg)]
    command += ["--trainer.max_steps", str(steps), "--trainer.logger.init_args.name", name]
    env = os.environ | {"PYTHONPATH": str(REPO), "BENCH_T0": str(time.time())}
    tic = time.perf_counter()
    done = subprocess.run([*command, *extra], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    timer = [ln for ln in done.stdout.splitlines() if ln.startswith("STEPTIMER ")][-1]
    return {"wall": wall, **json.loads(timer.split(" ", 1)[1])}


def same_bits(a: Path, b: Path) -> dict:
    ca, cb = (torch.load(p, weights_only=True) for p in (a, b))
    report = {"global_step": [ca["global_step"], cb["global_step"]]}
    for key in ("state_dict", "current_model_state"):
        report[key] = all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key])
    sa, sb = (c["optimizer_states"][0]["state"] for c in (ca, cb))
    report["adamw"] = all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/reliability"))
    args = parser.parse_args()
    n, out = args.steps, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = config(root, n)
        last = "version_0/checkpoints/last.ckpt"
        whole = fit(cfg, "whole", n)
        first = fit(cfg, "split", n // 2, "--ckpt_path", "last")
        resumed = fit(cfg, "split", n, "--ckpt_path", "last")
        bits = same_bits(root / "runs/whole" / last, root / "runs/split" / last)
        one = fit(cfg, "one", n)
        ddp_env = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
        os.environ["OMP_NUM_THREADS"] = "1"
        two = fit(cfg, "ddp", n, *ddp_env)
        del os.environ["OMP_NUM_THREADS"]
    batch = 64
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "steps": n,
        "resume": {"whole": whole, "first_half": first, "resumed": resumed, "bits": bits},
        "ddp": {
            "one_process_images_per_s": one["steps"] * batch / one["seconds"],
            "two_processes_images_per_s": two["steps"] * 2 * batch / two["seconds"],
            "one": one,
            "two": two,
        },
    }
    (out / "reliability.json").write_text(json.dumps(results, indent=2))
    identical = all(bits[k] for k in ("state_dict", "current_model_state", "adamw"))
    ddp = results["ddp"]
    lines = [
        f"# Resume and DDP on configs/ddpm.yaml ({precision.choose('cpu')[0]}, batch 64 a process)",
        "",
        f"Machine: {results['machine']}; `python benchmarks/reliability.py --steps {n}`.",
        "",
        f"## Exact resume: {n} steps against {n // 2} + {n - n // 2}",
        "",
        "Validation (with SampleQuality: 16 DDIM-5 samples) runs at step "
        f"{n // 2}, where the split run stops and resumes with `--ckpt_path last`.",
        "",
        "| run | wall s | startup s (to the first step) | train s/step |",
        "|---|---|---|---|",
    ]
    for label, r in [("one go", whole), ("first half", first), ("resumed half", resumed)]:
        per_step = r["seconds"] / max(r["steps"], 1)
        lines.append(f"| {label} | {r['wall']:.1f} | {r['startup']:.1f} | {per_step:.3f} |")
    lines += [
        "",
        f"Final checkpoints (step {bits['global_step']}): EMA weights equal: "
        f"{bits['state_dict']}, raw weights equal: {bits['current_model_state']}, AdamW moments "
        f"equal: {bits['adamw']} — **{'bit-identical' if identical else 'NOT identical'}**.",
        "",
        "Startup is process start to the first training step: imports, the fd_digits reference "
        "features, the sanity check (64 DDIM-50 validation samples; Lightning skips it when "
        "resuming) and, resuming, reading the checkpoint and restoring every state.",
        "",
        "## DDP on the CPU",
        "",
        "| processes | threads each | images/s (training, from step 2) |",
        "|---|---|---|",
        f"| 1 | {torch.get_num_threads()} | {ddp['one_process_images_per_s']:.1f} |",
        f"| 2 (DDP, gloo) | 1 | {ddp['two_processes_images_per_s']:.1f} |",
        "",
    ]
    (out / "reliability.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
