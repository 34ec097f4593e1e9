"""The study's data files: each task's SFT, preference, validation and test pairs."""

from __future__ import annotations

import hashlib
from pathlib import Path

from bench.study.methods import Task


def held_out(key: str, low: float, high: float) -> bool:
    """Whether a stable hash of `key` falls in [low, high) of [0, 1)."""
    position = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10_000 / 10_000
    return low <= position < high


def write(rows: list[dict], path: Path) -> Path:
    from stepwise_lit.data.writers import write_rows

    write_rows(rows, path)
    return path


def prepare_arithmetic(folder: Path, task: Task, max_value: int, eval_pairs: int) -> dict[str, Path]:
    """Embedded pairs: SFT and preference files (disjoint problems), and validation and test
    files of one pair per held-out arithmetic problem (5% and 10% of the solutions by hash).

    Returns:
        Paths of ``sft``, ``preference``, ``val`` and ``test`` (``stepwise`` jsonl).
    """
    from stepwise_lit.data.synthetic import generate_pairs

    num_train = task.batch_size * task.sft_steps + task.preference_batch_size * task.preference_steps
    rows = generate_pairs(int(1.3 * num_train) + 40 * eval_pairs, seed=0, max_value=max_value)
    train, evaluation = [], {"val": {}, "test": {}}
    for row in rows:
        solution = row["reference_solution"]  # start, operation and count: the arithmetic problem
        split = "val" if held_out(solution, 0.0, 0.05) else "test" if held_out(solution, 0.05, 0.15) else "train"
        if split == "train":
            train.append(row)
        elif len(evaluation[split]) < eval_pairs:
            evaluation[split].setdefault(solution, row)
    if len(train) < num_train or min(len(pairs) for pairs in evaluation.values()) < min(eval_pairs, 50):
        raise ValueError(f"max_value {max_value}: too few distinct problems for {num_train} training pairs")
    sft_pairs = task.batch_size * task.sft_steps
    return {
        "sft": write(train[:sft_pairs], folder / "sft.jsonl"),
        "preference": write(train[sft_pairs:num_train], folder / "preference.jsonl"),
        **{split: write(list(pairs.values()), folder / f"{split}.jsonl") for split, pairs in evaluation.items()},
    }


def prepare_gsm8k(folder: Path, source: Path, limit: int | None) -> dict[str, Path]:
    """GSM8K pairs with rule-verifier scores on the rejected steps, split by question:
    10% validation, 20% test, the rest for both the SFT and the preference stage.

    Returns:
        Paths of ``sft``, ``preference`` (the same file), ``val`` and ``test``.
    """
    from stepwise_lit.data.readers import read_records
    from stepwise_lit.data.formats import to_canonical
    from stepwise_lit.rewards.rules import ArithmeticStepVerifier
    from stepwise_lit.score import score_rows

    records = read_records(source)
    rows = to_canonical(records[:limit] if limit else records, "gsm8k", source.name, require_scores=False)
    rows = score_rows(ArithmeticStepVerifier(), rows, only_missing=True)
    splits = {
        "val": [row for row in rows if held_out(row["prompt"], 0.0, 0.1)],
        "test": [row for row in rows if held_out(row["prompt"], 0.1, 0.3)],
        "train": [row for row in rows if held_out(row["prompt"], 0.3, 1.0)],
    }
    paths = {split: write(split_rows, folder / f"{split}.jsonl") for split, split_rows in splits.items()}
    return {"sft": paths["train"], "preference": paths["train"], "val": paths["val"], "test": paths["test"]}

