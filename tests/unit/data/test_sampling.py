"""Resume pieces of the data stage: the epoch-keyed sampler and the loader that skips what an
interrupted epoch trained on (RNG state in checkpoints: tests/unit/test_faults.py; end-to-end
kill / resume runs: tests/e2e/test_distributed.py)."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from stepwise_lit.data.collate import LengthGroupedBatchSampler
from stepwise_lit.data.sampling import EpochRandomSampler, ResumableDataLoader

ROWS = list(range(23))


def test_epoch_sampler_order_is_fixed_by_seed_and_epoch():
    """Each epoch's order is `DistributedSampler`'s for one replica (the order a DDP run draws
    from), the same on every pass, and differs between epochs."""
    sampler, reference = EpochRandomSampler(ROWS, seed=3), DistributedSampler(ROWS, num_replicas=1, rank=0, seed=3)
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        reference.set_epoch(epoch)
        assert list(sampler) == list(sampler) == list(reference)
        orders.append(list(sampler))
    assert orders[0] != orders[1] and sorted(orders[0]) == ROWS


def loader(group_by_length: bool) -> ResumableDataLoader:
    sampler = EpochRandomSampler(ROWS, seed=0)
    if group_by_length:
        batches = LengthGroupedBatchSampler(sampler, 4, drop_last=False, lengths=[r % 5 for r in ROWS], group_factor=2)
        return ResumableDataLoader(ROWS, batch_sampler=batches)
    return ResumableDataLoader(ROWS, batch_size=4, sampler=sampler)


def epoch_batches(data: ResumableDataLoader, epoch: int) -> list[list[int]]:
    """The batches of one epoch (Lightning sets the epoch on the batch sampler's sampler too)."""
    data.batch_sampler.sampler.set_epoch(epoch)
    return [batch.tolist() for batch in data]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_loader_resumes_the_interrupted_epoch_where_it_stopped(group_by_length):
    """After 3 batches of epoch 1 the state says so; a new loader given that state hands out
    the rest of epoch 1, then the whole of epoch 2."""
    uninterrupted = loader(group_by_length)
    expected = {epoch: epoch_batches(uninterrupted, epoch) for epoch in (1, 2)}

    interrupted = loader(group_by_length)
    epoch_batches(interrupted, 1)  # set the epoch
    iterator = iter(interrupted)
    taken = [next(iterator).tolist() for _ in range(3)]
    assert taken == expected[1][:3]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 3}

    resumed = loader(group_by_length)
    resumed.load_state_dict(state)
    assert epoch_batches(resumed, 1) == expected[1][3:]
    assert resumed.state_dict() == {"epoch": 1, "batches": len(expected[1])}
    assert epoch_batches(resumed, 2) == expected[2]


def test_loader_state_from_another_epoch_skips_nothing():
    """A checkpoint taken at the end of epoch 1 resumes in epoch 2, which starts from its first batch."""
    resumed = loader(group_by_length=False)
    resumed.load_state_dict({"epoch": 1, "batches": 6})
    assert epoch_batches(resumed, 2) == epoch_batches(loader(group_by_length=False), 2)
