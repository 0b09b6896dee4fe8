"""Training and sampling speed of the DDPM CIFAR-10 recipe on one GPU, in one process.

Stages, each in its own try/except (a failure is recorded in the results, the others still run),
the results rewritten after each one so that a timeout keeps the finished stages:

1. **Lightning**: ``configs/paper/ddpm_cifar10.yaml`` through our CLI (``DiffusionCLI``, not
   run: the Trainer it builds is fitted here, with a timing callback added) on a folder of
   generated 32x32 RGB PNGs (CIFAR-10 cannot be downloaded; random smooth colour fields: pixel
   content does not change the compute), ``--steps`` steps at ``--batch``, bf16-mixed,
   ``model.compile`` on, no validation, no checkpoints, no logger; EMA, gradient clipping and
   the FiniteLoss check as configured. The loader alone is timed too, with the same workers.
2. **sampling**: ``--samples`` images with DDIM-50 from the trained module's EMA weights
   through ``sample_batches``, what ``python -m diffusion_apps sample`` calls, in bf16 and not
   compiled (as that command runs), after one warm-up batch; a grid of the first 256.
3. **plain loop**, diffusers' ``UNet2DModel`` in the same layout (``speed.Diffusers``, one head
   as in the config) and then our UNet of the config: the same eps MSE at random t, AdamW,
   gradient clipping at 1, bf16 autocast and ``torch.compile``, on batches resident on the
   device (no loader, no EMA, no FiniteLoss): like against like.
4. **compiled sampling** (with compile on): stage 2 with the fit's module, its UNet compiled in
   place; the warm-up batch compiles the inference graph.

Each training row: time to the first step (compilation), images/s over the steps after
``--warmup`` (synchronised), FLOPs of a step = 3 x the forward's FLOPs (``speed.forward_flops``,
``FlopCounterMode``) x batch, MFU = achieved FLOP/s over the GPU's nominal dense bf16 peak
(``speed.GPU_BF16_DENSE``) and the share of a measured bf16 GEMM, peak
``torch.cuda.max_memory_allocated``. Writes ``<out>/<name>.{md,json}`` and ``<name>-grid.png``
(``$OUT`` when set, else benchmarks/results). A CPU smoke run (numbers not a result):
``python benchmarks/gpu_fit.py --device cpu --steps 6 --batch 8 --width 32 --samples 16
--no-compile --precision 32-true --out /tmp/gpu-fit``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Callback
from speed import RESULTS, Diffusers, Shape, forward_flops, gemm_peak, machine, machine_line
from torch import nn

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/paper/ddpm_cifar10.yaml"
GRID = 256  # images in the grid


def say(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def compile_stats() -> dict:
    """Graphs compiled and graph breaks since the last call (TorchDynamo's counters)."""
    from torch._dynamo.utils import counters

    stats = {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }
    counters.clear()
    return stats


def write_images(root: Path, n: int, size: int = 32) -> None:
    """``n`` RGB PNGs of random smooth colour fields: 4x4 noise upsampled bicubically."""
    from diffusion_apps.images import save_png

    gen = torch.Generator().manual_seed(0)
    for start in range(0, n, 256):
        low = torch.rand(min(256, n - start), 3, 4, 4, generator=gen)
        images = F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        for i, image in enumerate(images):
            save_png(image, root / f"{start + i:06d}.png")


class StepTimer(Callback):
    """Wall clock of a fit: the first step (compilation) from the start of training, and the
    steps from ``warmup`` to the last, each end synchronised with the device."""

    def __init__(self, warmup: int, every: int = 50) -> None:
        self.warmup, self.every = warmup, every
        self.first_step_s = self.timed_s = None

    def on_train_start(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            sync(pl_module.device)
            self.tic = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # steps done, this one included
        if step == 1:
            sync(pl_module.device)
            self.first_step_s = time.perf_counter() - self.start
            say(f"  first step after {self.first_step_s:.1f} s (compilation included)")
        if step == trainer.max_steps:
            sync(pl_module.device)
            self.timed_s = time.perf_counter() - self.tic
        if step % self.every == 0:
            say(f"  step {step}/{trainer.max_steps}")


def cli_args(args: argparse.Namespace, tmp: Path) -> list[str]:
    """The config, and the overrides of a short speed run on the folder ``tmp``/images (the
    saved config goes to ``tmp``/run)."""
    dropped = ("Checkpoint", "RichProgressBar")
    callbacks = yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"]
    kept = [c for c in callbacks if c["class_path"].rpartition(".")[2] not in dropped]
    overrides = {
        "trainer.accelerator": "gpu" if args.device == "cuda" else args.device,
        "trainer.devices": 1,
        "trainer.precision": args.precision,
        "trainer.max_steps": args.steps,
        "trainer.limit_val_batches": 0,
        "trainer.logger": False,
        "trainer.enable_checkpointing": False,
        "trainer.enable_progress_bar": False,
        "trainer.default_root_dir": str(tmp / "run"),
        "trainer.callbacks": json.dumps(kept),
        "model.init_args.compile": args.compile,
        "data.init_args.dataset": "folder",
        "data.init_args.root": str(tmp / "images"),
        "data.init_args.batch_size": args.batch,
        "data.init_args.num_workers": args.workers,
        "data.init_args.val_fraction": 0.01,
    }
    if args.width:
        overrides["model.init_args.unet.init_args.base_channels"] = args.width
    pairs = [
        (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)) for k, v in overrides.items()
    ]
    return ["--config", str(CONFIG), *(a for pair in pairs for a in pair)]


def layout(unet_args) -> Shape:
    """The config's UNet as a :class:`speed.Shape`, for diffusers and the FLOP count."""
    w = unet_args.base_channels
    widths = tuple(w * m for m in unet_args.channel_mult)
    s = Shape(unet_args.in_channels, widths, unet_args.image_size,
              res_blocks=unet_args.num_res_blocks,
              attention=tuple(unet_args.attention_resolutions))  # fmt: skip
    attended = [c for c, a in zip(widths, s.attends(), strict=True) if a] or [widths[-1]]
    return dataclasses.replace(s, head_dim=attended[0] // unet_args.num_heads)


def rates(flops_fwd: int, steps: int, seconds: float, args, peak: dict) -> dict:
    """images/s, achieved TFLOP/s (3 forwards a step), MFU (bf16 runs) and the share of the
    measured GEMM in the run's dtype."""
    achieved = 3 * flops_fwd * args.batch * steps / seconds
    bf16 = args.precision.startswith("bf16")
    nominal = peak.get("bfloat16_nominal") if bf16 else None
    gemm = peak.get("bfloat16" if bf16 else "float32")
    return {
        "images_per_s": args.batch * steps / seconds,
        "tflops": achieved / 1e12,
        "mfu": achieved / (nominal * 1e9) if nominal else None,
        "gemm_share": achieved / (gemm * 1e9) if gemm else None,
    }


def loader_rate(datamodule, batches: int) -> dict:
    """images/s of the training loader alone over up to ``batches`` batches of one epoch, after
    its first (the workers' start)."""
    loader = datamodule.train_dataloader()
    batches = min(batches, len(loader) - 1)
    it = iter(loader)
    next(it)
    tic, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it)[0])
    seconds = time.perf_counter() - tic
    return {"images_per_s": n / seconds, "batches": batches, "workers": loader.num_workers,
            "pin_memory": loader.pin_memory}  # fmt: skip


def lightning_fit(args, tmp: Path, peak: dict, state: dict) -> dict:
    from diffusion_apps.cli import DiffusionCLI

    cli = DiffusionCLI(args=cli_args(args, tmp), run=False)
    unet_args = cli.config.model.init_args.unet.init_args
    shape = layout(unet_args)
    state.update(module=cli.model, shape=shape)
    eager = copy.deepcopy(cli.model)  # before configure_model compiles the UNet in place
    state["unet"] = copy.deepcopy(cli.model.unet)
    flops = forward_flops(copy.deepcopy(cli.model.unet), shape)
    timer = StepTimer(args.warmup)
    cli.trainer.callbacks.append(timer)
    device = cli.trainer.strategy.root_device
    reset_peak(device)
    say(f"Lightning: fit {args.steps} steps at batch {args.batch} on {device}")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    eager.load_state_dict(cli.model.state_dict())  # the EMA weights, since the fit's end
    state["eager"] = eager
    timed = args.steps - args.warmup
    row = {
        "loop": "Lightning Trainer (our CLI's)",
        "network": "ours (config)",
        "params": sum(p.numel() for p in cli.model.unet.parameters()),
        "flops_forward": flops,
        "first_step_s": timer.first_step_s,
        "timed_steps": timed,
        "timed_s": timer.timed_s,
        **rates(flops, timed, timer.timed_s, args, peak),
        "peak_memory": peak_memory(device),
        "callbacks": [type(c).__name__ for c in cli.trainer.callbacks],
        "precision": str(cli.trainer.precision),
        **compile_stats(),
    }
    say(f"  {row['images_per_s']:.0f} images/s; timing the loader alone")
    row["loader_alone"] = loader_rate(cli.datamodule, 40)
    return row


def sampling(module, compiled: bool, args, grid: Path | None = None) -> dict:
    """DDIM-``--sample-steps`` draws of the trained ``module`` through the sample command's
    ``sample_batches``; the first 256 saved as ``grid`` when given."""
    from diffusion_apps.distributed import rank_batches
    from diffusion_apps.evaluation.protocol import sample_batches
    from diffusion_apps.images import save_grid

    device = torch.device(args.device)
    module = module.to(device).eval()  # Lightning's teardown left it on the CPU
    precision = "bf16" if args.precision.startswith("bf16") else "32"
    settings = {"sampler": "ddim", "steps": args.sample_steps}
    batches = rank_batches(args.samples, args.sample_batch, 0, 0, 1)
    say(
        f"sampling: {args.samples} images, DDIM-{args.sample_steps}, batch {args.sample_batch}, "
        f"compiled {compiled}"
    )
    tic = time.perf_counter()
    for _ in sample_batches(module, batches[:1], precision, **settings):
        pass
    warm_s = time.perf_counter() - tic
    reset_peak(device)
    shown, seconds = [], 0.0
    for start, images, _, s in sample_batches(module, batches, precision, **settings):
        seconds += s
        if start < GRID:
            shown.append(images[: GRID - start].cpu())
    if grid is not None:
        save_grid(torch.cat(shown), grid)
    return {
        "sampler": f"ddim-{args.sample_steps}",
        "precision": precision,
        "batch": args.sample_batch,
        "samples": args.samples,
        "ema_weights": True,
        "compiled": compiled,
        "warmup_batch_s": warm_s,
        "ms_per_image": 1e3 * seconds / args.samples,
        "ms_per_network_call_per_image": 1e3 * seconds / args.samples / args.sample_steps,
        "peak_memory": peak_memory(device),
        "grid": grid and grid.name,
        **compile_stats(),
    }


def plain_loop(net: nn.Module, name: str, args, state: dict, peak: dict) -> dict:
    """``--steps`` training steps of ``net(x, t)`` in a bare loop: eps MSE at random t
    (our schedule's q_sample), AdamW, gradient clipping at 1, autocast, compile."""
    device, shape = torch.device(args.device), state["shape"]
    flops = forward_flops(net, shape)  # on the CPU, before the move
    net = net.to(device).train()
    forward = torch.compile(net) if args.compile else net
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4)
    schedule = state["module"].schedule.to(device)
    gen = torch.Generator(device).manual_seed(0)
    size = (args.batch, shape.channels, shape.size, shape.size)
    data = [torch.rand(size, generator=gen, device=device) * 2 - 1 for _ in range(4)]
    bf16 = args.precision.startswith("bf16")
    reset_peak(device)
    say(f"plain loop: {name}, {args.steps} steps at batch {args.batch}")
    start = time.perf_counter()
    for step in range(args.steps):
        if step == args.warmup:
            sync(device)
            tic = time.perf_counter()
        x0 = data[step % len(data)]
        t = torch.randint(0, schedule.num_timesteps, (args.batch,), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            eps = forward(schedule.q_sample(x0, t, noise), t)
        F.mse_loss(eps.float(), noise).backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:
            sync(device)
            first = time.perf_counter() - start
            say(f"  first step after {first:.1f} s (compilation included)")
    sync(device)
    timed_s = time.perf_counter() - tic
    row = {
        "loop": "plain loop",
        "network": name,
        "params": sum(p.numel() for p in net.parameters()),
        "flops_forward": flops,
        "first_step_s": first,
        "timed_steps": args.steps - args.warmup,
        "timed_s": timed_s,
        **rates(flops, args.steps - args.warmup, timed_s, args, peak),
        "peak_memory": peak_memory(device),
        **compile_stats(),
    }
    say(f"  {row['images_per_s']:.0f} images/s")
    return row


def gpu_name() -> str | None:
    """nvidia-smi's name of the GPU (None without nvidia-smi)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0]


def _num(value, fmt: str, scale: float = 1.0) -> str:
    return "–" if value is None else f"{value * scale:{fmt}}"


def markdown(result: dict) -> str:
    m, s, stages = result["machine"], result["settings"], result["stages"]
    title = m.get("nvidia_smi") or m.get("gpu") or m.get("cpu", s["device"])
    lines = [
        f"# DDPM CIFAR-10 recipe: training and sampling speed on {title}",
        "",
        f"torch {m.get('torch')}, lightning {m.get('lightning', '?')}, diffusers "
        f"{m.get('diffusers', '?')}. Settings: "
        + ", ".join(f"{k} {v}" for k, v in s.items())
        + ".",
        "",
        machine_line(m) if "date" in m and "cpu" in m else json.dumps(m, default=str),
        "",
        "Images/s over the steps after the warm-up, synchronised; FLOPs of a step = 3 x the "
        "forward's (FlopCounterMode) x batch; MFU: of the nominal dense bf16 peak (bf16 runs); "
        "GEMM share: of the measured GEMM in the run's dtype (both above, in GFLOP/s). "
        "Lightning: our CLI's Trainer on the config, fed by the loader from a folder of "
        "generated PNGs (random smooth images: their content does not change the compute), "
        "with EMA, gradient clipping and the FiniteLoss check; plain loop: batches resident on "
        "the device, AdamW and clipping only. diffusers' UNet2DModel in the config's layout "
        "(one attention head), without the config's dropout 0.1.",
        "",
        "| run | loop | params (M) | GFLOP/img fwd | first step (s) | img/s | TFLOP/s | MFU | "
        "GEMM share | peak memory (GiB) | graphs (breaks) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("lightning", "diffusers", "ours_plain"):
        r = stages.get(key)
        if r is None:
            lines.append(f"| {key} | not run | | | | | | | | | |")
        elif "error" in r:
            lines.append(
                f"| {key} | failed: {r['error'].splitlines()[-1][:120]} | | | | | | | | | |"
            )
        else:
            lines.append(
                f"| {r['network']} | {r['loop']} | {r['params'] / 1e6:.2f} | "
                f"{r['flops_forward'] / 1e9:.2f} | {r['first_step_s']:.1f} | "
                f"{r['images_per_s']:.0f} | {r['tflops']:.1f} | {_num(r['mfu'], '.1%')} | "
                f"{_num(r['gemm_share'], '.1%')} | {_num(r['peak_memory'], '.2f', 2**-30)} | "
                f"{r['unique_graphs']} ({r['graph_breaks']}) |"
            )
    fit = stages.get("lightning", {})
    if "loader_alone" in fit:
        lines += [
            "",
            f"Lightning: {fit['loader_alone']['workers']} loader workers (pin_memory "
            f"{fit['loader_alone']['pin_memory']}); the loader alone gave "
            f"{fit['loader_alone']['images_per_s']:.0f} images/s against the fit's "
            f"{fit['images_per_s']:.0f}. Precision {fit['precision']}; callbacks: "
            f"{', '.join(fit['callbacks'])}.",
        ]
    runs = [stages[k] for k in ("sampling", "sampling_compiled") if k in stages]
    lines += ["", "## Sampling", ""] if runs else []
    for r in runs:
        if "error" in r:
            lines.append(f"- failed: {r['error'].splitlines()[-1]}")
        else:
            lines.append(
                f"- {r['samples']} images, {r['sampler']}, {r['precision']}, batch {r['batch']}, "
                f"EMA weights, compiled {r['compiled']}: **{r['ms_per_image']:.2f} ms/image** "
                f"({r['ms_per_network_call_per_image'] * 1e3:.1f} µs per network call and "
                f"image), after a warm-up batch of {r['warmup_batch_s']:.1f} s; peak memory "
                f"{_num(r['peak_memory'], '.2f', 2**-30)} GiB"
                + (f"; grid `{r['grid']}`." if r["grid"] else ".")
            )
    return "\n".join(lines) + "\n"


def save(result: dict, out: Path, name: str) -> None:
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    (out / f"{name}.md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=50, help="untimed steps (at most steps/2)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, help="the UNet's base_channels (default: the config's)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--precision", default="bf16-mixed", help="Lightning's: bf16-mixed, 32-true")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--sample-batch", type=int, default=500)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--images", type=int, default=6400, help="PNGs in the generated folder")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    p.add_argument("--out", type=Path, default=default_out)
    p.add_argument("--name", default="gpu-fit")
    args = p.parse_args(argv)
    args.warmup = min(args.warmup, args.steps // 2)
    args.out.mkdir(parents=True, exist_ok=True)
    # Lightning only logs a SIGTERM and trains on: `timeout` must end the run, the finished
    # stages saved. The stage's own error may be what surfaces (a loader worker killed by the
    # same signal), so the stage wrapper exits too.
    stopped: list[int] = []

    def on_sigterm(signum, frame) -> None:
        stopped.append(signum)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    device = torch.device(args.device)
    try:
        info = machine(args.device)
    except Exception:  # diffusers missing: the rest still says what ran
        info = {"device": args.device, "torch": torch.__version__, "cpus": os.cpu_count()}
        info["machine_error"] = traceback.format_exc()
    info["nvidia_smi"] = gpu_name() if device.type == "cuda" else None
    info["gemm_peak"] = gemm_peak(args.device, torch.get_num_threads())
    settings = {k: str(v) for k, v in vars(args).items() if k != "out"}
    result = {"machine": info, "settings": settings, "stages": {}}
    say(json.dumps(info, default=str))
    state: dict = {}

    def stage(key: str, run) -> None:
        try:
            result["stages"][key] = run()
        except Exception:
            result["stages"][key] = {"error": traceback.format_exc()}
            say(f"{key} failed:\n{result['stages'][key]['error']}")
        except SystemExit:
            result["stages"][key] = {"error": "stopped by a signal (the timeout) in this stage"}
            raise
        finally:
            save(result, args.out, args.name)
        if stopped:
            say(f"stopped by signal {stopped[0]}")
            sys.exit(128 + stopped[0])

    with tempfile.TemporaryDirectory(prefix="gpu-fit-") as tmp:
        tic = time.perf_counter()
        (Path(tmp) / "images").mkdir()
        write_images(Path(tmp) / "images", args.images)
        say(f"wrote {args.images} PNGs in {time.perf_counter() - tic:.1f} s")
        stage("lightning", lambda: lightning_fit(args, Path(tmp), info["gemm_peak"], state))
    if "eager" in state:  # as `python -m diffusion_apps sample` runs it: not compiled
        grid = args.out / f"{args.name}-grid.png"
        stage("sampling", lambda: sampling(state["eager"], False, args, grid))
    torch._dynamo.reset()  # the next networks compile afresh, not under the old guards
    if "shape" in state:
        s, peak = state["shape"], info["gemm_peak"]
        stage(
            "diffusers",
            lambda: plain_loop(Diffusers(s), "diffusers UNet2DModel", args, state, peak),
        )
        stage("ours_plain", lambda: plain_loop(state["unet"], "ours (config)", args, state, peak))
    if "eager" in state and args.compile:  # the fit's module, its UNet compiled in place
        stage("sampling_compiled", lambda: sampling(state["module"], True, args))
    print(markdown(result), flush=True)
    say(f"wrote {args.out / args.name}.md and .json")
    sys.exit(int(any("error" in r for r in result["stages"].values())))


if __name__ == "__main__":
    main()
