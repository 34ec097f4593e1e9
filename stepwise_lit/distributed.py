"""Multi-process training: resumable data order, marked evaluation padding, FSDP2 sharding,
the FSDP1 wrap policy, full state dicts for export, the SIGTERM checkpoint, and per-rank RNG
state in checkpoints.

The data helpers keep two promises. A resumed run sees the same batches as an uninterrupted
one (`EpochRandomSampler` fixes each epoch's order by seed and epoch, `ResumableDataLoader`
skips what the interrupted epoch already trained on). Evaluation under DDP or FSDP gives
every rank the same number of batches (forward passes there are collective) without letting
the duplicated rows that even this out count in a metric (`PaddedShardSampler` + `MarkedRows`
+ `PairWeightCollator` give them `pair_weights` 0).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

log = logging.getLogger("stepwise_lit")

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


# ------------------------------------------------------------------------------ models


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face model (also under PEFT): the modules whose class
    is named in a `_no_split_modules` list, the blocks Hugging Face keeps whole when splitting."""
    names = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or ())}
    return [module for module in model.modules() if type(module).__name__ in names]


def fully_shard_causal_lm(model: torch.nn.Module, mesh) -> None:
    """FSDP2: shards each decoder layer as its own group, then the model as a root (embeddings,
    final norm and head). Each model sharded this way all-gathers and reshards on its own.

    Args:
        model: A Hugging Face causal LM, optionally wrapped by PEFT.
        mesh: The 1-D data-parallel device mesh to shard over.

    Raises:
        ValueError: When the model names no decoder layer class.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); cannot shard it")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def reshard_frozen(model: torch.nn.Module) -> None:
    """Frees the gathered weights of an FSDP2-sharded frozen model after its forward: FSDP2 keeps
    a root's weights (embeddings, head) gathered after forward for the backward that follows,
    and a frozen model has none. Nothing to do for other models."""
    if isinstance(model, FSDPModule):
        model.reshard()


class CausalLMWrapPolicy(ModuleWrapPolicy):
    """FSDP1 auto-wrap policy for any Hugging Face causal LM: each decoder layer (a transformers
    `GradientCheckpointingLayer`) and each `*ForCausalLM` model (a `GenerationMixin`) becomes its
    own FSDP unit, whatever the architecture. Give it to `FSDPStrategy(auto_wrap_policy=...)`.
    """

    def __init__(self) -> None:
        from transformers import GenerationMixin
        from transformers.modeling_layers import GradientCheckpointingLayer

        super().__init__({GradientCheckpointingLayer, GenerationMixin})


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether `module` holds FSDP1 or FSDP2 sharded parameters."""
    return any(isinstance(child, (FSDPModule, FullyShardedDataParallel)) for child in module.modules())


def full_state_dict(root: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full, unsharded CPU tensors of `root`'s state dict whose key starts with `prefix` (the
    prefix removed). A collective: call it on every rank; with sharded weights only rank 0's
    result is filled.

    Args:
        root: The module to read, e.g. the strategy's wrapped model.
        prefix: Keep only keys under this prefix, e.g. `"policy."`.
    """
    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def whole_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict, whole and on the CPU. When FSDP shards `model` it is gathered on
    rank 0 (a collective: every rank calls it; the others get an empty dict)."""
    if is_sharded(model):
        return full_state_dict(model)
    return {key: value.cpu() for key, value in model.state_dict().items()}


def load_whole_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads what `whole_state_dict` returned (on every rank), sharding it as `model` is."""
    if is_sharded(model):
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copies `src`'s parameters and buffers into every rank's `module` (a collective)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        torch.distributed.broadcast(tensor.data, src=src)


# ------------------------------------------------------------------------------ faults


class CheckpointOnSigterm(L.Callback):
    """Stops a run on SIGTERM (a scheduler's preemption, `kill`) after the current training step,
    saving `last.ckpt` in the `ModelCheckpoint` folder first, so `--ckpt_path last` resumes there.

    The signal handler only sets a flag. After each training batch the ranks agree whether any of
    them got SIGTERM (one small all-reduce), so every rank stops at the same step and the save (a
    collective under DDP and FSDP) runs on all of them. It replaces Lightning's SIGTERM handler,
    which runs a collective inside the handler and can deadlock a DDP run.
    """

    def __init__(self) -> None:
        self.received = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.received = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.strategy.reduce_boolean_decision(self.received, all=False):
            raise SIGTERMException

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or checkpoint.dirpath is None:
            log.warning("stopped by SIGTERM; no checkpoint saved (the run has no ModelCheckpoint)")
            return
        path = os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
        trainer.save_checkpoint(path)
        log.warning("stopped by SIGTERM after step %d; saved %s", trainer.global_step, path)


# ------------------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states, in types that `torch.load`
    reads with `weights_only=True` (the numpy key array as a list)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, keys.tolist(), position, has_gauss, gauss),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's `rng_state()`, in rank order (a collective when distributed)."""
    state = rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    states: list[dict[str, Any] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states
