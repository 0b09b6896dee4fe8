"""``python -m diffusion_apps sample``: N samples from a checkpoint, as PNG files and a grid."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

GRID_MAX = 256  # images in grid.png


def sample(
    ckpt_path: str,
    num_samples: int = 64,
    sampler: Literal["ddpm", "ddim", "dpmpp_2m", "consistency"] | None = None,
    steps: int | None = None,
    eta: float | None = None,
    spacing: Literal["uniform", "quad", "logsnr"] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    out_dir: str | None = None,
    device: str = "auto",
    precision: Literal["auto", "32", "bf16"] = "auto",
    classifier_path: str | None = None,
    labels: list[int] | None = None,
    prompts: list[str] | None = None,
    scale: float | None = None,
) -> Path:
    """Write ``num_samples`` images drawn from the model in ``ckpt_path``.

    The model and its default sampler come from the config stored in the checkpoint. With
    ``classifier_path`` the DDPM is guided by that noisy classifier (classifier guidance); a
    conditional LatentDiffusion takes ``labels`` or ``prompts`` and guides by classifier-free
    guidance of scale ``scale``.

    Args:
        ckpt_path: checkpoint written by ``fit``.
        num_samples: how many images.
        sampler: "ddpm" (ancestral), "ddim" or "dpmpp_2m" (DPM-Solver++(2M)); "consistency"
            for a consistency model; default: the checkpoint's.
        steps: sampler steps (DDPM with fewer than T steps is respaced); default: the checkpoint's.
        eta: DDIM η; default: the checkpoint's.
        spacing: the timestep subsequence; default: "logsnr" for dpmpp_2m (on uniform steps
            its last step overshoots), the checkpoint's ``timestep_spacing`` otherwise.
        seed: seed of the generators that draw x_T and the sampler noise, one per batch, so the
            images are the same whatever the number of processes.
        batch_size: images per forward pass.
        out_dir: where to write; default ``<run dir>/samples/<ckpt>_<sampler><steps>_seed<seed>``.
        device: "auto" (CUDA when available), "cpu", "cuda", …
        precision: "bf16" runs the network under bfloat16 autocast (the sampler stays fp32);
            "auto": bf16 where the device runs it natively (a CPU with AVX512-BF16 or AMX, a
            bf16 GPU), else fp32. The choice is printed.
        classifier_path: a NoisyClassifier checkpoint trained for this DDPM: guided sampling.
        labels: the target classes, repeated to ``num_samples`` (default 0, 1, …, K−1).
        prompts: a caption-conditioned LDM: captions ("thick slanted seven"), repeated likewise.
        scale: classifier guidance: the gradient scale s (default 1; 0: unguided). LDM: the
            classifier-free guidance scale w (default: the checkpoint's ``guidance_scale``).

    Under ``torchrun`` the processes take the batches in turn and write their own files.

    Returns:
        The output folder, holding ``000000.png``… and ``grid.png`` (the first 256 images).
    """
    from torchvision.utils import save_image
    from tqdm.auto import tqdm

    from diffusion_apps.checkpoint import load_module, resolve_device
    from diffusion_apps.distributed import first_images, process_group, rank_batches
    from diffusion_apps.evaluation.evaluate import can_sample
    from diffusion_apps.images import save_grid, to_unit
    from diffusion_apps.methods import LatentDiffusion
    from diffusion_apps.precision import autocast, sampling_precision

    if num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}"
        )
    dev = resolve_device(device)
    precision = sampling_precision(precision, dev)
    module = load_module(ckpt_path).to(dev)
    if not can_sample(module):
        raise SystemExit(
            f"sample: {ckpt_path} holds a {type(module).__name__} autoencoder, which decodes "
            "given codes and does not sample on its own: train its latent stage "
            "(configs/diffae_latent.yaml, configs/pdae_latent.yaml) and sample from that checkpoint"
        )
    if classifier_path is not None:
        scale = 1.0 if scale is None else scale
        draw, tag = _guided(module, classifier_path, labels, scale, num_samples, dev)
    elif isinstance(module, LatentDiffusion) and module.condition is not None:
        scale = module.guidance_scale if scale is None else scale
        key, wanted = ("prompts", prompts) if prompts is not None else ("labels", labels)
        wanted = wanted or list(range(getattr(module.condition, "num_classes", 10)))

        def draw(start, n, **kw):  # the cycle of labels/prompts goes on across batches
            chosen = [wanted[(start + i) % len(wanted)] for i in range(n)]
            return module.sample(n, guidance_scale=scale, **{key: chosen}, **kw)

        tag = f"_cfg{scale:g}" + (f"_{len(prompts)}prompts" if prompts else "")
    elif labels is not None or prompts is not None:
        raise ValueError(
            "--labels needs --classifier_path (a NoisyClassifier checkpoint) or a conditional "
            "LatentDiffusion checkpoint; --prompts a caption-conditioned one"
        )
    else:
        draw, tag = (lambda start, n, **kw: module.sample(n, **kw)), ""
    sampler = sampler or module.sampler
    steps = steps or module.sample_steps
    ckpt = Path(ckpt_path)
    name = f"{ckpt.stem}_{sampler}{steps}_seed{seed}{tag}"
    out = Path(out_dir or ckpt.parent.parent / "samples" / name)
    out.mkdir(parents=True, exist_ok=True)

    rank, world = process_group()
    options = {k: v for k, v in dict(eta=eta, spacing=spacing).items() if v is not None}
    shown = []  # (start, images) of the grid's batches
    mine = rank_batches(num_samples, batch_size, seed, rank, world)
    bar = tqdm(mine, desc=f"{sampler}-{steps}", unit="batch", disable=rank != 0)
    for start, n, batch_seed in bar:
        generator = torch.Generator(dev).manual_seed(batch_seed)
        with autocast(dev, precision):
            batch = draw(start, n, sampler=sampler, steps=steps, generator=generator, **options)
        for i, img in enumerate(to_unit(batch)):
            save_image(img, out / f"{start + i:06d}.png")
        if start < GRID_MAX:
            shown.append((start, batch[: GRID_MAX - start].cpu()))
    grid = first_images(shown, world)
    if rank == 0:
        save_grid(grid, out / "grid.png")
        print(f"wrote {num_samples} samples and grid.png to {out}")
    return out


def _guided(ddpm, classifier_path: str, labels, scale: float, num_samples: int, device):
    """``draw(start, n, **sampler_kw)`` of classifier-guided samples start … start + n − 1,
    their labels ``labels`` cycled, and a folder-name suffix."""
    from diffusion_apps.checkpoint import load_module
    from diffusion_apps.methods.guided import ClassifierGuidedDDPM, NoisyClassifier

    guided = ClassifierGuidedDDPM(ddpm, load_module(classifier_path, NoisyClassifier).to(device))
    classes = torch.tensor(labels if labels else range(guided.classifier.num_classes))
    targets = classes.repeat(-(-num_samples // len(classes)))[:num_samples]

    def draw(start: int, n: int, **kw):
        return guided.sample(targets[start : start + n], scale, **kw)

    return draw, f"_guided_s{scale:g}"
