"""ResumableSampler: the order of an epoch is a function of (seed, epoch), and resumes mid-way."""

import torch

from diffusion_apps.data.sampler import ResumableSampler

DATA = list(range(40))


def order(sampler) -> list[int]:
    return list(iter(sampler))


def test_order_depends_on_seed_and_epoch_only():
    first = order(ResumableSampler(DATA, seed=3, epoch=2))
    torch.manual_seed(123)  # the global stream plays no part
    assert order(ResumableSampler(DATA, seed=3, epoch=2)) == first
    assert sorted(first) == DATA and first != DATA
    assert order(ResumableSampler(DATA, seed=3, epoch=3)) != first
    assert order(ResumableSampler(DATA, seed=4, epoch=2)) != first


def test_resume_skips_the_trained_part_of_its_epoch_only():
    whole = ResumableSampler(DATA, seed=0)
    epochs = []
    for epoch in range(3):
        whole.set_epoch(epoch)
        epochs.append(order(whole))
    resumed = ResumableSampler(DATA, seed=0, epoch=1, skip=16)
    assert len(resumed) == 40  # the trainer counts the skipped batches in the epoch
    assert order(resumed) == epochs[1][16:]
    resumed.set_epoch(2)
    assert order(resumed) == epochs[2]


def test_ranks_split_each_epoch_without_overlap():
    ranks = [order(ResumableSampler(DATA, num_replicas=2, rank=r, seed=5, epoch=1)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 20
    assert sorted(ranks[0] + ranks[1]) == DATA
    one = order(ResumableSampler(DATA, seed=5, epoch=1))
    assert ranks[0] == one[0::2] and ranks[1] == one[1::2]
    skipped = order(ResumableSampler(DATA, num_replicas=2, rank=1, seed=5, epoch=1, skip=6))
    assert skipped == ranks[1][6:]
