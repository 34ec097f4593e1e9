"""`reference: precomputed`: the reference's per-step log-probs, computed once and cached on disk.

`PrecomputedReference` is a callback the module adds for this mode. The first batch of a run
(the sanity check's or training's; for validate, test and predict the first evaluation batch)
triggers one pass of the reference over the data module's splits (train and val when fitting,
val otherwise: test and predict read the val split), inside the Lightning run: after the
strategy has placed and sharded the models (DDP replicas, FSDP2 shards) and any checkpoint has
been restored, before the first optimizer step. Each rank computes its share of the rows
(FSDP2 forwards are collective, so every rank runs as many batches), the shares are
all-gathered, and rank 0 writes the cache files. From then on each batch gets
`batch["reference_step_logps"]` (float `[2B, S]`: the batch's chosen rows, then its rejected
rows), looked up by the `row_index` the data module puts in every batch, and training holds no
reference model.

The reference is the policy's starting point (with LoRA adapters disabled), or the model at
`ref_model_name_or_path`, loaded for the pass and freed. Cache files
(`<cache_dir>/reference/<key>.safetensors`) are keyed by the data module's fingerprint (data,
tokenizer, lengths and options), the split, the tokenizer, `max_length`, the reference (a hash
of its starting weights, or its path) and the precision; a later run with the same key loads
the file. The module keeps the reference fingerprint in its checkpoints, so a resumed run
(whose policy has moved) finds the same files; it cannot recompute them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file

from stepwise_lit.distributed import reshard_frozen

log = logging.getLogger("stepwise_lit")

CACHE_FORMAT = 1
"""Bump when the cached values would change for the same key."""
SAMPLES_PER_TENSOR = 4096
"""Weights hashed per parameter for the reference fingerprint (evenly spaced, plus the shape)."""
SIDES = ("chosen", "rejected")


class PrecomputedReference(L.Callback):
    """Fills `batch["reference_step_logps"]` from per-split tables computed once (see the module doc).

    Attributes:
        tables: Split name -> float `[N, 2, S_max]`: row, side (chosen, rejected), step.
        computed: Splits whose table this process computed rather than loaded from the cache.
    """

    def __init__(self) -> None:
        self.tables: dict[str, torch.Tensor] = {}
        self.computed: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.fill(trainer, pl_module, batch, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.fill(trainer, pl_module, batch, "val")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.fill(trainer, pl_module, batch, "val")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.fill(trainer, pl_module, batch, "val")

    def fill(self, trainer: L.Trainer, module: L.LightningModule, batch: dict, split: str) -> None:
        """Set `batch["reference_step_logps"]` `[2B, S]` for the batch's rows of `split`."""
        if "row_index" not in batch:
            raise RuntimeError(
                "reference: precomputed needs batches with a 'row_index' (StepwiseDataModule adds it); "
                "this batch has none"
            )
        if split not in self.tables:
            self.prepare(trainer, module, ("train", "val") if trainer.state.fn == "fit" else ("val",))
        rows = self.tables[split][batch["row_index"].cpu()]  # [B, 2, S_max]
        num_steps = batch["step_mask"].shape[1]
        values = torch.cat([rows[:, 0, :num_steps], rows[:, 1, :num_steps]])  # [2B, S]
        batch["reference_step_logps"] = values.to(batch["step_mask"].device)

    def prepare(self, trainer: L.Trainer, module: L.LightningModule, splits: tuple[str, ...]) -> None:
        """Load or compute the tables of all `splits` the data module has, together: the policy
        is the reference only before its first update, so nothing is left for later."""
        datasets = {split: getattr(trainer.datamodule, f"{split}_dataset", None) for split in splits}
        datasets = {split: dataset for split, dataset in datasets.items() if dataset is not None}
        if not datasets:
            raise RuntimeError(f"reference: precomputed needs the data module's {' or '.join(splits)} dataset")
        policy_is_reference = module.hparams.ref_model_name_or_path is None
        fresh = module.reference_fingerprint is None and trainer.ckpt_path is None and trainer.global_step == 0
        if module.reference_fingerprint is None:
            if policy_is_reference and not fresh:
                raise RuntimeError(
                    "reference: precomputed, but the policy has moved (resumed run) and no reference "
                    "fingerprint was saved with it, so its reference log-probs can be neither found nor recomputed"
                )
            module.reference_fingerprint = reference_fingerprint(module)
        paths = {split: cache_path(trainer, module, dataset, split) for split, dataset in datasets.items()}
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
            self.compute(trainer, module, {split: datasets[split] for split in missing}, paths)

    def compute(self, trainer: L.Trainer, module: L.LightningModule, datasets: dict, paths: dict[str, Path]) -> None:
        """One reference pass over each split; rank 0 writes the cache files."""
        with reference_model(module) as reference:
            for split, dataset in datasets.items():
                started = time.perf_counter()
                self.tables[split] = compute_table(trainer, module, reference, dataset)
                if trainer.is_global_zero:
                    write_atomically(self.tables[split], paths[split])
                self.computed.append(split)
                log.info("reference log-probs for %s: %d rows computed in %.1f s, cached at %s",
                         split, len(dataset), time.perf_counter() - started, paths[split])
        trainer.strategy.barrier()


def reference_fingerprint(module: L.LightningModule) -> str:
    """What identifies the reference: its path when it is loaded from one, else a hash of the
    policy's current (starting) weights without LoRA adapters. A collective under FSDP2 (each
    parameter is gathered in turn)."""
    hp = module.hparams
    if hp.ref_model_name_or_path is not None:
        return f"path:{hp.ref_model_name_or_path}:{hp.dtype}"
    digest = hashlib.sha256()
    for name, parameter in module.policy.state_dict().items():
        if "lora_" in name:  # adapters are disabled in the reference
            continue
        full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
        flat = full.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // SAMPLES_PER_TENSOR)].float().cpu()
        digest.update(f"{name}:{tuple(full.shape)}:{full.dtype}".encode())
        digest.update(picked.numpy().tobytes())
    return "weights:" + digest.hexdigest()


def cache_path(trainer: L.Trainer, module: L.LightningModule, dataset, split: str) -> Path:
    """`<cache_dir>/reference/<key>.safetensors` for this data, split, tokenizer, length, reference and precision."""
    datamodule = trainer.datamodule
    tokenizer = module.tokenizer
    key = {
        "format": CACHE_FORMAT,
        "data": getattr(datamodule, "fingerprint", None) or dataset._fingerprint,
        "rows": len(dataset),
        "split": split,
        "tokenizer": [tokenizer.name_or_path, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id],
        "max_length": getattr(getattr(datamodule, "settings", None), "max_length", None),
        "reference": module.reference_fingerprint,
        "precision": str(trainer.precision),
        "dtype": module.hparams.dtype,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    root = getattr(datamodule, "cache_root", None) or os.environ.get("STEPWISE_LIT_CACHE", "~/.cache/stepwise_lit")
    return Path(root).expanduser() / "reference" / f"{digest}.safetensors"


@contextmanager
def reference_model(module: L.LightningModule):
    """The reference in eval mode: the model at `ref_model_name_or_path` (loaded, then freed), or
    the policy with its LoRA adapters disabled (without LoRA: the policy itself)."""
    hp = module.hparams
    if hp.ref_model_name_or_path is not None:
        from stepwise_lit.models import load_causal_lm
        from stepwise_lit.module import _DTYPES

        dtype = _DTYPES[hp.dtype] if hp.dtype else None
        model = load_causal_lm(hp.ref_model_name_or_path, module.tokenizer, module.tiny_model,
                               hp.trust_remote_code, dtype)
        yield model.to(module.device).eval().requires_grad_(False)
        return
    policy = module.policy
    was_training = policy.training
    policy.eval()
    try:
        if hp.lora is not None:
            with policy.disable_adapter():
                yield policy
        else:
            yield policy
    finally:
        policy.train(was_training)


@torch.no_grad()
def compute_table(trainer: L.Trainer, module: L.LightningModule, reference: torch.nn.Module, dataset) -> torch.Tensor:
    """Per-step reference log-probs of every row, float `[N, 2, S_max]` on the CPU, on every rank.

    Rank r takes rows r, r + R, ...; the shares are padded to equal length (FSDP2 forwards are
    collective) and run in batches of the data module's evaluation batch size through the
    module's own `_step_logps` (the function training uses) under the trainer's precision,
    then all-gathered.
    """
    datamodule = trainer.datamodule
    collate = datamodule.collator()
    batch_size = getattr(datamodule, "eval_batch_size", None) or datamodule.batch_size
    num_rows, world, rank = len(dataset), trainer.world_size, trainer.global_rank
    max_steps = max(len(scores) for side in SIDES for scores in dataset[f"{side}_step_scores"])
    share = math.ceil(num_rows / world)
    positions = [min(p, num_rows - 1) for p in range(rank, share * world, world)]
    values = torch.zeros(share, 2, max_steps)
    for start in range(0, share, batch_size):
        chunk = positions[start : start + batch_size]
        batch = module.transfer_batch_to_device(collate([dataset[p] for p in chunk]), module.device, 0)
        num_steps = batch["step_mask"].shape[1]
        with trainer.precision_plugin.forward_context():
            step_logps = module._step_logps(reference, batch, num_steps).float().cpu()  # [2b, S]
        reshard_frozen(reference)
        values[start : start + len(chunk), 0, :num_steps] = step_logps[: len(chunk)]
        values[start : start + len(chunk), 1, :num_steps] = step_logps[len(chunk) :]
    gathered = trainer.strategy.all_gather(values.to(module.device)).cpu().reshape(world, share, 2, max_steps)
    table = torch.zeros(num_rows, 2, max_steps)
    table[torch.arange(share * world).clamp(max=num_rows - 1)] = gathered.transpose(0, 1).reshape(-1, 2, max_steps)
    return table


def write_atomically(table: torch.Tensor, path: Path) -> None:
    """Write the table as safetensors to a temporary file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"step_logps": table.contiguous()}, str(staging))
    os.replace(staging, path)
