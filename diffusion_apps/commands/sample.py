"""``python -m diffusion_apps sample``: N samples from a checkpoint, as PNG files and a grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from diffusion_apps.diffusion import Spacing

if TYPE_CHECKING:
    from torch import Tensor

GRID_MAX = 256  # images in grid.png
NPZ = "samples.npz"


def sample(
    ckpt_path: str,
    num_samples: int = 64,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    spacing: Spacing | None = None,
    seed: int = 0,
    batch_size: int = 64,
    out_dir: str | None = None,
    device: str = "auto",
    precision: Literal["auto", "32", "bf16"] = "auto",
    classifier_path: str | None = None,
    labels: list[int] | None = None,
    prompts: list[str] | None = None,
    scale: float | None = None,
    png: bool = True,
    npz: bool = True,
) -> Path:
    """Write ``num_samples`` images drawn from the model in ``ckpt_path``.

    The model, what it can be asked for and its default sampler come from the checkpoint (its
    method's :class:`~diffusion_apps.methods.protocol.Generation`). With ``classifier_path`` the
    DDPM is guided by that noisy classifier (classifier guidance); a conditional
    LatentDiffusion takes ``labels`` or ``prompts`` and guides by classifier-free guidance.

    Args:
        ckpt_path: checkpoint written by ``fit``.
        num_samples: how many images.
        sampler: one of the model's samplers ("ddpm" ancestral, "ddim", "dpmpp_2m"
            DPM-Solver++(2M); "consistency" for a consistency model); default: the checkpoint's.
        steps: sampler steps (DDPM with fewer than T steps is respaced); default: the checkpoint's.
        eta: DDIM η; default: the checkpoint's.
        spacing: the timestep subsequence; default: "logsnr" for dpmpp_2m (on uniform steps
            its last step overshoots), the checkpoint's ``timestep_spacing`` otherwise.
        seed: seed of the generators that draw x_T and the sampler noise, one per batch, so the
            images are the same whatever the number of processes.
        batch_size: images per forward pass.
        out_dir: where to write; default ``<run dir>/samples/<ckpt>_<sampler><steps>…``, every
            setting in its name (η, spacing, precision, N, seed, guidance). Numbered PNGs of an
            earlier, larger run there are removed first (said), so the folder holds one set.
        device: "auto" (CUDA when available), "cpu", "cuda", …
        precision: "bf16" runs the network under bfloat16 autocast (the sampler stays fp32);
            "auto": bf16 where the device runs it natively (a CPU with AVX512-BF16 or AMX, a
            bf16 GPU), else fp32. The choice is printed.
        classifier_path: a NoisyClassifier checkpoint trained for this DDPM: guided sampling.
        labels: the target classes, cycled over the samples (default 0, 1, …, K−1).
        prompts: a caption-conditioned LDM: captions ("thick slanted seven"), cycled likewise.
        scale: classifier guidance: the gradient scale s (default 1; 0: unguided). LDM: the
            classifier-free guidance scale w (default: the checkpoint's ``guidance_scale``).
            A DDPM trained with ``label_dropout``: Ho & Salimans's classifier-free weight w,
            (1 + w)·ε(y) − w·ε(∅) (0: conditional; default: the checkpoint's
            ``guidance_weight``).
        png: write one PNG per sample (``grid.png`` is written either way).
        npz: write every sample to ``samples.npz`` in the ADM evaluator's layout (``arr_0`` uint8
            N x H x W x C, the PNGs' pixels; ``arr_1`` the labels asked for, when the model takes
            labels), streamed batch by batch (:class:`~diffusion_apps.npz.NpzWriter`).

    Under ``torchrun`` the processes take the batches in turn and write their own files (their
    own parts of ``samples.npz``).

    Returns:
        The output folder, holding ``000000.png``…, ``samples.npz`` and ``grid.png`` (the first
        256 images).
    """
    from tqdm.auto import tqdm

    from diffusion_apps.checkpoint import load_module
    from diffusion_apps.commands.common import (
        check_disk_room,
        device_and_precision,
        writable_folder,
    )
    from diffusion_apps.distributed import first_images, process_group, rank_batches
    from diffusion_apps.evaluation.protocol import sample_batches
    from diffusion_apps.images import save_grid
    from diffusion_apps.methods import ClassifierGuidedDDPM
    from diffusion_apps.methods.protocol import SampleRequest, generation_of, sample_instead

    if num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}"
        )
    dev, precision = device_and_precision(device, precision)
    if classifier_path is None:
        module = load_module(ckpt_path).to(dev)
    else:
        module = ClassifierGuidedDDPM.from_checkpoints(ckpt_path, classifier_path).to(dev)
    generation = generation_of(module)
    if generation is None:
        instead = sample_instead(module)
        raise ValueError(
            f"sample: {ckpt_path} holds a {type(module).__name__}, which does not generate from "
            "nothing" + (f": {instead}" if instead else "")
        )
    conditions = {"labels": labels, "prompts": prompts}
    refused = [
        name for name, v in conditions.items() if v is not None and name not in generation.inputs
    ]
    takes = [f"--{name}" for name in conditions if name in generation.inputs]
    if refused and takes:  # a caption model: prompts, not labels
        raise ValueError(f"--{refused[0]}: {type(module).__name__} takes {' or '.join(takes)}")
    if refused:
        raise ValueError(
            "--labels needs --classifier_path (a NoisyClassifier checkpoint), a class-conditional "
            "DDPM or a conditional LatentDiffusion checkpoint; --prompts a caption-conditioned one"
        )
    asked = SampleRequest(sampler, steps, eta, spacing, labels=labels, prompts=prompts, scale=scale)
    generation.check(asked, f"sample: {ckpt_path}")
    sampler, steps = sampler or generation.sampler, steps or generation.steps
    tag = "_guided" if classifier_path else ""
    tag += "".join(f"_{k}{v:g}" for k, v in {"eta": eta, "s": scale}.items() if v is not None)
    tag += "".join(f"_{len(v)}{name}" for name, v in conditions.items() if v)
    tag += f"_{spacing}" if spacing else ""
    ckpt = Path(ckpt_path)
    name = f"{ckpt.stem}_{sampler}{steps}{tag}_{precision}_n{num_samples}_seed{seed}"
    out = Path(out_dir or ckpt.parent.parent / "samples" / name)
    settings = dict(sampler=sampler, steps=steps, eta=eta, spacing=spacing, scale=scale)
    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    writable_folder(out)
    try:
        shape, labelled = probe(module, generation.inputs_for(0, 1, labels, prompts), settings)
        check_disk_room(out, *disk_need(num_samples, shape, png, npz, labelled))
    except BaseException:  # a refusal, or the probe failed: leave no folder behind
        for folder in made:
            folder.rmdir()
        raise
    rank, world = process_group()
    shown = []  # (start, images) of the grid's batches
    mine = rank_batches(num_samples, batch_size, seed, rank, world)
    batches = sample_batches(module, mine, precision, labels, prompts, **settings)
    files = SampleFiles(out, num_samples, shape, labelled, png, npz, rank, world)
    # The files first: a refusal to preallocate them is said on a line of its own, not the bar's.
    with files, tqdm(total=len(mine), desc=f"{sampler}-{steps}", unit="batch",
                     disable=rank != 0) as bar:  # fmt: skip
        for start, batch, inputs, _ in batches:
            files.write(start, batch, inputs.get("labels"))
            if start < GRID_MAX:
                shown.append((start, batch[: GRID_MAX - start].cpu()))
            bar.update()
    grid = first_images(shown, world)
    if rank == 0:
        save_grid(grid, out / "grid.png")
        kinds = [what for what, wanted in (("PNGs", png), (NPZ, npz)) if wanted]
        print(f"wrote {num_samples} samples ({', '.join(kinds) or 'grid only'}) to {out}")
    return out


class SampleFiles:
    """N samples written as files into one folder batch by batch, as they are drawn, by one
    process or by every rank of a ``torchrun`` launch (each its own batches): ``000000.png``…
    named by sample index, each whole or absent (:func:`~diffusion_apps.images.save_png`), and
    ``samples.npz`` in the ADM evaluator's layout (:class:`~diffusion_apps.npz.NpzWriter`: there
    once the ``with`` block is left without an error, else absent). Numbered PNGs of an earlier,
    larger run in the folder are removed on entry (said), so that it holds one set.

    Args:
        out: the folder (it exists).
        num: N.
        shape: (C, H, W) of the images.
        labels: whether the batches come with labels (the npz's ``arr_1``).
        png, npz: which files to write.
        rank, world: this process, and how many write.
    """

    def __init__(
        self, out: Path, num: int, shape: Sequence[int], labels: bool, png: bool = True,
        npz: bool = True, rank: int = 0, world: int = 1,
    ) -> None:  # fmt: skip
        from diffusion_apps.npz import NpzWriter

        self.out, self.num, self.png, self.rank = Path(out), num, png, rank
        self.arrays = NpzWriter(self.out / NPZ, num, shape, labels, rank, world) if npz else None

    def __enter__(self) -> SampleFiles:
        stale = [p for p in self.out.glob("[0-9]" * 6 + ".png") if int(p.stem) >= self.num]
        if stale and self.rank == 0:  # the others are overwritten by this run
            for path in stale:
                path.unlink()
            print(f"removed {len(stale)} samples of an earlier, larger run from {self.out}")
        if self.arrays is not None:
            self.arrays.__enter__()
        return self

    def write(self, start: int, images: Tensor, labels: Sequence[int] | None = None) -> None:
        """Images (B, C, H, W) in [−1, 1] (and their B labels) as samples start … start+B−1."""
        from diffusion_apps.images import save_png, to_unit

        if self.png:
            for i, image in enumerate(to_unit(images)):
                save_png(image, self.out / f"{start + i:06d}.png")
        if self.arrays is not None:
            self.arrays.write(start, images, labels)

    def __exit__(self, kind, error, trace) -> None:
        if self.arrays is not None:
            self.arrays.__exit__(kind, error, trace)


def probe(module, inputs: dict, settings: dict) -> tuple[tuple[int, ...], bool]:
    """The shape (C, H, W) of the model's images, and whether they are drawn for labels: one
    image drawn in one step, before any file is written."""
    import torch

    generator = torch.Generator(module.device).manual_seed(0)
    one = module.sample(1, generator=generator, **inputs, **(settings | {"steps": 1}))
    return tuple(one.shape[1:]), "labels" in inputs


def disk_need(
    num_samples: int, shape: tuple[int, ...], png: bool, npz: bool, labelled: bool
) -> tuple[int, str]:
    """The most bytes ``sample`` writes, and what: RGB PNGs (3 bytes a pixel, a filter byte a row,
    a header), and ``samples.npz`` twice over (its preallocated ``.npy`` files, then the packed
    copy)."""
    c, h, w = shape
    pngs = num_samples * (h * (3 * w + 1) + 1024) if png else 0
    arrays = 2 * (num_samples * (c * h * w + 8 * labelled) + 4096) if npz else 0
    if png:
        what = f"{NPZ} and {num_samples} PNG samples" if npz else f"{num_samples} PNG samples"
    else:
        what = f"{NPZ} of {num_samples} samples" if npz else "grid.png"
    return pngs + arrays, what
