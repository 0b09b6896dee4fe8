"""Run by tests/test_ddp.py under ``torchrun --nproc_per_node 2``: fits each tiny config given
(in that order, so each finds the checkpoints it builds on) with 2 CPU processes of DDP through
the CLI, then ``sample``s from the tiny DDPM in the same process group. Rank 0 writes, per
config, what every rank ended with to the JSON file named first.

    torchrun --nproc_per_node 2 tests/ddp_fits.py OUT.json configs/tiny/ddpm.yaml ...
"""

import json
import sys

import torch

from diffusion_apps.cli import DiffusionCLI, main
from diffusion_apps.distributed import gather

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
DDP += ["--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"]


def fit(config: str) -> dict:
    """This rank's view of a 2-step DDP fit: the weights' sums, the step, its sampler."""
    cli = DiffusionCLI(args=["fit", "--config", config, *DDP])
    weights = torch.cat([p.detach().double().flatten() for p in cli.model.parameters()])
    sampler = cli.trainer.train_dataloader.sampler
    return {
        "weights": [float(weights.sum()), float(weights.square().sum())],
        "step": cli.trainer.global_step,
        "rank": [cli.trainer.global_rank, cli.trainer.world_size],
        "indices": list(sampler)[:64],
    }


if __name__ == "__main__":
    out, configs = sys.argv[1], sys.argv[2:]
    seen = {config: gather(fit(config), 2) for config in configs}
    ckpt = "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"
    main(["sample", "--ckpt_path", ckpt, "--num_samples", "5", "--batch_size", "2",
          "--out_dir", "samples_ddp", "--device", "cpu"])  # fmt: skip
    if seen[configs[0]][0]["rank"][0] == 0:
        with open(out, "w") as f:
            json.dump(seen, f)
