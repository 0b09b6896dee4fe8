"""Peak memory of one training step with and without gradient checkpointing (ADM's
``use_checkpoint``, ``UNet(gradient_checkpointing=True)``) on the CPU.

Each setting runs in a fresh process that builds the UNet of a paper config (configs/paper/),
then runs two training steps (forward, MSE against noise, backward; no optimiser, whose state
is the same either way). Measured there:

- peak memory of the first step above the model and its gradients (allocated, zero, before
  the step, as a training loop that keeps them has them): the kernel's peak resident set
  (``VmHWM``), reset to the current RSS just before the step (``/proc/self/clear_refs``, Linux),
  minus that RSS. What the activations and backward's transients took from the system (glibc
  keeps small freed blocks), not only what tensors held;
- bytes autograd saved for backward in that step (distinct storages, parameters left out:
  the structural count tests/nn/test_nn_checkpointing.py asserts on);
- CPU seconds (``time.process_time``, all threads) and wall seconds of the second step, and the
  ratio of CPU seconds checkpointed / plain: on a shared machine the wall time also counts the
  other jobs.

Run ``python benchmarks/memory.py`` (under 5 minutes on 2 busy cores); results go to
``benchmarks/results/memory.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from diffusion_apps.nn import UNet

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
# (paper config, batch): the DDPM CelebA-HQ 256 UNet (113.7 M parameters) and ADM's
# ImageNet-64 one (295.9 M, class-conditional, dropout 0.1).
SETTINGS = [("ddpm_celebahq256", 1), ("adm_imagenet64", 2)]
MIB = 2**20


def unet_options(config: str) -> dict:
    """The UNet's init_args in ``configs/paper/<config>.yaml``."""
    text = (REPO / "configs" / "paper" / f"{config}.yaml").read_text()
    return yaml.safe_load(text)["model"]["init_args"]["unet"]["init_args"]


def kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def conditioning(model: UNet, batch: int) -> dict[str, torch.Tensor]:
    """Random inputs for what the UNet was built to take: labels, a vector, a context."""
    cond = {}
    if model.num_classes:
        cond["y"] = torch.randint(0, model.num_classes, (batch,))
    if model.cond_dim:
        cond["cond"] = torch.randn(batch, model.cond_dim)
    if model.context_dim:
        cond["context"] = torch.randn(batch, 77, model.context_dim)
    return cond


def step(model: UNet, batch: int, saved: dict[int, int] | None = None) -> None:
    """Forward, MSE against noise, backward; with ``saved``, record the distinct non-parameter
    storages autograd saves (data pointer → bytes)."""
    size = model.image_size
    x, noise = torch.randn(2, batch, model.in_channels, size, size)
    t = torch.randint(0, 1000, (batch,))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if saved is not None and storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x, t, **conditioning(model, batch))
    F.mse_loss(out[:, : model.in_channels], noise).backward()


def child(config: str, batch: int, checkpointing: bool) -> dict:
    """One setting, measured in this (fresh) process."""
    torch.manual_seed(0)
    model = UNet(**unet_options(config), gradient_checkpointing=checkpointing).train()
    for p in model.parameters():  # backward accumulates into them: no new allocation
        p.grad = torch.zeros_like(p)
    before = kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    saved: dict[int, int] = {}
    step(model, batch, saved)
    peak = kib("VmHWM") - before
    wall, cpu = time.perf_counter(), time.process_time()
    step(model, batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "config": config, "batch": batch, "checkpointing": checkpointing,
        "params": sum(p.numel() for p in model.parameters()), "peak_bytes": peak,
        "saved_bytes": sum(saved.values()), "cpu_seconds": cpu, "wall_seconds": wall,
    }  # fmt: skip


def measure(config: str, batch: int, checkpointing: bool, threads: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        json.dumps([config, batch, checkpointing]),
    ]
    out = subprocess.run(
        [*cmd, "--threads", str(threads)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Peak memory of a training step, with and without gradient checkpointing",
        "",
        f"{m['date']}; {m['cpu']}, torch {m['torch']} capability {m['capability']}, "
        f"{m['threads']} threads, fp32. The machine's 2 cores were shared with other jobs: wall "
        "times count them too, CPU seconds less so; the memory is unaffected. One step is "
        "forward + MSE against noise + backward, no optimiser. Peak: the process's peak RSS "
        "during the step above its RSS before, with the model and its gradients already "
        "allocated (add params x 4 bytes for gradients allocated in the step, x 8 more for "
        "Adam's moments, either way); saved: the activations autograd kept for backward. "
        "`python benchmarks/memory.py`.",
        "",
        "| UNet (configs/paper) | params | batch | checkpointing | peak (MiB) | saved (MiB) "
        "| CPU s | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.1f} M | {r['batch']} | "
            f"{'yes' if r['checkpointing'] else 'no'} | {r['peak_bytes'] / MIB:,.0f} | "
            f"{r['saved_bytes'] / MIB:,.0f} | {r['cpu_seconds']:.1f} | {r['wall_seconds']:.1f} |"
        )
    lines += [
        "",
        "| UNet | checkpointed / plain: peak | saved | CPU s |",
        "|---|---|---|---|",
    ]
    for config, ratio in result["ratios"].items():
        lines.append(
            f"| {config} | {ratio['peak']:.2f} | {ratio['saved']:.2f} | {ratio['cpu']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", help=argparse.SUPPRESS)  # [config, batch, checkpointing]
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from speed import _cpu_name

    rows, ratios = [], {}
    for config, batch in SETTINGS:
        plain, checkpointed = (measure(config, batch, c, args.threads) for c in (False, True))
        rows += [plain, checkpointed]
        ratios[config] = {
            key: checkpointed[field] / plain[field]
            for key, field in (("peak", "peak_bytes"), ("saved", "saved_bytes"),
                               ("cpu", "cpu_seconds"))
        }  # fmt: skip
        print(json.dumps(rows[-2:]), flush=True)
    machine = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": _cpu_name(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    result = {"machine": machine, "rows": rows, "ratios": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "memory.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
