"""Per-step log-probs the slow way, for the tests that check the packed and unpacked forwards: four
embedded pairs collated both ways, and each response through the model's own forward alone."""

from __future__ import annotations

import torch

from stepwise_lit.data.collate import StepwiseCollator
from stepwise_lit.data.datamodule import StepwiseDataModule


def pair_batches(tmp_path, tokenizer_path: str) -> tuple[dict, dict]:
    """Four embedded pairs collated unpacked and packed (the default layout)."""
    datamodule = StepwiseDataModule(path="synthetic", synthetic_train_size=4, synthetic_val_size=0, batch_size=4,
                                    max_length=256, tokenizer_name_or_path=tokenizer_path,
                                    cache_dir=str(tmp_path / "cache"))
    datamodule.setup("fit")
    rows = [datamodule.train_dataset[i] for i in range(4)]
    return StepwiseCollator(0, pack_pairs=False)(rows), StepwiseCollator(0, pack_pairs=True)(rows)


def per_sequence_step_logps(model: torch.nn.Module, batch: dict, num_steps: int) -> torch.Tensor:
    """The slow path: each response alone through the model's own forward, log-softmax of its
    logits, token log-probs summed by step by hand. Float ``[2B, S]``."""
    result = torch.zeros(batch["input_ids"].shape[0], num_steps, dtype=torch.float64)
    for row, (ids, mask, steps) in enumerate(zip(batch["input_ids"], batch["attention_mask"], batch["step_ids"])):
        ids, steps = ids[mask.bool()], steps[mask.bool()]
        with torch.no_grad():
            logps = torch.log_softmax(model(ids[None]).logits[0].double(), -1)  # [n, V]
        for position in range(1, len(ids)):
            if steps[position] > 0:
                result[row, steps[position] - 1] += logps[position - 1, ids[position]]
    return result
