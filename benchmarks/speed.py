"""Speed of our UNet next to diffusers' ``UNet2DModel`` and denoising-diffusion-pytorch's ``Unet``.

One process runs every contender interleaved (A B C A B C …, the order rotated each repetition)
on identical inputs, so the machine's drift hits all of them alike; each number is the median
(and min/max) over repetitions. Measured per shape:

- training images/s: forward + MSE loss + backward + AdamW step, batch 32 and 64;
- sampling ms per network call, batch 64, under ``torch.no_grad``;
- achieved GFLOP/s: FLOPs counted by ``FlopCounterMode`` (attention through the math kernel so
  its matmuls count), ×3 for a training step (forward + backward ≈ 3 forwards);
- peak memory: ``ru_maxrss`` of a fresh process started through ``sh`` (Linux carries a parent's
  peak RSS into a direct child) that builds one contender and runs it; on CUDA
  ``max_memory_allocated``;
- samplers' overhead per step apart from the network (an identity network): ours against
  diffusers' ``DDPMScheduler`` / ``DDIMScheduler``.

Run ``make bench`` (installs the ``bench`` extra: diffusers, denoising-diffusion-pytorch). The
networks are built from configs, so nothing is downloaded. Results go to
``benchmarks/results/<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).parent / "results"


@dataclasses.dataclass(frozen=True)
class Shape:
    """The DDPM CIFAR-10 layout (Ho et al. 2020) at a given width: four levels, two ResBlocks
    each, self-attention at 16x16 (and in the middle), 8-channel heads (diffusers' default)."""

    channels: int
    widths: tuple[int, int, int, int]
    size: int = 32
    head_dim: int = 8


SHAPES = {
    "mnist32": Shape(1, (32, 64, 64, 64)),
    "cifar32-half": Shape(3, (64, 128, 128, 128)),
    "cifar32": Shape(3, (128, 256, 256, 256)),  # the DDPM CIFAR-10 model: the GPU shape
}


def build_ours(s: Shape) -> nn.Module:
    from diffusion_apps.nn import UNet

    w = s.widths[0]
    return UNet(
        in_channels=s.channels, image_size=s.size, base_channels=w,
        channel_mult=[c // w for c in s.widths], num_res_blocks=2, attention_resolutions=(16,),
        num_head_channels=s.head_dim, num_groups=32,
    )  # fmt: skip


class Diffusers(nn.Module):
    """diffusers' ``UNet2DModel`` in the layout of the issue, returning a plain tensor."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(
            in_channels=s.channels, out_channels=s.channels, sample_size=s.size,
            block_out_channels=s.widths, layers_per_block=2, attention_head_dim=s.head_dim,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )  # fmt: skip

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t).sample


def build_lucidrains(s: Shape) -> nn.Module:
    """denoising-diffusion-pytorch's ``Unet`` at the same widths with full attention at 16x16.

    Its layout cannot match exactly: a 7x7 stem, two ResBlocks per level on the way up (ours and
    diffusers': three), linear attention at the other levels; its FLOPs are reported beside.
    """
    from denoising_diffusion_pytorch import Unet

    w = s.widths[0]
    return Unet(
        dim=w, dim_mults=tuple(c // w for c in s.widths), channels=s.channels,
        full_attn=(False, True, False, False), attn_heads=s.widths[1] // s.head_dim,
        attn_dim_head=s.head_dim, flash_attn=True,
    )  # fmt: skip


BUILDERS: dict[str, Callable[[Shape], nn.Module]] = {
    "ours": build_ours,
    "diffusers": Diffusers,
    "denoising-diffusion-pytorch": build_lucidrains,
}


@dataclasses.dataclass(frozen=True)
class Contender:
    """One network run one way: ``precision`` "fp32" or "bf16" (autocast, loss in fp32)."""

    library: str
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        extras = [self.precision] + ["channels_last"] * self.channels_last
        return f"{self.library} {'+'.join(extras + ['compile'] * self.compile)}"


OURS_CPU_DEFAULT = Contender("ours", "bf16")  # what configs/*.yaml use on CPU (README)


def contenders(device: str, compile_: bool) -> list[Contender]:
    """Ours and diffusers in fp32 and with each speed option; denoising-diffusion-pytorch fp32.

    Each option we turn on for ours is also turned on for diffusers in a row of its own, so
    every ratio has a like-for-like counterpart.
    """
    fast = ("fp32", True) if device == "cpu" else ("bf16", True)  # channels-last where it may pay
    runs = [Contender("ours"), Contender("ours", *fast), Contender("ours", "bf16")]
    runs += [Contender("diffusers"), Contender("diffusers", *fast), Contender("diffusers", "bf16")]
    runs.append(Contender("denoising-diffusion-pytorch"))
    if compile_:
        runs.insert(3, Contender("ours", "fp32" if device == "cpu" else "bf16", compile=True))
    return runs


class Runner:
    """A built contender: its network, optimizer and fixed inputs per batch size."""

    def __init__(self, c: Contender, shape: Shape, device: str, batches: tuple[int, ...]) -> None:
        torch.manual_seed(0)
        self.contender, self.device = c, torch.device(device)
        self.net = BUILDERS[c.library](shape).to(self.device)
        if c.channels_last:  # for ours the same as UNet(channels_last=True)
            self.net = self.net.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.net) if c.compile else self.net
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(1)
        self.inputs = {}
        for b in batches:
            x = torch.randn(b, shape.channels, shape.size, shape.size, generator=gen)
            t = torch.randint(0, 1000, (b,), generator=gen)
            target = torch.randn(x.shape, generator=gen)
            self.inputs[b] = [v.to(self.device) for v in (x, t, target)]  # NCHW, as data come

    def autocast(self):
        enabled = self.contender.precision == "bf16"
        return torch.autocast(self.device.type, torch.bfloat16, enabled=enabled)

    def train_step(self, batch: int) -> None:
        x, t, target = self.inputs[batch]
        with self.autocast():
            out = self.forward(x, t)
        F.mse_loss(out.float(), target).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample_step(self, batch: int) -> None:
        x, t, _ = self.inputs[batch]
        with self.autocast():
            self.forward(x, t)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def forward_flops(net: nn.Module, shape: Shape) -> int:
    """FLOPs of one forward on one image, attention counted through the math kernel."""
    net = net.cpu().float()
    x = torch.randn(1, shape.channels, shape.size, shape.size)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        net(x, torch.tensor([500]))
    return fc.get_total_flops()


WORKLOADS = {"train-32": ("train", 32), "train-64": ("train", 64), "sample-64": ("sample", 64)}


def time_workloads(
    runners: list[Runner], reps: int, iters: dict[str, int], warmup: int
) -> dict[str, dict[str, list[float]]]:
    """Seconds per step of every (workload, contender), ``reps`` interleaved repetitions."""
    times = {w: {r.contender.name: [] for r in runners} for w in WORKLOADS}
    for kind, batch in WORKLOADS.values():
        for r in runners:
            for _ in range(warmup):
                getattr(r, f"{kind}_step")(batch)
            r.sync()
    for rep in range(reps):
        for workload, (kind, batch) in WORKLOADS.items():
            order = runners[rep % len(runners) :] + runners[: rep % len(runners)]
            for r in order:
                step = getattr(r, f"{kind}_step")
                start = time.perf_counter()
                for _ in range(iters[kind]):
                    step(batch)
                r.sync()
                seconds = (time.perf_counter() - start) / iters[kind]
                times[workload][r.contender.name].append(seconds)
        print(f"  repetition {rep + 1}/{reps} done", flush=True)
    return times


def memory_child(args: argparse.Namespace) -> None:
    """Entry of the fresh process: build one contender, run a few steps, print peak memory."""
    c = Contender(**json.loads(args.memory_child))
    kind, batch = WORKLOADS[args.workload]
    r = Runner(c, SHAPES[args.shapes[0]], args.device, (batch,))
    for _ in range(3):
        getattr(r, f"{kind}_step")(batch)
    r.sync()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    cuda = torch.cuda.max_memory_allocated() if r.device.type == "cuda" else None
    print(json.dumps({"rss": peak, "cuda": cuda}))


def peak_memory(c: Contender, shape: str, workload: str, device: str, threads: int) -> dict:
    """Run ``memory_child`` through ``sh`` (not exec'd, so sh forks it) and read its report."""
    config = json.dumps(dataclasses.asdict(c))
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--memory-child", config,
        "--workload", workload, "--shapes", shape, "--device", device, "--threads", str(threads),
    ]  # fmt: skip
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in cmd)
    out = subprocess.run(
        ["sh", "-c", f"{quoted}; exit $?"], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- samplers' own overhead


def sampler_overhead(device: str, reps: int) -> dict[str, list[float]]:
    """Seconds per step of each sampler loop around an identity network, batch 64 of 1x32x32."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from diffusion_apps.diffusion import (
        NoiseSchedule,
        ddim_sample,
        ddpm_sample,
        timestep_subsequence,
    )

    dev = torch.device(device)
    schedule = NoiseSchedule().to(dev)
    x_T = torch.randn(64, 1, 32, 32, device=dev, generator=torch.Generator(dev).manual_seed(0))
    gen = torch.Generator(dev)

    def identity(x: Tensor, t: Tensor) -> Tensor:
        return x

    ddim_ts = timestep_subsequence(1000, 50)

    def ours_ddpm():
        ddpm_sample(identity, schedule, x_T, generator=gen.manual_seed(0))

    def ours_ddim():
        ddim_sample(identity, schedule, x_T, timesteps=ddim_ts)

    def diffusers_loop(scheduler, steps, **kw):
        scheduler.set_timesteps(steps)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(identity(x, t), t, x, **kw).prev_sample

    ddpm = DDPMScheduler(num_train_timesteps=1000)
    ddim = DDIMScheduler(num_train_timesteps=1000)
    loops = {
        "ours DDPM (1000 steps)": (ours_ddpm, 1000),
        "diffusers DDPMScheduler (1000 steps)": (
            lambda: diffusers_loop(ddpm, 1000, generator=gen.manual_seed(0)),
            1000,
        ),
        "ours DDIM (50 steps)": (ours_ddim, 50),
        "diffusers DDIMScheduler (50 steps)": (lambda: diffusers_loop(ddim, 50), 50),
    }
    times = {name: [] for name in loops}
    for fn, _ in loops.values():
        fn()
    for _ in range(reps):
        for name, (fn, steps) in loops.items():
            with torch.no_grad():
                start = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / steps)
    return times


# ---------------------------------------------------------------- report


def profile_top_ops(runner: Runner, batch: int, rows: int = 12) -> str:
    """torch.profiler's top ops (self time) of two training steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    runner.train_step(batch)
    with profile(activities=activities) as prof:
        for _ in range(2):
            runner.train_step(batch)
        runner.sync()
    key = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def machine(device: str) -> dict:
    import diffusers
    import lightning

    info = {
        "device": device,
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "denoising_diffusion_pytorch": _version("denoising_diffusion_pytorch"),
        "lightning": lightning.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist.replace("_", "-"))


def _range(values: dict, scale: float = 1.0, invert: bool = False, fmt: str = ".1f") -> str:
    """'median [min–max]' of a summary, optionally as ``scale / value`` (a rate)."""
    lo, mid, hi = (values[k] for k in ("min", "median", "max"))
    if invert:
        lo, mid, hi = scale / hi, scale / mid, scale / lo
    else:
        lo, mid, hi = scale * lo, scale * mid, scale * hi
    return f"{mid:{fmt}} [{lo:{fmt}}–{hi:{fmt}}]"


def paired_ratios(timings: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict]]:
    """Speed-up over diffusers fp32 per workload and contender: the ratio of the two step times
    within each repetition (they ran back to back, so the machine's drift cancels), summarised
    over repetitions."""
    return {
        w: {
            name: summary([b / x for b, x in zip(t["diffusers fp32"], xs, strict=True)])
            for name, xs in t.items()
        }
        for w, t in timings.items()
    }


def goal_lines(entry: dict, default: str) -> list[str]:
    """The issue's two goals: ours fp32, and ours with our defaults, over diffusers fp32."""
    r = entry["ratios"]
    return [
        f"- {name} over diffusers fp32, training batch {w.split('-')[1]}: "
        f"**{r[w][name]['median']:.2f}x** [{r[w][name]['min']:.2f}–{r[w][name]['max']:.2f}]"
        for name in ("ours fp32", default)
        for w in ("train-32", "train-64")
    ]


def markdown(result: dict) -> str:
    m = result["machine"]
    default = result["default"]
    lines = [
        f"# UNet speed on {m.get('gpu', m['cpu'])}",
        "",
        f"{m['date']}; {m['cpus']} CPUs, {m['torch_threads']} torch threads; python {m['python']}, "
        f"torch {m['torch']}, diffusers {m['diffusers']}, denoising-diffusion-pytorch "
        f"{m['denoising_diffusion_pytorch']}, lightning {m['lightning']}.",
        "",
        f"Every cell: median [min–max] over {result['reps']} interleaved repetitions in one "
        f"process. `{default}` is our default on this device. Speed-ups over diffusers fp32 are "
        "medians of the per-repetition ratios (back-to-back runs, so the machine's drift "
        "cancels). GFLOP/s = 3 x forward FLOPs x images/s. Peak RSS: a fresh process through `sh` "
        "building the net and running three training steps at batch 64.",
    ]
    for shape, r in result["shapes"].items():
        s = SHAPES[shape]
        lines += ["", f"## {shape}: {s.channels}x{s.size}x{s.size}, widths {s.widths}", ""]
        lines += goal_lines(r, default)
        lines += [
            "",
            "| contender | params (M) | GFLOP/fwd | train img/s b32 | train img/s b64 | "
            "train GFLOP/s b64 | sample ms/step b64 | peak RSS (MiB) | b64 / diffusers fp32 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, c in r["contenders"].items():
            t = {w: r["timings"][w][name] for w in WORKLOADS}
            gflop = c["flops"] / 1e9
            mem = f"{c['memory']['rss'] / 2**20:.0f}" if c["memory"] else "–"
            if c["memory"] and c["memory"].get("cuda"):
                mem += f" (CUDA {c['memory']['cuda'] / 2**20:.0f})"
            lines.append(
                f"| {name} | {c['params'] / 1e6:.2f} | {gflop:.3f} | "
                f"{_range(t['train-32'], 32, invert=True)} | "
                f"{_range(t['train-64'], 64, invert=True)} | "
                f"{3 * gflop * 64 / t['train-64']['median']:.0f} | "
                f"{_range(t['sample-64'], 1e3, fmt='.0f')} | {mem} | "
                f"{r['ratios']['train-64'][name]['median']:.2f}x |"
            )
        for name, table in r.get("profiles", {}).items():
            lines += ["", f"torch.profiler, self time of two training steps at batch 64, {name}:"]
            lines += ["", "```", table.strip(), "```"]
    step = next(iter(result["shapes"].values()))["timings"]["sample-64"]["ours fp32"]["median"]
    lines += [
        "",
        "## Samplers' overhead per step (identity network, batch 64 of 1x32x32)",
        "",
        f"| sampler loop | µs/step | % of ours' fp32 network step ({1e3 * step:.0f} ms) |",
        "|---|---|---|",
    ]
    for name, v in result["sampler_overhead"].items():
        share = 100 * v["median"] / step
        lines.append(f"| {name} | {_range(v, 1e6, fmt='.0f')} | {share:.3f}% |")
    loader = result.get("data_loader")
    if loader:
        lines += [
            "",
            "## Data loading",
            "",
            "The embedded digits' training loader (batch 64, `num_workers=0`): "
            f"{_range(loader, 1e3, fmt='.2f')} ms per batch, against the training step above.",
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Bar chart of training images/s (batch 64, median with min–max whiskers) per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = result["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, (shape, r) in zip(axes[0], shapes.items(), strict=True):
        names = list(r["contenders"])
        t = [r["timings"]["train-64"][n] for n in names]
        mid = [64 / x["median"] for x in t]
        err = [
            [m - 64 / x["max"] for m, x in zip(mid, t, strict=True)],
            [64 / x["min"] - m for m, x in zip(mid, t, strict=True)],
        ]
        colors = ["tab:blue" if n.startswith("ours") else "tab:gray" for n in names]
        ax.barh(names[::-1], mid[::-1], xerr=[e[::-1] for e in err], color=colors[::-1])
        ax.set_xlabel("training images/s, batch 64 (median, min–max)")
        ax.set_title(f"{shape}, {result['machine'].get('gpu', result['machine']['cpu'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loader_seconds_per_batch(reps: int) -> list[float]:
    """Seconds per batch of the default data module's training loader."""
    from diffusion_apps.data import ImageDataModule

    data = ImageDataModule(batch_size=64)
    data.setup("fit")
    times = []
    for _ in range(reps):
        loader = iter(data.train_dataloader())
        start = time.perf_counter()
        for _ in range(20):
            next(loader)
        times.append((time.perf_counter() - start) / 20)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", default=None, help=f"of {list(SHAPES)}")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--compile", action="store_true", help="add ours + torch.compile (fp32 on CPU, bf16 on GPU)"
    )
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", help="file stem under --out (default: the device)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--workload", default="train-64", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    gpu = args.device == "cuda"
    shapes = args.shapes or (["cifar32"] if gpu else ["mnist32", "cifar32-half"])
    iters = {"train": 5, "sample": 10} if gpu else {"train": 1, "sample": 2}
    result = {
        "machine": machine(args.device),
        "reps": args.reps,
        "default": OURS_CPU_DEFAULT.name,
        "shapes": {},
    }
    print(json.dumps(result["machine"]), flush=True)
    for shape in shapes:
        print(f"{shape}: building and warming up", flush=True)
        runs = contenders(args.device, args.compile)
        runners = [Runner(c, SHAPES[shape], args.device, (32, 64)) for c in runs]
        entry = {"contenders": {}, "timings": {}}
        timings = time_workloads(runners, args.reps, iters, warmup=3 if args.compile else 1)
        entry["timings"] = {w: {k: summary(v) for k, v in t.items()} for w, t in timings.items()}
        entry["ratios"] = paired_ratios(timings)
        entry["raw_seconds"] = timings
        if not args.no_profile:
            entry["profiles"] = {
                r.contender.name: profile_top_ops(r, 64)
                for r in runners
                if r.contender in (Contender("ours"), OURS_CPU_DEFAULT, Contender("diffusers"))
            }
        for r in runners:
            c = r.contender
            print(f"  peak memory of {c.name}", flush=True)
            entry["contenders"][c.name] = {
                "config": dataclasses.asdict(c),
                "params": sum(p.numel() for p in r.net.parameters()),
                "flops": forward_flops(BUILDERS[c.library](SHAPES[shape]), SHAPES[shape]),
                "memory": None
                if c.compile  # minutes of compilation again in the child
                else peak_memory(c, shape, "train-64", args.device, args.threads),
            }
        del runners
        result["shapes"][shape] = entry
    print("samplers' overhead", flush=True)
    result["sampler_overhead"] = {
        k: summary(v) for k, v in sampler_overhead(args.device, max(args.reps, 5)).items()
    }
    if not gpu:
        result["data_loader"] = summary(loader_seconds_per_batch(args.reps))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (args.name or args.device)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    plot(result, stem.with_suffix(".png"))
    print(markdown(result))
    print(f"wrote {stem}.md, {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
