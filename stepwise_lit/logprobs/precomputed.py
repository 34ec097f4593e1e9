"""``reference: precomputed``: per-step reference log-probs computed once per run and cached on disk.

`PrecomputedReference` runs one reference pass over the data's splits (`compute_table`), writes
each split's ``[rows, 2, S]`` table with `write_atomically` under a key of the data's fingerprint
and the reference weights, and then looks batches up by their ``row_index``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from stepwise_lit.data.batch import PairBatch
from stepwise_lit.data.records import SIDES
from stepwise_lit.logprobs.forward import step_logps
from stepwise_lit.logprobs.lean import LeanLogps
from stepwise_lit.logprobs.reference import Reference
from stepwise_lit.models.distributed import reshard_frozen, shows_progress

log = logging.getLogger("stepwise_lit")

CACHE_FORMAT = 1
"""Bump when the cached values would change for the same key."""
SAMPLES_PER_TENSOR = 4096
"""Weights hashed per parameter for the reference fingerprint (evenly spaced, plus the shape)."""


@dataclass(frozen=True)
class ReferenceData:
    """What the precomputed reference reads from the data side.

    Attributes:
        datasets: Split ("train", "val") -> its tokenized rows (splits the data module lacks are left out).
        collate: Turns a list of rows into a `PairBatch`.
        batch_size: Pairs per batch of the reference pass.
        fingerprint: The data module's fingerprint (data, tokenizer, lengths, options).
        cache_root: Folder under which the cache files go (``<cache_root>/reference/``).
        max_length: The data's `max_length`.
    """

    datasets: dict
    collate: Callable[[list[dict]], PairBatch]
    batch_size: int
    fingerprint: str
    cache_root: Path
    max_length: int | None


def reference_data(datamodule) -> ReferenceData:
    """The `ReferenceData` of a `stepwise_lit.data.StepwiseDataModule`."""
    hparams = datamodule.hparams
    datasets = {"train": datamodule.train_dataset, "val": datamodule.val_dataset}
    return ReferenceData(
        datasets={split: rows for split, rows in datasets.items() if rows is not None},
        collate=datamodule.collator(),
        batch_size=hparams.get("eval_batch_size") or hparams["batch_size"],
        fingerprint=datamodule.fingerprint,
        cache_root=Path(datamodule.cache_root),
        max_length=hparams.get("max_length"),
    )


class PrecomputedReference(Reference):
    """``reference: precomputed``: per-step reference log-probs computed once and cached on disk.

    The first batch of a run (the sanity check's or training's; for validate, test and predict
    the first evaluation batch) triggers one reference pass over the data's splits (train and
    val when fitting, val otherwise: test and predict read the val split), after the strategy has
    placed and sharded the models and any checkpoint has been restored, before the first
    optimizer step. Each rank computes its share of the rows (FSDP2 forwards are collective),
    the shares are all-gathered and rank 0 writes the cache. Then each batch is looked up by
    its ``row_index``, and training holds no reference model.

    The reference is the policy's starting point (adapters disabled), or the model `load_model`
    builds (from ``ref_model_name_or_path``), loaded for the pass and freed. Cache files
    (``<cache_root>/reference/<key>.safetensors``) are keyed by the data fingerprint, the split,
    the tokenizer, `max_length`, the reference (a hash of its starting weights, or its path), the
    precision and dtype. The fingerprint goes into checkpoints, so a resumed run (whose policy has
    moved) finds the same files; it cannot recompute them.

    Args:
        policy: The policy (a PEFT model with LoRA).
        tokenizer: The run's tokenizer (part of the cache key).
        data: Gives the `ReferenceData` of the trainer's data module (`reference_data`).
        load_model: Builds the reference model, or None: the reference is the policy's start.
        source: ``ref_model_name_or_path``, or None.
        dtype: The ``dtype`` setting (part of the key).
        lean: The run's lean path (`stepwise_lit.logprobs.forward.step_logps`).

    Attributes:
        tables: Split -> float ``[N, 2, S_max]``: row, side (chosen, rejected), step.
        computed: Splits whose table this process computed rather than loaded from the cache.
        fingerprint: What identifies the reference (kept in checkpoints).
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer,
        data: Callable[[L.Trainer], ReferenceData],
        load_model: Callable[[], torch.nn.Module] | None = None,
        source: str | None = None,
        dtype: str | None = None,
        lean: LeanLogps | None = None,
    ) -> None:
        self.policy, self.tokenizer, self.data = policy, tokenizer, data
        self.load_model, self.source, self.dtype, self.lean = load_model, source, dtype, lean
        self.tables: dict[str, torch.Tensor] = {}
        self.computed: list[str] = []
        self.fingerprint: str | None = None
        self.split = "train"

    def begin_batch(self, trainer: L.Trainer, split: str) -> None:
        self.split = split
        if split not in self.tables:
            self.prepare(trainer, ("train", "val") if trainer.state.fn == "fit" else ("val",))

    def step_logps(self, batch: PairBatch, num_steps: int) -> torch.Tensor:
        if "row_index" not in batch:
            raise RuntimeError(
                "reference: precomputed needs batches with a 'row_index' (StepwiseDataModule adds it); "
                "this batch has none"
            )
        rows = self.tables[self.split][batch["row_index"].cpu()]  # [B, 2, S_max]
        values = torch.cat([rows[:, 0, :num_steps], rows[:, 1, :num_steps]])  # [2B, S]
        return values.to(batch["step_mask"].device).float()

    def state_dict(self) -> dict:
        return {"reference_fingerprint": self.fingerprint}

    def load_state_dict(self, checkpoint: dict) -> None:
        self.fingerprint = checkpoint.get("reference_fingerprint")

    def prepare(self, trainer: L.Trainer, splits: tuple[str, ...]) -> None:
        """Loads or computes the tables of all `splits` the data has, together: the policy is
        the reference only before its first update, so nothing is left for later."""
        data = self.data(trainer)
        datasets = {split: data.datasets[split] for split in splits if split in data.datasets}
        if not datasets:
            raise RuntimeError(f"reference: precomputed needs the data module's {' or '.join(splits)} dataset")
        policy_is_reference = self.load_model is None
        fresh = self.fingerprint is None and trainer.ckpt_path is None and trainer.global_step == 0
        if self.fingerprint is None:
            if policy_is_reference and not fresh:
                raise RuntimeError(
                    "reference: precomputed, but the policy has moved (resumed run) and no reference "
                    "fingerprint was saved with it, so its reference log-probs can be neither found nor recomputed"
                )
            self.fingerprint = self.source_fingerprint()
        paths = {split: self.cache_path(trainer, data, dataset, split) for split, dataset in datasets.items()}
        missing = [split for split, path in paths.items()
                   if not trainer.strategy.reduce_boolean_decision(path.exists(), all=True)]
        if missing and policy_is_reference and not fresh:
            raise RuntimeError(
                f"reference: precomputed: no cached reference log-probs at {paths[missing[0]]}, and the policy "
                "has moved since they were computed (resumed run), so they cannot be recomputed"
            )
        for split in paths.keys() - set(missing):
            self.tables[split] = load_file(paths[split])["step_logps"]
            log.info("reference log-probs for %s: loaded from %s", split, paths[split])
        if missing:
            self.compute(trainer, data, {split: datasets[split] for split in missing}, paths)

    def compute(self, trainer: L.Trainer, data: ReferenceData, datasets: dict, paths: dict[str, Path]) -> None:
        """One reference pass over each split; rank 0 writes the cache files."""
        with self.reference_model(trainer.strategy.root_device) as reference:
            for split, dataset in datasets.items():
                started = time.perf_counter()
                self.tables[split] = compute_table(trainer, reference, dataset, data, self.lean)
                if trainer.is_global_zero:
                    write_atomically(self.tables[split], paths[split])
                self.computed.append(split)
                log.info("reference log-probs for %s: %d rows computed in %.1f s, cached at %s",
                         split, len(dataset), time.perf_counter() - started, paths[split])
        trainer.strategy.barrier()

    def source_fingerprint(self) -> str:
        """What identifies the reference: its path when it is loaded from one, else a hash of the
        policy's current (starting) weights without LoRA adapters. A collective under FSDP2 (each
        parameter is gathered in turn)."""
        if self.source is not None:
            return f"path:{self.source}:{self.dtype}"
        digest = hashlib.sha256()
        for name, parameter in self.policy.state_dict().items():
            if "lora_" in name:  # adapters are disabled in the reference
                continue
            full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            flat = full.detach().reshape(-1)
            picked = flat[:: max(1, flat.numel() // SAMPLES_PER_TENSOR)].float().cpu()
            digest.update(f"{name}:{tuple(full.shape)}:{full.dtype}".encode())
            digest.update(picked.numpy().tobytes())
        return "weights:" + digest.hexdigest()

    def cache_path(self, trainer: L.Trainer, data: ReferenceData, dataset, split: str) -> Path:
        """``<cache_root>/reference/<key>.safetensors`` for this data, split, tokenizer, length,
        reference and precision."""
        tokenizer = self.tokenizer
        key = {
            "format": CACHE_FORMAT,
            "data": data.fingerprint or dataset._fingerprint,
            "rows": len(dataset),
            "split": split,
            "tokenizer": [tokenizer.name_or_path, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id],
            "max_length": data.max_length,
            "reference": self.fingerprint,
            "precision": str(trainer.precision),
            "dtype": self.dtype,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return data.cache_root / "reference" / f"{digest}.safetensors"

    @contextmanager
    def reference_model(self, device: torch.device) -> Iterator[torch.nn.Module]:
        """The reference in eval mode: the loaded model (then freed), or the policy with its
        LoRA adapters disabled (without LoRA: the policy itself)."""
        if self.load_model is not None:
            yield self.load_model().to(device).eval().requires_grad_(False)
            return
        policy = self.policy
        was_training = policy.training
        policy.eval()
        try:
            if hasattr(policy, "disable_adapter"):
                with policy.disable_adapter():
                    yield policy
            else:
                yield policy
        finally:
            policy.train(was_training)


@torch.no_grad()
def compute_table(
    trainer: L.Trainer, reference: torch.nn.Module, dataset, data: ReferenceData, lean: LeanLogps | None = None
) -> torch.Tensor:
    """Per-step reference log-probs of every row, float ``[N, 2, S_max]`` on the CPU, on every rank.

    Rank r takes rows r, r + R, ...; the shares are padded to equal length (FSDP2 forwards are
    collective) and run in batches through `stepwise_lit.logprobs.forward.step_logps` (the function
    training uses) under the trainer's precision, then all-gathered. Rank zero shows a progress
    bar over the batches while the trainer's progress bar is on.
    """
    device = trainer.strategy.root_device
    num_rows, world, rank = len(dataset), trainer.world_size, trainer.global_rank
    max_steps = max(len(scores) for side in SIDES for scores in dataset[f"{side}_step_scores"])
    share = math.ceil(num_rows / world)
    positions = [min(p, num_rows - 1) for p in range(rank, share * world, world)]
    values = torch.zeros(share, 2, max_steps)
    starts = range(0, share, data.batch_size)
    for start in tqdm(starts, desc="reference log-probs", disable=not shows_progress(trainer)):
        chunk = positions[start : start + data.batch_size]
        batch = move_data_to_device(data.collate([dataset[p] for p in chunk]), device)
        num_steps = batch["step_mask"].shape[1]
        with trainer.precision_plugin.forward_context():
            logps = step_logps(reference, batch, num_steps, lean).float().cpu()  # [2b, S]
        reshard_frozen(reference)
        values[start : start + len(chunk), 0, :num_steps] = logps[: len(chunk)]
        values[start : start + len(chunk), 1, :num_steps] = logps[len(chunk) :]
    gathered = trainer.strategy.all_gather(values.to(device)).cpu().reshape(world, share, 2, max_steps)
    table = torch.zeros(num_rows, 2, max_steps)
    table[torch.arange(share * world).clamp(max=num_rows - 1)] = gathered.transpose(0, 1).reshape(-1, 2, max_steps)
    return table


def write_atomically(table: torch.Tensor, path: Path) -> None:
    """Writes the table as safetensors to a temporary file, then renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"step_logps": table.contiguous()}, str(staging))
    os.replace(staging, path)
