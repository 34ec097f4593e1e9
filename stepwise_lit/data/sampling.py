"""Data order and evaluation padding for one or many processes.

A resumed run sees the same batches as an uninterrupted one (`EpochRandomSampler` fixes each
epoch's order by seed and epoch, `RoundSampler` an online round's by seed and round,
`ResumableDataLoader` skips what the interrupted epoch already trained on). Evaluation under DDP or FSDP gives every rank the same number of batches (forward
passes there are collective) without letting the duplicated rows that even this out count in a
metric (`PaddedShardSampler` + `MarkedRows` + `PairWeightCollator` give them `pair_weights` 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

PAIR_WEIGHT = "pair_weight"


class EpochRandomSampler(RandomSampler):
    """A random order fixed by `seed + epoch`: the permutation `DistributedSampler` draws.

    Lightning calls `set_epoch` at the start of every epoch (and of the resumed one), so a
    run restarted from a checkpoint sees each epoch in the same order as an uninterrupted
    run. Under DDP Lightning replaces it by its `DistributedSampler` (seeded by
    `seed_everything`), which keeps the same property.

    Args:
        data_source: The dataset.
        seed: Seed of every epoch's permutation.
    """

    def __init__(self, data_source: Sequence, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the permutation of `epoch`."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class RoundSampler(Sampler[int]):
    """`num_samples` positions of a round's `size` pairs: successive random permutations of
    them, concatenated and cut, so an online round trains a fixed number of batches whatever
    its number of pairs (every pair once before any pair twice).

    The order is fixed by `seed` (the data seed plus the round), not by the epoch. Under DDP,
    Lightning wraps it in its `DistributedSamplerWrapper`, which gives each rank every
    `world_size`-th position without shuffling further, so `num_samples` counts all ranks.

    Args:
        size: Pairs in the round (at least 1).
        num_samples: Positions handed out per epoch.
        seed: Seed of the permutations.
    """

    def __init__(self, size: int, num_samples: int, seed: int) -> None:
        if size < 1:
            raise ValueError(f"RoundSampler needs at least one pair, got {size}")
        self.size = size
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0  # Lightning sets it; the order does not depend on it

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        passes = -(-self.num_samples // self.size)
        order = torch.cat([torch.randperm(self.size, generator=generator) for _ in range(passes)])
        yield from order[: self.num_samples].tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader that resumes mid-epoch through Lightning's stateful-loader protocol.

    Lightning stores `state_dict()` in every checkpoint and calls `load_state_dict()` before
    the resumed run first iterates. The state is the sampler's epoch and how many batches of
    that epoch were handed out; the resumed pass of the same epoch drops that many batches
    (fetched and discarded, so any sampler, batch sampler or worker setting gives the same
    batches as before). With a length, Lightning fetches each batch just before its step, so
    at a checkpoint taken after step k exactly k batches were handed out.

    Iteration starts lazily, at the first batch, after Lightning has set the epoch.
    """

    _resume: tuple[int | None, int] | None = None
    _handed_out: tuple[int | None, int] = (None, 0)

    def state_dict(self) -> dict[str, int | None]:
        """The epoch of the current pass and the batches it has handed out."""
        epoch, batches = self._handed_out
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        """Makes the next pass over epoch `state["epoch"]` skip its first `state["batches"]` batches."""
        self._resume = (state["epoch"], state["batches"])

    def __iter__(self) -> Iterator[Any]:
        epoch = self._sampler_epoch()
        resume, self._resume = self._resume, None
        skip = resume[1] if resume is not None and resume[0] == epoch else 0
        self._handed_out = (epoch, skip)
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self._handed_out = (epoch, index + 1)
                yield batch

    def _sampler_epoch(self) -> int | None:
        samplers = (self.sampler, getattr(self.batch_sampler, "sampler", None))
        return next((sampler.epoch for sampler in samplers if hasattr(sampler, "epoch")), None)


class PaddedShardSampler(DistributedSampler):
    """One rank's in-order share of an evaluation set, as long as every other rank's.

    Yields positions `rank, rank + R, ...` below `total_size`; positions at or past the
    dataset's length are the padding `DistributedSampler` would fill with repeated rows.
    Read them through `MarkedRows`, which repeats the row and marks it with weight 0.
    Lightning leaves a `DistributedSampler` in place, so it does not re-pad.

    Args:
        dataset: The evaluation rows.
        num_replicas: Number of data-parallel ranks.
        rank: This rank's data-parallel index.
    """

    def __init__(self, dataset: Sequence, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class MarkedRows(Dataset):
    """Rows with a `pair_weight`: 1.0 for a real position, 0.0 for a padding position
    (a position `p >= len(rows)`, which repeats row `p % len(rows)`).

    Args:
        rows: The rows (dicts), e.g. a tokenized `datasets.Dataset`.
    """

    def __init__(self, rows: Sequence[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict:
        row = dict(self.rows[position % len(self.rows)])
        row[PAIR_WEIGHT] = float(position < len(self.rows))
        return row


class PairWeightCollator:
    """Runs a collator and adds the rows' `pair_weight` values as `pair_weights` (float `[B]`).

    Args:
        collator: Turns a list of rows into a batch dict.
    """

    def __init__(self, collator: Callable[[Sequence[dict]], dict]) -> None:
        self.collator = collator

    def __call__(self, rows: Sequence[dict]) -> dict:
        batch = self.collator(rows)
        batch["pair_weights"] = torch.tensor([row[PAIR_WEIGHT] for row in rows], dtype=torch.float32)
        return batch
