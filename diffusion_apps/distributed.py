"""Sharing sampling work between the processes of a ``torchrun`` launch (``sample``, ``eval``).

Training's DDP is Lightning's (``--trainer.devices 2 --trainer.strategy ddp``), with
``ImageDataModule`` splitting the batches across the ranks; of this module it uses
:func:`gather` (every rank's random state, in checkpoints), :func:`pooled_mean_std` (statistics
of the data measured before training) and :func:`predict_indices`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def process_group() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():  # one GPU per process: collectives use the current one
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(n: int, rank: int, world: int) -> int:
    """Rank ``rank``'s share of ``n`` samples: ``n // world``, plus one for the first ``n % world``
    ranks, so the shares add up to ``n``."""
    return n // world + (rank < n % world)


def batch_seeds(seed: int, num_batches: int) -> list[int]:
    """Generator seeds of batches 0, 1, …: a sequence drawn from ``seed``, so batch b draws the
    same noise whichever process takes it."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2**62, (num_batches,), generator=generator).tolist()


def rank_batches(num_samples: int, batch_size: int, seed: int, rank: int, world: int) -> list:
    """This rank's batches ``(start, size, generator seed)`` of ``num_samples`` drawn
    ``batch_size`` at a time: the ranks take the batches in turn, and batch b's seed is the b-th
    of a sequence drawn from ``seed``, so the samples are the same whatever the number of
    processes, and every rank's differ."""
    starts = range(0, num_samples, batch_size)
    seeds = batch_seeds(seed, len(starts))
    return [
        (start, min(batch_size, num_samples - start), seeds[b])
        for b, start in enumerate(starts)
        if b % world == rank
    ]


def block_batches(num_samples: int, batch_size: int, seed: int, rank: int, world: int) -> list:
    """The batches of :func:`rank_batches` (the same starts, sizes and seeds), each rank taking a
    contiguous run of them instead of taking them in turn: rank r's share (:func:`rank_share`)
    follows those of ranks 0 … r − 1, so that what the ranks hold, gathered in rank order (a
    torchmetrics ``cat`` state), is in sample order, as one process holds it."""
    every = rank_batches(num_samples, batch_size, seed, 0, 1)
    first = sum(rank_share(len(every), r, world) for r in range(rank))
    return every[first : first + rank_share(len(every), rank, world)]


def max_over_ranks(value: float, world: int) -> float:
    """The largest ``value`` over the ``world`` ranks (the slowest rank's seconds)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def gather(value, world: int) -> list:
    """Every rank's ``value`` (any picklable object), in rank order."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def pooled_mean_std(
    sums: torch.Tensor, squares: torch.Tensor, count: int, trainer=None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(μ, σ, n) of values of which this process holds the sums Σz, Σz² (float64) and the count:
    μ = Σz/n, σ = √((Σz² − nμ²)/(n − 1)), the sums first added up over every rank of the
    Lightning ``trainer`` (None: this process alone), so each rank gets the statistics of all
    the ranks' data, not of its own shard."""
    totals = torch.stack([sums, squares, torch.full_like(sums, count)])
    if trainer is not None:
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
    sums, squares, n = totals
    mean = sums / n
    var = (squares / n - mean.square()).clamp(min=0) * n / (n - 1)
    return mean, var.sqrt(), int(n.flatten()[0])


def predict_indices(trainer, batch_idx: int, dataloader_idx: int = 0) -> list[int]:
    """The dataset indices of the items of predict batch ``batch_idx``, as Lightning's predict
    loop records them (under DDP its sampler deals the items out to the ranks in turn)."""
    loaders = trainer.predict_dataloaders
    loader = loaders[dataloader_idx] if isinstance(loaders, list | tuple) else loaders
    return loader.batch_sampler.seen_batch_indices[batch_idx]


def first_images(batches: list, world: int) -> torch.Tensor:
    """The images of every rank's ``batches`` — ``(start, images)`` pairs, where ``start`` is the
    index of the batch's first sample — in sample order: a grid as one process draws it."""
    parts = sorted((p for mine in gather(batches, world) for p in mine), key=lambda p: p[0])
    return torch.cat([images for _, images in parts])
