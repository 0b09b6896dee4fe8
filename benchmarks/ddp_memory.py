"""Where DDP stops fitting and FSDP starts to pay, for every UNet of configs/paper/.

Per GPU, DDP holds the whole training state of the network and the activations of its own batch;
FSDP (full sharding over N GPUs) holds 1/N of the state, the same activations, and one layer
gathered at a time:

    DDP:   M = S + b·A,     FSDP:  M ≈ S/N + b·A,     S = weights + gradients + Adam's moments
                                                           + the EMA copy,

A the bytes autograd saves for backward per image, b the batch per GPU. Both are counted, not
assumed: S on the meta device (no memory), as the bytes of the UNet's parameters, their
gradients, the state ``torch.optim.Adam`` allocates in one ``step`` and the EMA's fp32 copy; A on
the CPU, as the distinct storages saved by one training step of batch 1
(:func:`memory.step`, parameters left out; its memory table checks the count against the resident
set), with and without gradient checkpointing. fp32: bf16 autocast saves some activations at
half the bytes, so A is an upper bound for bf16-mixed. Not counted: the allocator's
fragmentation, cuDNN workspaces, NCCL buffers, DDP's gradient buckets (a second copy of the
gradients, 4 bytes a parameter, unless ``gradient_as_bucket_view``).

FSDP pays when it at least doubles the batch that fits a GPU of memory M:
(M − S/N)/(M − S) ≥ 2, i.e. S ≥ M/(2 − 1/N).

The largest batch per GPU of an ``--memory`` GiB device (default 80: H100/A100-80GB) under each,
and the memory of the config's own batch, go to ``benchmarks/results/ddp_memory.md`` and
``.json``. ``python benchmarks/ddp_memory.py`` (about 2 minutes on 2 cores: six batch-1 steps
twice).
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from memory import step
from speed import _cpu_name as cpu_name

from diffusion_apps.nn import UNet

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
GIB = 2**30
CONFIGS = [
    "ddpm_cifar10", "ddpm_celeba64", "ddpm_celebahq256", "adm_imagenet64", "diffae_ffhq128",
    "ldm_celebahq256",
]  # fmt: skip


def paper_config(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / "paper" / f"{name}.yaml").read_text())


def saved_bytes(options: dict, checkpointing: bool) -> int:
    """Bytes autograd saves in a batch-1 training step of the UNet (on the CPU: memory.py's)."""
    torch.manual_seed(0)
    unet = UNet(**options, gradient_checkpointing=checkpointing).train()
    saved: dict[int, int] = {}
    step(unet, 1, saved)
    return sum(saved.values())


def state_bytes(unet: UNet) -> dict[str, int]:
    """Bytes per GPU of the training state under DDP: weights, gradients, Adam's moments (what
    one ``Adam.step`` allocates), the EMA's fp32 copy."""
    weights = sum(p.nbytes for p in unet.parameters())
    for p in unet.parameters():
        p.grad = torch.empty_like(p)
    adam = torch.optim.Adam(unet.parameters(), lr=1e-4, foreach=False)
    adam.step()
    moments = sum(v.nbytes for s in adam.state.values() for v in s.values() if torch.is_tensor(v))
    return {"weights": weights, "gradients": weights, "adam": moments, "ema": weights}


def measure(name: str) -> dict:
    config = paper_config(name)
    options = config["model"]["init_args"]["unet"]["init_args"]
    with torch.device("meta"):
        unet = UNet(**options)
        states = state_bytes(unet)
    return {
        "config": name,
        "params": sum(p.numel() for p in unet.parameters()),
        "batch": config["data"]["init_args"]["batch_size"],
        "state_bytes": states,
        "saved_bytes_per_image": {
            "plain": saved_bytes(options, False), "checkpointed": saved_bytes(options, True)
        },
    }  # fmt: skip


def fits(memory: float, state: float, per_image: float) -> int:
    """The largest batch per GPU whose state and activations fit in ``memory`` bytes."""
    return max(int((memory - state) // per_image), 0)


def render(result: dict) -> str:
    n, memory = result["gpus"], result["memory_gib"] * GIB
    lines = [
        "# Where DDP stops fitting and FSDP starts to pay (configs/paper UNets)",
        "",
        f"{result['date']}; `python benchmarks/ddp_memory.py`, torch {result['torch']}: S "
        f"counted on the meta device, A in batch-1 steps on {result['cpu']}. Per GPU: state S "
        "= weights + gradients + Adam's moments + the EMA copy (fp32, 20 bytes a parameter); "
        "A = bytes autograd saves per image in one training step (fp32; bf16-mixed saves less). "
        f"DDP holds S, FSDP (full shard over N = {n}) S/N; both hold b·A. Largest batch per "
        f"{result['memory_gib']} GiB GPU = (memory − state) / A, without fragmentation, "
        "workspaces or DDP's gradient buckets (4 more bytes a parameter).",
        "",
        "| UNet (configs/paper) | params | S (GiB) | A plain (MiB/img) | A ckpt (MiB/img) | "
        "config batch/GPU | DDP at it (GiB) | max b, DDP | max b, FSDP | max b, DDP+ckpt | "
        "max b, FSDP+ckpt |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        s = sum(r["state_bytes"].values())
        a, c = (r["saved_bytes_per_image"][k] for k in ("plain", "checkpointed"))
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.1f} M | {s / GIB:.2f} | {a / 2**20:,.0f} | "
            f"{c / 2**20:,.0f} | {r['batch']} | {(s + r['batch'] * a) / GIB:,.1f} | "
            f"{fits(memory, s, a)} | {fits(memory, s / n, a)} | {fits(memory, s, c)} | "
            f"{fits(memory, s / n, c)} |"
        )
    largest = max(result["rows"], key=lambda r: r["params"])
    threshold = memory / (2 - 1 / n)
    s = sum(largest["state_bytes"].values())
    lines += [
        "",
        f"The largest, {largest['config']} ({largest['params'] / 1e6:.0f} M), holds "
        f"{s / GIB:.1f} GiB of state: FSDP over {n} GPUs frees {s * (1 - 1 / n) / GIB:.1f} GiB "
        f"a GPU, room for {s * (1 - 1 / n) / largest['saved_bytes_per_image']['plain']:.0f} "
        "more images of its activations (fp32); gradient checkpointing cuts every image's "
        f"instead. FSDP doubles the batch that fits once S ≥ M/(2 − 1/N) = "
        f"{threshold / GIB:.1f} GiB, {threshold / 20 / 1e9:.2f} B parameters at 20 bytes each: "
        "every UNet here is far below it, bound by its activations, so DDP (with "
        "checkpointing where the batch does not fit) is the strategy for all of them.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--gpus", type=int, default=8, help="N of FSDP's sharding")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "memory_gib": args.memory,
        "gpus": args.gpus,
        "rows": [measure(name) for name in CONFIGS],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ddp_memory.json").write_text(json.dumps(result, indent=1))
    (args.out / "ddp_memory.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
