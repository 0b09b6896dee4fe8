"""ResumableSampler: the training order is a function of (seed, epoch), resumable mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose first epoch after a resume skips the samples already trained on.

    The order of epoch e is ``randperm(N, seed + e)`` (DistributedSampler's), cut into one slice
    per rank, so it never depends on the global random state, and a run resumed mid-epoch draws
    the same batches as the run it continues. Being a DistributedSampler, Lightning leaves it in
    place under DDP and sets its epoch.

    Args:
        dataset: the training set.
        num_replicas: number of ranks (``trainer.world_size``).
        rank: this rank.
        seed: seed of every epoch's permutation.
        epoch: epoch of the first iteration.
        skip: samples of this rank's slice of ``epoch`` to skip (already trained on); other
            epochs are whole. ``len()`` stays the whole slice, as the trainer's batch count
            of the epoch includes the skipped batches.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        epoch: int = 0,
        skip: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.epoch, self.resume_epoch, self.skip = epoch, epoch, skip

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.epoch == self.resume_epoch:
            indices, self.skip = indices[self.skip :], 0
        return iter(indices)
