"""Our UNet built from an imported layout against the code it came from, on the same
architecture, weights and batch, side by side: training images/s (forward, L_simple, backward)
and sampling ms per step (one ε̂ call), fp32 for both and our default precision for ours (bf16
autocast where the CPU or GPU runs it natively, else fp32), and ours in fp32 with the UNet's
``channels_last`` option (NHWC weights and activations; the configs leave it off, as it loses
under bf16 on the CPU: README, Performance). ``--source guided-diffusion``: the
official UNetModel of ``--flags``; ``--source diffusers``: google/ddpm-cifar10-32's UNet2DModel.

    python benchmarks/imported_speed.py --source guided-diffusion --flags "<MODEL_FLAGS>"
    python benchmarks/imported_speed.py --source diffusers --batch 8

The implementations alternate within each round, so a machine that slows down mid-run slows
both. Writes ``<out>/<source>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from diffusion_apps import precision  # noqa: E402
from diffusion_apps.interop import guided_diffusion as gd  # noqa: E402
from diffusion_apps.nn import UNet  # noqa: E402

FLAGS = (  # the 64x64 ADM layout at a CPU-sized width
    "--attention_resolutions 32,16,8 --class_cond False --image_size 64 --learn_sigma True "
    "--num_channels 64 --num_head_channels 32 --num_res_blocks 2 --resblock_updown True "
    "--use_new_attention_order True --use_scale_shift_norm True"
)


CIFAR10 = dict(  # google/ddpm-cifar10-32's config.json
    block_out_channels=[128, 256, 256, 256], layers_per_block=2, norm_num_groups=32,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, in_channels=3, out_channels=3,
    norm_eps=1e-06, sample_size=32,
)  # fmt: skip


def diffusers_and_ours(device: torch.device):
    from diffusers import UNet2DModel

    from diffusion_apps.interop import diffusers_unet

    theirs = UNet2DModel(**CIFAR10)
    ours = UNet(**diffusers_unet.unet_options(CIFAR10))
    ours.load_state_dict(diffusers_unet.convert_unet(theirs.state_dict(), ours))

    class Sample(torch.nn.Module):  # UNet2DModel returns an output object
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return self.net(x, t).sample

    return Sample(theirs).to(device), ours.to(device), 32, "google/ddpm-cifar10-32 (UNet2DModel)"


def official_and_ours(flags: str, device: torch.device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from guided_diffusion import script_util
    parsed = gd.parse_flags(flags, gd.GUIDED_DEFAULTS)
    names = parsed.keys() & set(script_util.create_model.__code__.co_varnames)
    theirs = script_util.create_model(**{k: parsed[k] for k in names} | {"use_fp16": False})
    ours = UNet(**gd.unet_options(parsed))
    ours.load_state_dict(
        gd.convert_unet(theirs.state_dict(), ours, gd.legacy_attention(parsed, "guided-diffusion"))
    )
    return theirs.to(device), ours.to(device), parsed["image_size"], f"flags `{flags}`"


def seconds(step, repeats: int) -> float:
    """Median seconds of ``step()`` over ``repeats`` calls after one warm-up call."""
    times = []
    for _ in range(repeats + 1):
        tic = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", choices=["guided-diffusion", "diffusers"], default="guided-diffusion"
    )
    parser.add_argument("--flags", default=FLAGS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="default benchmarks/results/imported_speed")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = precision.sampling_precision("auto", device)
    if args.source == "diffusers":
        theirs, ours, size, layout = diffusers_and_ours(device)
    else:
        theirs, ours, size, layout = official_and_ours(args.flags, device)
    x = torch.randn(args.batch, 3, size, size, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)

    def train(model, bf16: bool):
        def step():
            model.zero_grad(set_to_none=True)
            with precision.autocast(device, "bf16" if bf16 else "32"):
                out = model(x, t)
            out.float().square().mean().backward()

        return step

    def sample(model, bf16: bool):
        @torch.no_grad()
        def step():
            with precision.autocast(device, "bf16" if bf16 else "32"):
                model(x, t)

        return step

    nhwc = copy.deepcopy(ours).to(memory_format=torch.channels_last)  # UNet(channels_last=True)
    runs = {
        f"{args.source} fp32": (theirs, False),
        "ours fp32": (ours, False),
        "ours fp32, channels_last": (nhwc, False),
    }
    if default == "bf16":
        runs["ours bf16 (default)"] = (ours, True)
    results = {name: {"train": [], "sample": []} for name in runs}
    for _ in range(args.rounds):
        for name, (model, bf16) in runs.items():
            results[name]["train"].append(args.batch / seconds(train(model, bf16), args.repeats))
            results[name]["sample"].append(1e3 * seconds(sample(model, bf16), args.repeats))
    rows = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    base = rows[f"{args.source} fp32"]
    lines = [
        f"# Imported layout: our UNet against {args.source}'s",
        "",
        f"Device: {device} ({torch.backends.cpu.get_cpu_capability()} CPU capability); "
        f"batch {args.batch} at {size}px; {layout}; median of {args.rounds} "
        f"interleaved rounds of {args.repeats} timed calls; the same weights in both.",
        "",
        "| implementation | training img/s | × theirs | sampling ms/step | × theirs |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['train']:.2f} | {row['train'] / base['train']:.2f} | "
            f"{row['sample']:.1f} | {base['sample'] / row['sample']:.2f} |"
        )
    out = Path(args.out or REPO / "benchmarks/results/imported_speed")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.source}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.source}.json").write_text(json.dumps({"rows": rows, "layout": layout}))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
