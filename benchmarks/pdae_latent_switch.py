"""PDAE's latent-decoding switch, measured: one latent-DDIM checkpoint's samples decoded with the
shift off in the last p of the steps (the official code's p = 0.3) and on at every step (p = 0),
scored by ``eval`` in one table, on the same seeds (the same z and x_T for every p).

    python benchmarks/pdae_latent_switch.py --ckpt runs/pdae_latent/version_0/checkpoints/last.ckpt

Each p gets a copy of the checkpoint whose saved config sets ``unshifted_fraction`` (written to
``--out_dir``, named by p), so ``eval`` rebuilds each exactly as a run with that config would.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffusion_apps.cli import main as cli


def variant(ckpt: dict, fraction: float, out_dir: Path) -> Path:
    """A copy of ``ckpt`` whose config decodes with ``unshifted_fraction`` = ``fraction``."""
    copy = dict(ckpt, hyper_parameters={**ckpt["hyper_parameters"], "unshifted_fraction": fraction})
    path = out_dir / f"pdae_latent_unshifted_{round(100 * fraction)}pct.ckpt"
    torch.save(copy, path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="a LatentDDIM on a PDAE")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.0])
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--samplers", default="ddim:50")
    p.add_argument("--seed", type=int, default=0, help="eval's seed of the batches' draws")
    p.add_argument("--out_dir", type=Path, default=Path("benchmarks/results/pdae/latent_switch"))
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    paths = [variant(ckpt, f, args.out_dir) for f in args.fractions]
    try:
        names = ",".join(map(str, paths))
        n, out = str(args.num_samples), str(args.out_dir)
        cli(["eval", "--ckpt_paths", names, "--num_samples", n, "--samplers", args.samplers,
             "--seed", str(args.seed), "--out_dir", out])  # fmt: skip
    finally:
        for path in paths:  # copies of the weights: the table is the result
            path.unlink()


if __name__ == "__main__":
    main()
