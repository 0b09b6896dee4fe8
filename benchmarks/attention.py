"""Which attention kernel to run, measured: every way softmax(QKᵀ/√d)·V can be computed on the
attention shapes of our configs, forward + backward (training) and forward alone (sampling).

    python benchmarks/attention.py --name attention-<cpu>   # -> benchmarks/results/<name>.md

Kernels (q, k, v of shape (B, heads, L, d)):
- ``flash fp32``: ``F.scaled_dot_product_attention`` (its CPU flash kernel) on fp32 tensors;
- ``math fp32``: the same through ``SDPBackend.MATH`` (QKᵀ, softmax, ·V as separate ops);
- ``flash bf16``: SDPA on bf16 tensors (the kernel autocast would pick);
- ``bf16 -> flash fp32``: bf16 in, attended in fp32, bf16 out: ``nn.layers.attention`` under
  autocast on CPU, the two casts included;
- ``math bf16``: the math backend on bf16 tensors (bf16 matmuls, where AMX pays);
- ``bmm fp32`` / ``bmm bf16``: softmax(Q·Kᵀ/√d)·V as two matmuls and a softmax on contiguous
  tensors (fewer passes than the math backend's). Inside the UNet, whose q, k, v are strided
  views of one projection, bf16 bmm gave no gain over ``bf16 -> flash fp32`` at the mnist32
  shape (1.97 s against 2.03 s a training step; 1.93 s with contiguous copies).
Each cell is the median over interleaved repetitions in one process.

``--unet``: instead, our UNet's sampling call (speed.py's shapes, bf16 autocast, no gradients)
at batch 1, 16 and 64 with the attention ``nn.layers.attention`` picks on this CPU against
``bf16 -> flash fp32`` (its choice everywhere before AMX CPUs got the bf16 kernel), interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from speed import _cpu_name, _simd_flags
from torch.nn.attention import SDPBackend, sdpa_kernel

RESULTS = Path(__file__).parent / "results"

# (what uses it, (B, heads, L, d)): training batch 64, 16 at L = 1024
SHAPES = [
    ("configs/ddpm.yaml, 4x4 attention (2x2 patches)", (64, 2, 16, 32)),
    ("32-channel heads at 8x8 (64 ch)", (64, 2, 64, 32)),
    ("speed.py mnist32, 16x16 attention", (64, 8, 256, 8)),
    ("speed.py mnist32, 4x4 middle attention", (64, 8, 16, 8)),
    ("speed.py cifar32-half, 16x16 attention", (64, 16, 256, 8)),
    ("32-channel heads at 16x16 (64 ch)", (64, 2, 256, 32)),
    ("32-channel heads at 32x32 (64 ch)", (16, 2, 1024, 32)),
]


def flash(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def math(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def cast_to_fp32(q, k, v):
    from diffusion_apps.nn.layers import attention

    with torch.autocast("cpu", torch.bfloat16):
        return attention(q, k, v)


def bmm(q, k, v):
    """softmax(Q·Kᵀ/√d)·V as two matmuls and a softmax, the score matrix materialised."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))  # (B, heads, L, L_k)
    return torch.matmul(scores.softmax(-1), v)


KERNELS = {
    "flash fp32": (flash, torch.float32),
    "math fp32": (math, torch.float32),
    "flash bf16": (flash, torch.bfloat16),
    "bf16 -> flash fp32": (cast_to_fp32, torch.bfloat16),
    "math bf16": (math, torch.bfloat16),
    "bmm fp32": (bmm, torch.float32),
    "bmm bf16": (bmm, torch.bfloat16),
}


def native_kernels() -> dict:
    """The kernels worth timing here: without native bf16 (an AVX2-only CPU) the bf16 ones are
    emulated, minutes a call, and no default runs them."""
    from speed import default_contender

    if default_contender("cpu").precision == "bf16":
        return KERNELS
    return {name: kernel for name, kernel in KERNELS.items() if kernel[1] == torch.float32}


def timings(shape: tuple[int, ...], reps: int) -> dict[str, dict[str, float]]:
    """Median ms of each kernel, training (forward + backward) and sampling (forward)."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(shape, generator=gen) for _ in range(4)]
    out = {}
    for mode in ("train", "sample"):
        runs = {}
        for name, (fn, dtype) in native_kernels().items():
            q, k, v = (t.to(dtype).requires_grad_(mode == "train") for t in base[:3])
            grad = base[3].to(dtype)

            def step(fn=fn, q=q, k=k, v=v, grad=grad, mode=mode):
                if mode == "train":
                    fn(q, k, v).backward(grad)
                else:
                    with torch.no_grad():
                        fn(q, k, v)

            step()
            runs[name] = (step, [])
        for rep in range(reps):
            order = list(runs.items())
            order = order[rep % len(order) :] + order[: rep % len(order)]
            for _, (step, times) in order:
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
        out[mode] = {name: 1e3 * statistics.median(t) for name, (_, t) in runs.items()}
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    timed = list(result["rows"][0]["ms"]["train"])
    lines = [
        f"# Attention kernels on {m['cpu']}",
        "",
        f"{m['date']}; torch capability **{m['capability']}**, flags {' '.join(m['flags'])}; "
        f"{m['threads']} threads; torch {m['torch']}. Median ms over {result['reps']} "
        "interleaved repetitions; **bold**: the fastest of the row's precision (fp32 rows: the "
        "fp32 kernels; bf16 rows: the bf16-input kernels).",
        "",
        "| shape (B, heads, L, d) | use | mode | " + " | ".join(timed) + " |",
        "|---|---|---|" + "---|" * len(timed),
    ]
    for row in result["rows"]:
        for mode, ms in row["ms"].items():
            best = {
                dtype: min((n for n in timed if KERNELS[n][1] == dtype), key=ms.get)
                for dtype in {KERNELS[n][1] for n in timed}
            }
            cells = [f"**{ms[n]:.1f}**" if n in best.values() else f"{ms[n]:.1f}" for n in timed]
            lines.append(f"| {tuple(row['shape'])} | {row['use']} | {mode} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def unet_sampling(reps: int) -> list[dict]:
    """ms per sampling call of our UNet with :func:`nn.layers.attention` and with the fp32
    kernel forced, both under bf16 autocast and ``torch.no_grad``, medians of interleaved reps."""
    from speed import SHAPES as UNET_SHAPES
    from speed import build_ours

    from diffusion_apps.nn import layers

    def in_fp32(q, k, v):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)

    chosen = layers.attention
    paths = {"nn.layers.attention": chosen, "bf16 -> flash fp32": in_fp32}
    rows = []
    for name in ("mnist32", "cifar32-half"):
        shape = UNET_SHAPES[name]
        net = build_ours(shape).eval()
        for batch in (1, 16, 64):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(batch, shape.channels, 32, 32, generator=gen)
            t = torch.randint(0, 1000, (batch,), generator=gen)
            calls, times = max(1, 64 // batch), {k: [] for k in paths}
            try:
                for rep in range(reps + 1):  # the first is a warm-up
                    for label, fn in paths.items():
                        layers.attention = fn
                        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                            start = time.perf_counter()
                            for _ in range(calls):
                                net(x, t)
                        if rep:
                            times[label].append((time.perf_counter() - start) / calls)
            finally:
                layers.attention = chosen
            ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            print(name, batch, ms, flush=True)
            rows.append({"shape": name, "batch": batch, "ms": ms})
    return rows


def unet_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Our UNet's sampling call by attention path, {m['cpu']}",
        "",
        f"{m['date']}; torch capability **{m['capability']}**, flags {' '.join(m['flags'])}; "
        f"{m['threads']} threads. bf16 autocast, no gradients; median ms per call over "
        f"{result['reps']} interleaved repetitions.",
        "",
        "| shape | batch | nn.layers.attention | bf16 -> flash fp32 | speed-up |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        new, old = row["ms"]["nn.layers.attention"], row["ms"]["bf16 -> flash fp32"]
        lines.append(
            f"| {row['shape']} | {row['batch']} | {new:.1f} | {old:.1f} | {old / new:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", help="file stem under --out (default: attention-<capability>)")
    p.add_argument("--unet", action="store_true", help="the UNet's sampling call instead")
    args = p.parse_args(argv)
    capability = torch.backends.cpu.get_cpu_capability()
    result = {
        "machine": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": _cpu_name(),
            "capability": capability,
            "flags": _simd_flags(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "reps": args.reps,
        "rows": [],
    }
    stem = args.out / (args.name or f"attention-{capability.lower()}")
    if args.unet:
        result["rows"] = unet_sampling(args.reps)
        stem = stem.with_name(stem.name + "-unet")
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        stem.with_suffix(".md").write_text(unet_markdown(result))
        return print(unet_markdown(result))
    for use, shape in SHAPES:
        print(f"{shape}: {use}", flush=True)
        result["rows"].append({"use": use, "shape": shape, "ms": timings(shape, args.reps)})
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
