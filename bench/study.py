"""Study: does training with verifier step rewards help? Plain vs stepwise DPO on GSM8K pairs.

    nice python bench/study.py --out runs/study

Data. ``example_model_solutions.jsonl`` (openai/grade-school-math, the 1319 test
questions with model solutions) through the ``gsm8k`` adapter: the ground truth
is chosen (+1 per line step), the strongest model's incorrect solution rejected;
the rejected steps are scored by the rule verifier ``ArithmeticStepVerifier``
(with the ground truth as reference). Questions are split by a hash of their
text: ``--test-fraction`` of them are held out for evaluation, never trained on.

Runs. The same embedded tiny Llama (random init) is first trained with SFT on the
chosen solutions for ``--sft-warmup-steps`` steps, after which the reference is
re-frozen from it (``model.sft_warmup_steps``: DPO against the SFT model, the usual
recipe), then trained on the preference losses to the end of ``--epochs`` with
(a) plain DPO (``step_loss_weight: 0``, ``outcome_loss_type: sigmoid``),
(b) the default stepwise loss (``reward_weighted`` step loss + ``soft_label``
outcome loss, 0.5 / 0.5) and (c) ``step_bce`` (+ ``soft_label`` outcome loss),
once per seed (the seed sets the initial weights and the data order), and
evaluated on the held-out pairs: reward accuracy, step accuracy, step AUROC and
first-error localisation (accuracy and mean distance in steps). The untrained
model (h_t = 0 everywhere, so it "localises" every error at step 1) is
evaluated once as the baseline. Each evaluation also writes the step report
(``stepwise_lit.reports``) under ``<out>/reports/``.

Writes ``<out>/results.json`` (every run) and prints the table (mean ± sample
std over seeds) as Markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.data.formats import read_records, to_canonical
from stepwise_lit.models import TinyModelConfig
from stepwise_lit.module import StepwiseDPOModule
from stepwise_lit.prepare import write_rows
from stepwise_lit.reports import StepRewardReport
from stepwise_lit.rewards.rules import ArithmeticStepVerifier
from stepwise_lit.score import score_rows

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"
LOSSES = {
    "plain DPO": {"step_loss_weight": 0.0, "outcome_loss_type": "sigmoid"},
    "stepwise (default)": {},
    "step_bce": {"step_loss_type": "step_bce"},
}
BASELINE = "untrained (h = 0)"
METRICS = ("reward_accuracy", "step_accuracy", "step_auroc", "first_error_accuracy", "first_error_distance")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="GSM8K example_model_solutions.jsonl")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "study", help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of questions held out")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sft-warmup-steps", type=int, default=100,
                        help="SFT steps on the chosen solutions before the preference losses (0: none)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=384, help="tokens (bytes) per prompt + response")
    parser.add_argument("--max-prompt-length", type=int, default=192)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads; the model's matmuls are tiny, so one thread beats two on 2 (shared) cores",
    )
    return parser.parse_args()


def held_out(question: str, fraction: float) -> bool:
    """Whether a question is in the test split (a stable hash of its text)."""
    return int(hashlib.sha256(question.encode()).hexdigest(), 16) % 10_000 < fraction * 10_000


def prepare_pairs(source: Path, folder: Path, test_fraction: float) -> dict[str, Path]:
    """Canonical GSM8K pairs with verifier-scored rejected steps, split by question.

    Returns:
        The ``train`` and ``test`` jsonl files (``stepwise`` format).
    """
    rows = to_canonical(read_records(source), "gsm8k", source.name, require_scores=False)
    rows = score_rows(ArithmeticStepVerifier(), rows, only_missing=True)
    splits = {
        "train": [row for row in rows if not held_out(row["prompt"], test_fraction)],
        "test": [row for row in rows if held_out(row["prompt"], test_fraction)],
    }
    paths = {}
    for name, split_rows in splits.items():
        paths[name] = folder / f"{name}.jsonl"
        write_rows(split_rows, paths[name])
    return paths


def evaluate(
    args: argparse.Namespace, paths: dict[str, Path], settings: dict, seed: int, report_dir: Path, train: bool
) -> dict[str, float]:
    """Trains (when `train`) the tiny model with the loss `settings` and evaluates it on the test pairs.

    Returns:
        The test metrics (`METRICS` that are defined) and ``train_seconds``.
    """
    L.seed_everything(seed, verbose=False)
    data = StepwiseDataModule(
        path=str(paths["train"]), val_path=str(paths["test"]), format="stepwise",
        max_length=args.max_length, max_prompt_length=args.max_prompt_length,
        batch_size=args.batch_size, eval_batch_size=2 * args.batch_size, seed=seed,
        group_by_length=True, cache_dir=str(args.out / "cache"),
    )
    shape = TinyModelConfig(
        hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=4,
        intermediate_size=3 * args.hidden_size,
    )
    model = StepwiseDPOModule(
        tiny_model=shape, sft_warmup_steps=args.sft_warmup_steps if train else 0,
        optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr, fused=True), **settings
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=args.epochs + 1, gradient_clip_val=1.0, default_root_dir=args.out,
        callbacks=[StepRewardReport(dirpath=str(report_dir))],
    )
    start = time.perf_counter()
    if train:
        trainer.fit(model, datamodule=data)
    train_seconds = time.perf_counter() - start
    (logged,) = trainer.validate(model, datamodule=data, verbose=False)
    values = {name: logged[f"val/{name}"] for name in METRICS if f"val/{name}" in logged}
    return {**values, "train_seconds": train_seconds}


def summary_table(results: list[dict]) -> str:
    """Markdown table: one row per loss, mean ± sample std over seeds of each metric."""
    header = "| loss | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + " --- |" * (len(METRICS) + 1)]
    for name in [BASELINE, *LOSSES]:
        runs = [run for run in results if run["loss"] == name]
        cells = []
        for metric in METRICS:
            values = [run["metrics"][metric] for run in runs if metric in run["metrics"]]
            if not values:
                cells.append("–")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
        lines.append(f"| {name} (n={len(runs)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = prepare_pairs(args.source, args.out, args.test_fraction)
    results = [
        {"loss": BASELINE, "seed": args.seeds[0], "metrics": evaluate(args, paths, {}, args.seeds[0], args.out / "reports" / "untrained", train=False)}
    ]
    for name, settings in LOSSES.items():
        for seed in args.seeds:
            report_dir = args.out / "reports" / f"{name.split()[0].lower()}-seed{seed}"
            metrics = evaluate(args, paths, settings, seed, report_dir, train=True)
            results.append({"loss": name, "seed": seed, "settings": settings, "metrics": metrics})
            print(f"[study] {name}, seed {seed}: {json.dumps(metrics)}", flush=True)
    total = time.perf_counter() - start
    (args.out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "total_seconds": total, "runs": results}, indent=2)
    )
    print(summary_table(results))
    print(f"total {total / 60:.1f} min")


if __name__ == "__main__":
    main()
