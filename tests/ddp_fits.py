"""Run by tests/test_ddp.py on two "nodes" of one CPU process each (two ``torchrun --nnodes 2
--nproc_per_node 1 --node_rank R`` on localhost, as a cluster would start them): fits each tiny
config given (in that order, so each finds the checkpoints it builds on) with DDP through the
CLI, resumes the first from its ``last.ckpt`` for two more steps, then ``sample``s from the tiny
DDPM and ``predict``s with it in the same process group. Rank 0 writes, per config, what every
rank ended with to the JSON file named first; each rank writes its predictions to
``predict_<rank>.pt``.

    torchrun --nnodes 2 --nproc_per_node 1 --node_rank R --master_addr 127.0.0.1 \
        --master_port P tests/ddp_fits.py OUT.json configs/tiny/ddpm.yaml ...
"""

import json
import sys

import torch

from diffusion_apps.cli import DiffusionCLI, main
from diffusion_apps.distributed import gather
from diffusion_apps.methods import LatentDiffusion

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2"]
DDP += ["--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false"]


def tap_scale_measurement() -> dict:
    """What ``LatentDiffusion.measure_scale`` is handed (the images, and the random state that
    draws z ~ q(z | x)), recorded into the dict returned, so the test can draw the same z."""
    tapped, measure = {}, LatentDiffusion.measure_scale

    def measure_scale(self, images):
        tapped.update(images=images.tolist(), rng_state=torch.get_rng_state().tolist())
        measure(self, images)

    LatentDiffusion.measure_scale = measure_scale
    return tapped


SCALE_INPUT = tap_scale_measurement()


def fit(config: str, steps: int = 2, *extra: str) -> dict:
    """This rank's view of a DDP fit to ``steps``: the weights' sums, the step, its sampler, the
    module's own buffers (LDM's scale, LatentDDIM's statistics) and what the scale came from."""
    SCALE_INPUT.clear()
    cli = DiffusionCLI(args=["fit", "--config", config, *DDP, "--trainer.max_steps", str(steps),
                             *extra])  # fmt: skip
    weights = torch.cat([p.detach().double().flatten() for p in cli.model.parameters()])
    sampler = cli.trainer.train_dataloader.sampler
    return {
        "weights": [float(weights.sum()), float(weights.square().sum())],
        "step": cli.trainer.global_step,
        "rank": [cli.trainer.global_rank, cli.trainer.world_size],
        "indices": list(sampler)[:64],
        "buffers": {k: v.tolist() for k, v in cli.model.named_buffers(recurse=False)},
        "scale_input": dict(SCALE_INPUT),
    }


def predict(config: str, ckpt: str) -> None:
    """``predict`` one batch a rank; writes this rank's images and their val-set indices."""
    args = ["predict", "--config", config, "--ckpt_path", ckpt, *DDP]
    cli = DiffusionCLI(
        args=[*args, "--trainer.limit_predict_batches", "1", "--trainer.logger", "false"]
    )
    (images,) = cli.trainer.predict_loop.predictions
    indices = cli.trainer.predict_dataloaders.batch_sampler.seen_batch_indices[0]
    torch.save({"images": images, "indices": indices}, f"predict_{cli.trainer.global_rank}.pt")


if __name__ == "__main__":
    out, configs = sys.argv[1], sys.argv[2:]
    seen = {config: gather(fit(config), 2) for config in configs}
    seen["resumed"] = gather(fit(configs[0], 4, "--ckpt_path", "last"), 2)
    ckpt = "runs/tiny_ddpm/version_0/checkpoints/last.ckpt"
    main(["sample", "--ckpt_path", ckpt, "--num_samples", "5", "--batch_size", "2",
          "--out_dir", "samples_ddp", "--device", "cpu"])  # fmt: skip
    predict(configs[0], ckpt)
    if seen[configs[0]][0]["rank"][0] == 0:
        with open(out, "w") as f:
            json.dump(seen, f)
