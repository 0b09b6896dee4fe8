"""Speed of our UNet next to diffusers' ``UNet2DModel`` and denoising-diffusion-pytorch's ``Unet``.

One process runs every contender interleaved (A B C A B C …, the order rotated each repetition)
on identical inputs, so the machine's drift hits all of them alike; each number is the median
(and min/max) over repetitions. Measured per shape:

- training images/s: forward + MSE loss + backward + AdamW step, batch 32 and 64;
- sampling ms per network call, batch 1, 16 and 64, under ``torch.no_grad``, the calls of a
  repetition in one autocast context as a sampling loop makes them;
- achieved GFLOP/s: FLOPs counted by ``FlopCounterMode`` (attention through the math kernel so
  its matmuls count), ×3 for a training step (forward + backward ≈ 3 forwards);
- peak memory: ``ru_maxrss`` of a fresh process started through ``sh`` (Linux carries a parent's
  peak RSS into a direct child) that builds one contender and runs it; on CUDA
  ``max_memory_allocated``;
- samplers' overhead per step apart from the network (an identity network): ours against
  diffusers' ``DDPMScheduler`` / ``DDIMScheduler``.

Contenders: ours, diffusers (fp32, bf16, channels-last), guided-diffusion's ``UNetModel`` and
denoising-diffusion-pytorch (fp32). Every result names the machine: the CPU, torch's dispatch
capability (and any ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA`` cap), its SIMD flags, the
threads, and the measured GEMM GFLOP/s that the achieved GFLOP/s are a share of.

Run ``make bench`` (installs the ``bench`` extra: diffusers, denoising-diffusion-pytorch). The
networks are built from configs, so nothing is downloaded. Results go to
``benchmarks/results/<name>.md`` and ``.json``.
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
    """A UNet layout every contender can express: by default the DDPM CIFAR-10 one (Ho et al.
    2020) at a given width, four levels of two ResBlocks, self-attention at 16x16 (and in the
    middle), 8-channel heads (diffusers' default)."""

    channels: int
    widths: tuple[int, ...]
    size: int = 32
    head_dim: int = 8
    res_blocks: int = 2
    attention: tuple[int, ...] = (16,)  # resolutions with self-attention

    def resolutions(self) -> list[int]:
        return [self.size >> level for level in range(len(self.widths))]

    def attends(self) -> list[bool]:
        return [r in self.attention for r in self.resolutions()]


SHAPES = {
    "mnist32": Shape(1, (32, 64, 64, 64)),
    "cifar32-half": Shape(3, (64, 128, 128, 128)),
    # the DDPM CIFAR-10 layout: GPU (38.3 M: ADM's scale-shift norm doubles the time
    # projections of the original's 35.7 M)
    "cifar32": Shape(3, (128, 256, 256, 256)),
    # ADM's ImageNet-64 layout (Dhariwal & Nichol 2021), unconditional: GPU
    "adm64": Shape(3, (192, 384, 576, 768), 64, 64, 3, (32, 16, 8)),
}


def build_ours(s: Shape) -> nn.Module:
    from diffusion_apps.nn import UNet

    w = s.widths[0]
    return UNet(
        in_channels=s.channels, image_size=s.size, base_channels=w,
        channel_mult=[c // w for c in s.widths], num_res_blocks=s.res_blocks,
        attention_resolutions=s.attention, num_head_channels=s.head_dim, num_groups=32,
    )  # fmt: skip


class Diffusers(nn.Module):
    """diffusers' ``UNet2DModel`` in the layout of the issue, returning a plain tensor."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(
            in_channels=s.channels, out_channels=s.channels, sample_size=s.size,
            block_out_channels=s.widths, layers_per_block=s.res_blocks,
            attention_head_dim=s.head_dim,
            down_block_types=tuple(f"{'Attn' * a}DownBlock2D" for a in s.attends()),
            up_block_types=tuple(f"{'Attn' * a}UpBlock2D" for a in reversed(s.attends())),
        )  # fmt: skip

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t).sample


class Guided(nn.Module):
    """openai/guided-diffusion's ``UNetModel`` (guided-diffusion-sdk) in the same layout: ADM's
    scale-shift norm, attention at 16x16 in 8-channel heads (its QKV einsum), fp32 weights."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        from guided_diffusion.unet import UNetModel

        w = s.widths[0]
        self.net = UNetModel(
            image_size=s.size, in_channels=s.channels, model_channels=w, out_channels=s.channels,
            num_res_blocks=s.res_blocks, dropout=0.0,
            attention_resolutions=tuple(s.size // r for r in s.attention),
            channel_mult=tuple(c // w for c in s.widths), num_head_channels=s.head_dim,
            use_scale_shift_norm=True,
        )  # fmt: skip

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t)


def build_lucidrains(s: Shape) -> nn.Module:
    """denoising-diffusion-pytorch's ``Unet`` at the same widths with full attention where the
    shape attends.

    Its layout cannot match exactly: a 7x7 stem, two ResBlocks per level on the way up (ours and
    diffusers': three), linear attention at the other levels; its FLOPs are reported beside.
    """
    from denoising_diffusion_pytorch import Unet

    w = s.widths[0]
    return Unet(
        dim=w, dim_mults=tuple(c // w for c in s.widths), channels=s.channels,
        full_attn=tuple(s.attends()), attn_heads=tuple(c // s.head_dim for c in s.widths),
        attn_dim_head=s.head_dim, flash_attn=True,
    )  # fmt: skip


BUILDERS: dict[str, Callable[[Shape], nn.Module]] = {
    "ours": build_ours,
    "diffusers": Diffusers,
    "guided-diffusion": Guided,
    "denoising-diffusion-pytorch": build_lucidrains,
}


@dataclasses.dataclass(frozen=True)
class Contender:
    """One network run one way: ``precision`` "fp32" or "bf16" (autocast, loss in fp32)."""

    library: str
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False  # torch.compile(mode="reduce-overhead"): CUDA graphs replayed

    @property
    def compiled(self) -> bool:
        return self.compile or self.cuda_graphs

    @property
    def name(self) -> str:
        extras = [self.precision] + ["channels_last"] * self.channels_last
        extras += ["compile"] * self.compile + ["cuda_graphs"] * self.cuda_graphs
        return f"{self.library} {'+'.join(extras)}"


def default_contender(device: str) -> Contender:
    """What configs/*.yaml (``precision: null``) run on a CPU of this dispatch capability: bf16
    where it is native, else fp32. Under an ``ATEN_CPU_CAPABILITY`` cap below AVX512 the
    CLI's choice still reads the real CPU's flags (and would pick emulated bf16); the fp32 row
    is what a real CPU of that capability gets."""
    from diffusion_apps.precision import choose

    native = choose(device)[0] == "bf16-mixed"
    if device == "cpu":
        native &= torch.backends.cpu.get_cpu_capability() == "AVX512"
    return Contender("ours", "bf16" if native else "fp32")


def contenders(
    device: str, compile_: bool, cuda_graphs: bool = False, bf16: bool = True
) -> list[Contender]:
    """Ours and diffusers in fp32 and with each speed option; guided-diffusion and
    denoising-diffusion-pytorch in fp32. ``bf16=False`` drops the bf16 rows (a CPU that
    emulates bf16 runs them 10–20x slower, and our configs pick fp32 there).

    Each option we turn on for ours is also turned on for diffusers in a row of its own, so
    every ratio has a like-for-like counterpart.
    """
    fast = [("fp32", True), ("bf16", True)] if device == "cpu" else [("bf16", True)]
    variants = [("fp32", False), *fast, ("bf16", False)]  # channels-last where it may pay
    variants = [v for v in variants if bf16 or v[0] == "fp32"]
    runs = [Contender(lib, *v) for lib in ("ours", "diffusers") for v in variants]
    runs += [Contender("guided-diffusion"), Contender("denoising-diffusion-pytorch")]
    if compile_:
        precision = "fp32" if device == "cpu" else "bf16"
        runs.insert(len(variants), Contender("ours", precision, compile=True))
    if cuda_graphs:
        runs.insert(len(variants), Contender("ours", "bf16", cuda_graphs=True))
    return runs


class Runner:
    """A built contender: its network, optimizer and fixed inputs per batch size."""

    def __init__(self, c: Contender, shape: Shape, device: str, batches: tuple[int, ...]) -> None:
        torch.manual_seed(0)
        self.contender, self.device = c, torch.device(device)
        self.net = BUILDERS[c.library](shape).to(self.device)
        if c.channels_last:  # for ours the same as UNet(channels_last=True)
            self.net = self.net.to(memory_format=torch.channels_last)
        mode = "reduce-overhead" if c.cuda_graphs else None
        self.forward = torch.compile(self.net, mode=mode) if c.compiled else self.net
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
    def sample_steps(self, batch: int, n: int) -> None:
        """``n`` network calls in one autocast context, as a sampling loop makes them (ours cast
        the weights to bf16 once per loop, not once per call)."""
        x, t, _ = self.inputs[batch]
        with self.autocast():
            for _ in range(n):
                self.forward(x, t)

    def steps(self, kind: str, batch: int, n: int) -> None:
        """``n`` training steps or sampling calls at ``batch``."""
        if kind == "sample":
            return self.sample_steps(batch, n)
        for _ in range(n):
            self.train_step(batch)

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


WORKLOADS = {
    "train-32": ("train", 32),
    "train-64": ("train", 64),
    "sample-1": ("sample", 1),
    "sample-16": ("sample", 16),
    "sample-64": ("sample", 64),
}
BATCHES = tuple(sorted({batch for _, batch in WORKLOADS.values()}))


def repeats(iters: dict[str, int], kind: str, batch: int) -> int:
    """Calls per timed repetition: small sampling batches get more, for equal time."""
    return iters[kind] * (max(1, 64 // batch) if kind == "sample" else 1)


def time_workloads(
    runners: list[Runner], reps: int, iters: dict[str, int], warmup: int
) -> dict[str, dict[str, list[float]]]:
    """Seconds per step of every (workload, contender), ``reps`` interleaved repetitions."""
    times = {w: {r.contender.name: [] for r in runners} for w in WORKLOADS}
    for kind, batch in WORKLOADS.values():
        for r in runners:
            r.steps(kind, batch, warmup)
            r.sync()
    for rep in range(reps):
        for workload, (kind, batch) in WORKLOADS.items():
            order = runners[rep % len(runners) :] + runners[: rep % len(runners)]
            n = repeats(iters, kind, batch)
            for r in order:
                start = time.perf_counter()
                r.steps(kind, batch, n)
                r.sync()
                seconds = (time.perf_counter() - start) / n
                times[workload][r.contender.name].append(seconds)
        print(f"  repetition {rep + 1}/{reps} done", flush=True)
    return times


def memory_child(args: argparse.Namespace) -> None:
    """Entry of the fresh process: build one contender, run a few steps, print peak memory."""
    c = Contender(**json.loads(args.memory_child))
    kind, batch = WORKLOADS[args.workload]
    r = Runner(c, SHAPES[args.shapes[0]], args.device, (batch,))
    r.steps(kind, batch, 3)
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
        "capability": torch.backends.cpu.get_cpu_capability(),
        "flags": _simd_flags(),
        "dispatch_env": {k: os.environ[k] for k in DISPATCH_ENV if k in os.environ},
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


DISPATCH_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
SIMD = ("fma", "avx", "avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_bf16")


def _cpuinfo(key: str) -> str | None:
    """The first value of ``key`` in /proc/cpuinfo (None where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return None


def _simd_flags() -> list[str]:
    """The SIMD / matrix-unit flags of /proc/cpuinfo that decide torch's kernels."""
    have = set((_cpuinfo("flags") or "").split())
    amx = sorted(f for f in have if f.startswith("amx") and f not in SIMD)
    return [f for f in SIMD if f in have] + amx


# fp32 FLOPs per cycle and core of torch's kernels at a capability: 2 FMA pipes x lanes x 2
FLOPS_PER_CYCLE = {"AVX2": 2 * 8 * 2, "AVX512": 2 * 16 * 2}


def flops_per_cycle() -> int | None:
    """FLOPS_PER_CYCLE at torch's capability; AMD Zen 4 (family 25) runs each 512-bit op on its
    256-bit datapaths, so AVX-512 doubles nothing there."""
    capability = torch.backends.cpu.get_cpu_capability()
    zen4 = _cpuinfo("vendor_id") == "AuthenticAMD" and _cpuinfo("cpu family") == "25"
    return FLOPS_PER_CYCLE.get("AVX2" if capability == "AVX512" and zen4 else capability)


# dense bf16 tensor-core TFLOP/s of the data sheets (SXM parts), in GFLOP/s: MFU's denominator
GPU_BF16_DENSE = {"H100": 989e3, "H200": 989e3, "A100": 312e3}


def gemm_peak(device: str, threads: int, reps: int = 5) -> dict[str, float]:
    """Achieved GFLOP/s of a large square matmul (2048 on CPU, 8192 on GPU) per dtype, the
    machine's practical ceiling, and on CPU the theoretical fp32 ceiling of the capability:
    threads x the cpuinfo clock x :func:`flops_per_cycle` (a VM reports the nominal clock, so turbo
    lets the measured GEMM pass it: 276 against 269 GFLOP/s on the 2-core AVX512 Xeon),
    on a known GPU its data sheet's dense bf16 peak (MFU = achieved / that)."""
    n = 8192 if device == "cuda" else 2048
    peak = {}
    native_bf16 = device == "cuda" or default_contender(device).precision == "bf16"
    # An emulated bf16 GEMM of this size runs for many minutes (a Zen 1 stalled here) and is no
    # ceiling anyone trains at: it is reported as 0.
    for dtype in (torch.float32, torch.bfloat16) if native_bf16 else (torch.float32,):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak[str(dtype).removeprefix("torch.")] = 2 * n**3 / min(times) / 1e9
    peak.setdefault("bfloat16", 0.0)
    if device == "cuda":
        name = torch.cuda.get_device_name()
        nominal = next((v for k, v in GPU_BF16_DENSE.items() if k in name), None)
        if nominal:
            peak["bfloat16_nominal"] = nominal
        return peak
    mhz, per_cycle = _cpuinfo("cpu MHz"), flops_per_cycle()
    if mhz and per_cycle:
        peak["float32_theoretical"] = threads * float(mhz) * 1e-3 * per_cycle
    return peak


def _cpu_name() -> str:
    """The model name with its family and model numbers: VMs often report only "AMD EPYC",
    which a Zen 1 (family 23), a Zen 4 (25) and a Zen 5 (26) share."""
    name = _cpuinfo("model name") or platform.processor()
    family, model = _cpuinfo("cpu family"), _cpuinfo("model")
    return f"{name} (family {family} model {model})" if family and model else name


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
    """The goals: ours fp32, and ours with our defaults, over diffusers fp32 in training
    (batch 32 and 64) and in sampling (ms per network call, batch 64)."""
    r = entry["ratios"]
    return [
        f"- {name} over diffusers fp32, {what} batch {w.split('-')[1]}: "
        f"**{r[w][name]['median']:.2f}x** [{r[w][name]['min']:.2f}–{r[w][name]['max']:.2f}]"
        for name in dict.fromkeys(("ours fp32", default))
        for w, what in (
            ("train-32", "training"),
            ("train-64", "training"),
            ("sample-64", "sampling"),
        )
    ]


def machine_line(m: dict) -> str:
    """The machine as the results' header gives it: CPU, capability, flags, threads, peaks."""
    emulated = " ".join(f"{k}={v}" for k, v in m.get("dispatch_env", {}).items())
    peak = m.get("gemm_peak", {})
    ceilings = ", ".join(f"{k.replace('_', ' ')} {v:.0f}" for k, v in peak.items())
    return (
        f"{m['date']}; {m['cpu']}, torch capability **{m.get('capability', '?')}**"
        + (f" (dispatch capped by {emulated})" if emulated else "")
        + f", flags {' '.join(m.get('flags', [])) or '?'}; {m['cpus']} CPUs, "
        f"{m['torch_threads']} torch threads"
        + (f"; GEMM GFLOP/s: {ceilings}" if ceilings else "")
        + "."
    )


def markdown(result: dict) -> str:
    m = result["machine"]
    default = result["default"]
    lines = [
        f"# UNet speed on {m.get('gpu', m['cpu'])}",
        "",
        machine_line(m),
        "",
        f"python {m['python']}, "
        f"torch {m['torch']}, diffusers {m['diffusers']}, denoising-diffusion-pytorch "
        f"{m['denoising_diffusion_pytorch']}, lightning {m['lightning']}.",
        "",
        f"Every cell: median [min–max] over {result['reps']} interleaved repetitions in one "
        f"process. `{default}` is our default on this device. Speed-ups over diffusers fp32 are "
        "medians of the per-repetition ratios (back-to-back runs, so the machine's drift "
        "cancels). GFLOP/s = 3 x forward FLOPs x images/s; % peak: of the measured GEMM GFLOP/s "
        "in the contender's precision (a 2048² matmul on CPU, 8192² on GPU). Peak RSS: a fresh "
        "process through `sh` building the net and running three training steps at batch 64.",
    ]
    precisions = {
        c["config"]["precision"]
        for r in result["shapes"].values()
        for c in r["contenders"].values()
    }
    if "bf16" not in precisions:
        lines += ["", "No bf16 rows: this CPU emulates bf16 (`--bf16` adds them)."]
    for shape, r in result["shapes"].items():
        s = SHAPES[shape]
        lines += ["", f"## {shape}: {s.channels}x{s.size}x{s.size}, widths {s.widths}", ""]
        lines += goal_lines(r, default)
        lines += [
            "",
            "| contender | params (M) | GFLOP/fwd | train img/s b32 | train img/s b64 | "
            "train GFLOP/s b64 (% peak) | sample ms/step b1 | b16 | b64 | peak RSS (MiB) | "
            "train b64 / diffusers fp32 | sample b64 / diffusers fp32 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, c in r["contenders"].items():
            t = {w: r["timings"][w][name] for w in WORKLOADS}
            gflop = c["flops"] / 1e9
            mem = f"{c['memory']['rss'] / 2**20:.0f}" if c["memory"] else "–"
            if c["memory"] and c["memory"].get("cuda"):
                mem += f" (CUDA {c['memory']['cuda'] / 2**20:.0f})"
            achieved = 3 * gflop * 64 / t["train-64"]["median"]
            ceiling = m.get("gemm_peak", {}).get(
                "bfloat16" if c["config"]["precision"] == "bf16" else "float32"
            )
            share = f" ({100 * achieved / ceiling:.0f}%)" if ceiling else ""
            lines.append(
                f"| {name} | {c['params'] / 1e6:.2f} | {gflop:.3f} | "
                f"{_range(t['train-32'], 32, invert=True)} | "
                f"{_range(t['train-64'], 64, invert=True)} | {achieved:.0f}{share} | "
                + " | ".join(_range(t[f"sample-{b}"], 1e3, fmt=".1f") for b in (1, 16, 64))
                + f" | {mem} | {r['ratios']['train-64'][name]['median']:.2f}x | "
                f"{r['ratios']['sample-64'][name]['median']:.2f}x |"
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
    p.add_argument(
        "--cuda-graphs", action="store_true", help="add ours bf16 + CUDA graphs (GPU only)"
    )
    p.add_argument(
        "--bf16", action="store_true", help="bf16 rows also where bf16 is emulated (slow)"
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
        "default": default_contender(args.device).name,
        "shapes": {},
    }
    result["machine"]["gemm_peak"] = gemm_peak(args.device, args.threads)
    print(json.dumps(result["machine"]), flush=True)
    bf16 = args.bf16 or default_contender(args.device).precision == "bf16"
    for shape in shapes:
        print(f"{shape}: building and warming up", flush=True)
        runs = contenders(args.device, args.compile, args.cuda_graphs, bf16)
        runners = [Runner(c, SHAPES[shape], args.device, BATCHES) for c in runs]
        entry = {"contenders": {}, "timings": {}}
        compiled = any(c.compiled for c in runs)
        timings = time_workloads(runners, args.reps, iters, warmup=3 if compiled else 1)
        entry["timings"] = {w: {k: summary(v) for k, v in t.items()} for w, t in timings.items()}
        entry["ratios"] = paired_ratios(timings)
        entry["raw_seconds"] = timings
        if not args.no_profile:
            entry["profiles"] = {
                r.contender.name: profile_top_ops(r, 64)
                for r in runners
                if r.contender
                in (Contender("ours"), default_contender(args.device), Contender("diffusers"))
            }
        for r in runners:
            c = r.contender
            print(f"  peak memory of {c.name}", flush=True)
            entry["contenders"][c.name] = {
                "config": dataclasses.asdict(c),
                "params": sum(p.numel() for p in r.net.parameters()),
                "flops": forward_flops(BUILDERS[c.library](SHAPES[shape]), SHAPES[shape]),
                "memory": None
                if c.compiled  # minutes of compilation again in the child
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
