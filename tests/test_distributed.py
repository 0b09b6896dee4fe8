"""The ranks' shares of sampling work under torchrun."""

from diffusion_apps.distributed import rank_batches


def test_ranks_take_the_batches_of_one_process_in_turn():
    one = rank_batches(23, 5, seed=7, rank=0, world=1)
    assert [(start, size) for start, size, _ in one] == [(0, 5), (5, 5), (10, 5), (15, 5), (20, 3)]
    assert len({seed for _, _, seed in one}) == 5  # every batch its own noise
    for world in (2, 3, 8):
        shares = [rank_batches(23, 5, 7, rank, world) for rank in range(world)]
        assert sorted(b for share in shares for b in share) == one
    assert rank_batches(23, 5, 8, 0, 1) != one  # another seed, other noise
