"""The generation protocol of ``eval``: N samples per sampler setting, scored against real data.

Samples come from the method's one ``sample`` call, asked for what its
:class:`~diffusion_apps.methods.protocol.Generation` declares; :func:`sample_batches` is the
loop the ``sample`` command draws with too. The floor row scores real val against real train of
the same data (:mod:`diffusion_apps.evaluation.reference`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch
from torch import Tensor

from diffusion_apps import stop
from diffusion_apps.distributed import block_batches, first_images, max_over_ranks
from diffusion_apps.evaluation.report import Row
from diffusion_apps.methods.protocol import Generation, generation_of
from diffusion_apps.precision import autocast

GRID_SIZE = 64  # images in a sample grid
MIN_SAMPLES = 4  # precision/recall with k = 3 neighbours needs k + 1 points


class SamplerSetting(NamedTuple):
    """One ``sampler:steps[:spacing]`` setting."""

    name: str
    steps: int
    spacing: str | None = None  # the timestep subsequence; None: the checkpoint's

    @property
    def label(self) -> str:
        """How the report names it: ``ddim``, or ``dpmpp_2m (logsnr)``."""
        return self.name if self.spacing is None else f"{self.name} ({self.spacing})"


def plain_metrics(values: dict) -> dict[str, float | int]:
    """Metric values as Python numbers: counts (``n``, ``n_real``, ``n_fake``) as int."""
    return {k: int(v) if k == "n" or k.startswith("n_") else float(v) for k, v in values.items()}


def floor_row(reference, metric) -> Row:
    """The floor row of a :class:`~diffusion_apps.evaluation.reference.Reference` with a
    held-out split: real val scored against real train in ``metric`` (which holds the
    reference), on this process alone."""
    from diffusion_apps.evaluation.reference import score

    metrics = plain_metrics(score(metric, reference.held_out))
    return Row(
        "FLOOR: real val vs real train", "FLOOR", None, "–", None, metrics["n_fake"], metrics,
        None, reference.line(),
    )  # fmt: skip


def check_samplers(settings: Sequence[SamplerSetting], generations: Sequence[Generation]) -> None:
    """Every setting must be a sampler of at least one of the ``generations``."""
    names = list(dict.fromkeys(n for g in generations for n in g.samplers))
    for setting in settings if generations else ():
        if setting.name not in names:
            raise ValueError(
                f"--samplers: no checkpoint has a sampler {setting.name!r} "
                f"(they have {', '.join(names)})"
            )


def sample_batches(
    module,
    batches: Sequence[tuple[int, int, int]],
    precision: str,
    labels: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    **settings,
) -> Iterator[tuple[int, Tensor, dict, float]]:
    """``(start, images, inputs, seconds)`` for each ``(start, n, seed)`` of ``batches``
    (:func:`~diffusion_apps.distributed.rank_batches`): ``module.sample`` of n images from a
    generator seeded ``seed``, asked for the ``inputs`` of samples start … start + n − 1
    (``labels``/``prompts`` cycled, or the method's default classes:
    :meth:`~diffusion_apps.methods.protocol.Generation.inputs_for`), the network under
    ``precision``'s autocast; images (n, C, H, W) in [−1, 1], fp32; seconds of sampling.

    SIGTERM or Ctrl-C stops it within a sampler step (:mod:`diffusion_apps.stop`): a
    :class:`~diffusion_apps.stop.StopRequested` (exit code 128 + the signal) that says how many
    samples were drawn (and handed on) before it; outside a run that handles it (``fit``), the
    line is printed here."""
    generation, device = generation_of(module), module.device
    total, drawn = sum(n for _, n, _ in batches), 0
    with stop.on_signals() as outermost:
        try:
            for start, n, seed in batches:
                stop.check()
                generator = torch.Generator(device).manual_seed(seed)
                inputs = generation.inputs_for(start, n, labels, prompts)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                tic = time.perf_counter()
                with autocast(device, precision):
                    x = module.sample(n, generator=generator, **inputs, **settings).float()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                yield start, x, inputs, time.perf_counter() - tic
                drawn += n  # the caller is done with them: it asks for the next batch
        except stop.StopRequested as stopped:
            stopped.done = stopped.done or f"{drawn} of {total} samples drawn, the rest not"
            if outermost:
                print(stopped, file=sys.stderr, flush=True)
            raise


def generation_rows(
    module, name, step, settings, metric, args, rank, world,
    files: Callable[[SamplerSetting], AbstractContextManager] | None = None,
) -> tuple[list, list]:  # fmt: skip
    """One row per sampler setting the module offers (its own default when it offers none of
    them), and the (file stem, grid) of each. Every setting draws its batches with the same
    seeds, so the samplers are compared on the same x_T (common random numbers), and the
    samples are the same whatever the number of processes. Each rank draws a contiguous run of
    the batches (:func:`~diffusion_apps.distributed.block_batches`): ``metric``'s features,
    gathered in rank order when it computes, are in sample order, so that KID's subsets and
    IS's splits are those of one process; every rank computes the statistics once, over all
    the ranks' samples (the same numbers on each).

    ``files(setting)``: a context manager whose ``write(start, images, labels)`` takes each
    batch as it is drawn (:class:`~diffusion_apps.commands.sample.SampleFiles`), so that no
    rank holds more than a batch of images."""
    from tqdm.auto import tqdm

    generation, method = generation_of(module), type(module).__name__
    own = [s for s in settings if s.name in generation.samplers]
    if len(own) < len(settings) and rank == 0:
        skipped = ", ".join(f"{s.name}:{s.steps}" for s in settings if s not in own)
        print(f"eval: {name}: {method} has no sampler of {skipped}; not run")
    own = own or [SamplerSetting(generation.sampler, generation.steps)]
    metric = metric.to(module.device)
    batches = block_batches(args["num_samples"], args["batch_size"], args["seed"], rank, world)
    rows, grids = [], []
    for setting in own:
        kept, seconds = [], 0.0  # kept: (start, images) of the grid's batches
        desc, total = f"{name} {setting.name}-{setting.steps}", sum(n for _, n, _ in batches)
        bar = tqdm(total=total, desc=desc, unit="img", disable=rank != 0, leave=False)
        extra = {} if setting.spacing is None else {"spacing": setting.spacing}
        drawn = sample_batches(
            module, batches, args["precision"], sampler=setting.name, steps=setting.steps, **extra
        )
        with files(setting) if files else nullcontext() as writer:
            for start, x, inputs, spent in drawn:
                seconds += spent
                if writer is not None:
                    writer.write(start, x, inputs.get("labels"))
                labels = inputs.get("labels") if args["space"] == "digits" else None
                labels = None if labels is None else torch.tensor(labels, device=x.device)
                metric.update(x, real=False, labels=labels)
                if start < GRID_SIZE:
                    kept.append((start, x[: GRID_SIZE - start].cpu()))
                bar.update(len(x))
        bar.close()
        grids.append((f"{setting.label}{setting.steps}", first_images(kept, world)))
        metrics = plain_metrics(metric.compute())
        metric.reset()
        nfe = module.nfe(setting.name, setting.steps)
        seconds = max_over_ranks(seconds, world)
        n_total = args["num_samples"]
        rows.append(Row(name, method, step, setting.label, nfe, n_total, metrics, seconds))
    return rows, grids
