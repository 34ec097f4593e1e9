"""Study: does stepwise DPO make a better reasoner than plain DPO? (STUDY.md)

    python bench/study.py --out runs/study                                   # the study, < 30 min on 2 CPU cores
    python bench/study.py --tasks arithmetic --hypotheses --out runs/hyp   # why SFT wins: `HYPOTHESES`, 5 seeds
    python bench/study.py --smoke --out /tmp/smoke  # 1 seed, a few steps, 3 methods (the test)

Every method starts from the same SFT policy of its seed and trains for the same number of
optimizer steps of the same batch size; the offline methods on the same pairs in the same order
(only the loss differs), the online ones (`Method.online`) on pairs of the policy's own samples:
`online_rounds` rounds of `online_prompts` training prompts × 8 samples (temperature 0.7), scored
by the rule verifier, paired at the first wrong step (`first_error_branch`), with the default
stepwise loss (arithmetic only: on GSM8K the SFT policy solves nothing, so no sample is right).

Tasks (`TASKS`):
- ``arithmetic``: the embedded task (`stepwise_lit.data.synthetic`) with numbers up to
  ``--max-value`` (tiny.yaml: 20, which has only ~330 distinct problems, so held-out
  problems there differ from training ones in names only). Validation and test problems
  are held out *by their arithmetic* (start value, operation, count): no test problem's
  solution appears in training. Errors sit at known steps (scores +1 before the slip, -1
  from it on).
- ``gsm8k``: ``../shared/data/gsm8k/example_model_solutions.jsonl`` through the ``gsm8k``
  adapter (ground truth chosen, the strongest model's incorrect solution rejected), the
  rejected steps scored by the rule verifier (`ArithmeticStepVerifier`), split by a hash
  of the question into train / validation / test.

Per task and seed: one SFT warm-up (the embedded tiny Llama from random weights, trained on
the chosen solutions of the SFT pairs, `sft_warmup_steps`), exported; then each method of
`--methods` (`METHODS`) loads that export as its policy and as its frozen reference (the SFT
policy, as tiny.yaml re-freezes it) and trains on the preference pairs. Each trained policy
is evaluated with the package's callbacks: `validate` on the validation pairs chooses the
ProcessBench threshold of the implicit step rewards h_t (and of their per-token form h_t/n_t),
`test` on the test pairs reports at that threshold, with the greedy solve rate of the test
prompts (`SolveRateEvaluation`), reward accuracy and within-response AUROC. The SFT policy
itself is tested once per seed (its solve rate: where every method starts).

Runs go to two worker processes (``--workers``, one torch thread each); a free worker takes
the methods of a finished warm-up first. Writes under ``--out``: ``runs.json`` (every run's
metrics, settings and thresholds), ``table.md`` and ``table.json`` (mean ± sample std over
seeds; per method the paired comparison with plain DPO: mean and sample std of the per-seed
differences, sign count, exact two-sided sign-test p-value), ``solve_rate.png``, ``f1.png``,
the data files, the tokenized cache, the SFT exports, each run's reports and logs (an online run's
rounds under ``runs/<task>-<method>-seed<seed>/online/``; their pairs per round, right samples and
seconds in the table); prints the table and the wall time of the whole command.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"
BASELINE = "plain_dpo"
SFT_START = "sft_start"
METRICS = ("solve_rate", "processbench_f1", "error_acc", "correct_acc", "processbench_f1_per_token",
           "within_response_auroc", "reward_accuracy")
PAIRED_METRICS = ("solve_rate", "processbench_f1", "processbench_f1_per_token", "within_response_auroc", "reward_accuracy")


@dataclass(frozen=True)
class Method:
    """One row of the study: how the preference stage trains.

    Attributes:
        description: What it is, for the table.
        settings: `StepwiseDPOModule` arguments on top of `Task.model` (the loss settings).
        sft_only: Continue SFT for the stage instead (no preference loss).
        lr: Learning rate of the stage; None: the task's `preference_lr`.
        online: Train on pairs of the policy's own samples, in rounds (`OnlineRounds` with the
            task's `online_rounds`), instead of the fixed preference pairs: the `PairSettings`
            arguments of its pairs ({}: the defaults); None: offline.
        tasks: The tasks it runs on; None: every task.
    """

    description: str
    settings: dict = field(default_factory=dict)
    sft_only: bool = False
    lr: float | None = None
    online: dict | None = None
    tasks: tuple[str, ...] | None = None

    def runs_on(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks


REFERENCE_PAIRS = {"correctness": "answer_and_steps", "reference_fallback": True}
"""`PairSettings` of the online methods whose right side passes every step, or is the reference."""

METHODS = {
    "sft": Method("SFT continued (no preference loss)", sft_only=True),
    "plain_dpo": Method("plain DPO: sigmoid outcome loss, step_loss_weight 0",
                        {"outcome_loss_type": "sigmoid", "step_loss_weight": 0.0}),
    "stepwise": Method("stepwise default: reward_weighted step + soft_label outcome, 0.5 / 0.5"),
    "step_bce": Method("step_bce step loss + soft_label outcome", {"step_loss_type": "step_bce"}),
    "step_dpo": Method("Step-DPO: first_divergence step loss + soft_label outcome",
                       {"step_loss_type": "first_divergence"}),
    # The policy's own samples, paired at the first wrong step; arithmetic only: the GSM8K SFT
    # policy solves no problem, so no sample is right and no pair can be built.
    "online": Method("online stepwise: first-error pairs of the policy's samples (right = right answer)",
                     online={}, tasks=("arithmetic",)),
    "online_reference": Method(
        "online stepwise: right = right answer and no flagged step; the reference where no sample is right",
        online=REFERENCE_PAIRS, tasks=("arithmetic",)),
    # Hypotheses for the SFT > DPO gap (`HYPOTHESES`, run by --hypotheses; the others by --methods)
    "stepwise_lr1e-3": Method("stepwise, preference lr 1e-3 (default 3e-4)", lr=1e-3),
    "stepwise_lr1e-4": Method("stepwise, preference lr 1e-4", lr=1e-4),
    "stepwise_lr3e-5": Method("stepwise, preference lr 3e-5", lr=3e-5),
    "online_reference_lr3e-5": Method("online_reference at lr 3e-5 (configs/online_tiny.yaml's rate for its rounds)",
                                      online=REFERENCE_PAIRS, tasks=("arithmetic",), lr=3e-5),
    "stepwise_sft3": Method("stepwise, sft_weight 3 (default 1)", {"sft_weight": 3.0}),
    "stepwise_sft10": Method("stepwise, sft_weight 10 (default 1)", {"sft_weight": 10.0}),
    "plain_dpo_sft10": Method("plain DPO, sft_weight 10",
                              {"outcome_loss_type": "sigmoid", "step_loss_weight": 0.0, "sft_weight": 10.0}),
    "stepwise_beta0.01": Method("stepwise, β_s = β_o = 0.01 (default 0.1)", {"step_beta": 0.01, "outcome_beta": 0.01}),
    "stepwise_beta0.5": Method("stepwise, β_s = 0.5", {"step_beta": 0.5}),
    "stepwise_step0.1": Method("stepwise, step_loss_weight 0.1 (default 0.5)", {"step_loss_weight": 0.1}),
    "stepwise_step1": Method("stepwise, step_loss_weight 1, outcome 0", {"step_loss_weight": 1.0, "outcome_loss_weight": 0.0}),
    # Length-normalised step rewards h_t / n_t in the step loss; β_s 2 keeps their size near h_t's
    # at β_s 0.1 (arithmetic steps: 24 tokens on average)
    "stepwise_per_token": Method("stepwise, step loss on h_t / n_t, β_s 2",
                                 {"step_reward_per_token": True, "step_beta": 2.0}),
    "step_bce_per_token": Method("step_bce on h_t / n_t, β_s 2",
                                 {"step_loss_type": "step_bce", "step_reward_per_token": True, "step_beta": 2.0}),
}
MAIN_METHODS = ("sft", "plain_dpo", "stepwise", "step_bce", "step_dpo", "online", "online_reference")
HYPOTHESES = ("sft", "plain_dpo", "stepwise", "plain_dpo_sft10", "stepwise_sft10", "stepwise_per_token", "step_bce_per_token",
              "stepwise_lr3e-5", "online_reference_lr3e-5")


@dataclass(frozen=True)
class Task:
    """A data set with its training budget.

    Attributes:
        name: ``arithmetic`` or ``gsm8k``.
        source: Answer extraction of the solve rate (`stepwise_lit.grading.answers`).
        batch_size: Pairs per optimizer step of the SFT warm-up.
        sft_steps: Optimizer steps of the SFT warm-up.
        preference_steps: Optimizer steps of each method's stage.
        preference_batch_size: Pairs per optimizer step of each method's stage.
        sft_lr: AdamW learning rate of the warm-up.
        preference_lr: AdamW learning rate of the stage (a tenth of SFT's, as tiny.yaml).
        max_length: Tokens (bytes) of prompt + response.
        max_prompt_length: Prompt tokens, cut from the left.
        max_new_tokens: Generation budget per test prompt.
        max_prompts: Test prompts decoded for the solve rate.
        hidden_size: Width of the embedded model (2 layers, 4 heads).
        online_rounds: Rounds of an online method: `preference_steps / online_rounds` steps each,
            on pairs from `online_prompts` prompts × 8 samples (temperature 0.7) per round.
        online_prompts: Prompts sampled per round, in order through the preference pairs' prompts.
        model: Module settings every method shares (tiny.yaml's model settings).
    """

    name: str
    source: str
    batch_size: int
    sft_steps: int
    preference_steps: int
    preference_batch_size: int
    sft_lr: float
    preference_lr: float
    max_length: int
    max_prompt_length: int
    max_new_tokens: int
    max_prompts: int
    hidden_size: int = 64
    online_rounds: int = 10
    online_prompts: int = 64
    model: dict = field(default_factory=lambda: {
        "step_beta": 0.1, "outcome_beta": 0.1, "outcome_loss_type": "soft_label", "step_loss_type": "reward_weighted",
        "step_reward_scale": 0.5, "aggregation_strategy": "mean", "step_loss_weight": 0.5, "outcome_loss_weight": 0.5,
        "sft_weight": 1.0,
    })


TASKS = {
    "arithmetic": Task("arithmetic", "embedded", batch_size=32, sft_steps=400, preference_steps=100,
                       preference_batch_size=16, sft_lr=3e-3,
                       preference_lr=3e-4, max_length=256, max_prompt_length=64, max_new_tokens=192, max_prompts=256),
    "gsm8k": Task("gsm8k", "gsm8k", batch_size=8, sft_steps=60, preference_steps=60, preference_batch_size=8, sft_lr=1e-3,
                  preference_lr=1e-4, max_length=384, max_prompt_length=192, max_new_tokens=128, max_prompts=64),
}


# ------------------------------------------------------------------ data


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


# ------------------------------------------------------------------ runs (in worker processes)


def quiet(threads: int = 1) -> None:
    """Worker set-up: one torch thread, no warnings or Lightning chatter."""
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "stepwise_lit"):
        logging.getLogger(name).setLevel(logging.ERROR)


def data_module(task: Task, path: Path, val_path: Path | None, seed: int, cache: Path, batch_size: int | None = None):
    """The task's data module for `path` (training) and `val_path` (validate/test); `batch_size`:
    pairs per training step (None: the warm-up's)."""
    from stepwise_lit.data.datamodule import StepwiseDataModule

    return StepwiseDataModule(
        path=str(path), val_path=None if val_path is None else str(val_path), val_fraction=0.0, format="stepwise",
        max_length=task.max_length, max_prompt_length=task.max_prompt_length, batch_size=batch_size or task.batch_size,
        eval_batch_size=64, seed=seed, cache_dir=str(cache),
    )


def trainer(root: Path, callbacks: list, max_steps: int = -1, **settings):
    """A quiet one-process CPU trainer (no logger, no checkpoints); `max_steps` for `fit`; `settings`
    override the trainer's (`max_epochs`, `reload_dataloaders_every_n_epochs`)."""
    import lightning as L

    return L.Trainer(**{
        "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "max_epochs": -1, "logger": False,
        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
        "num_sanity_val_steps": 0, "gradient_clip_val": 1.0, "default_root_dir": str(root), "callbacks": callbacks,
        **settings,
    })


def online_rounds(task: Task, seed: int, generator: str, pairs: dict):
    """The online method's callback and trainer settings: every epoch is a round (from the first),
    `task.online_rounds` of them, sampled from the policy by the backend at import path
    `generator`, scored by the rule verifier, paired at the first wrong step (`pairs`: the
    `PairSettings` arguments), `preference_steps / online_rounds` steps each."""
    from stepwise_lit.models.generate import GenerationSettings
    from stepwise_lit.online.pairs import PairSettings
    from stepwise_lit.online.training import OnlineRounds
    from stepwise_lit.rewards.rules import ArithmeticStepVerifier

    if task.preference_steps % task.online_rounds:
        raise ValueError(f"{task.name}: {task.preference_steps} preference steps do not split into {task.online_rounds} rounds")
    callback = OnlineRounds(
        enabled=True, verifier=ArithmeticStepVerifier(), start_epoch=0, prompts_per_round=task.online_prompts,
        steps_per_round=task.preference_steps // task.online_rounds, answer_source=task.source, generator=generator,
        pairs=PairSettings(**pairs),
        generation=GenerationSettings(do_sample=True, temperature=0.7, num_samples=8, max_new_tokens=task.max_new_tokens,
                                      batch_size=16, seed=seed),
    )
    return callback, {"max_epochs": task.online_rounds, "reload_dataloaders_every_n_epochs": 1}


def solve_rate_callback(task: Task):
    from stepwise_lit.evaluation.generation import SolveRateEvaluation
    from stepwise_lit.models.generate import GenerationSettings

    return SolveRateEvaluation(
        enabled=True, source=task.source, max_prompts=task.max_prompts,
        generation=GenerationSettings(max_new_tokens=task.max_new_tokens, batch_size=64),
    )


def adamw(lr: float):
    import torch

    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)


@contextlib.contextmanager
def printed_to(path: Path):
    """Sends what a run prints (the evaluation reports' tables, the online rounds' progress bars)
    to `path` instead of the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        yield


def run_sft(task: Task, seed: int, paths: dict[str, Path], out: Path) -> dict:
    """The SFT warm-up of one seed: trains, exports to ``<out>/sft/<task>-seed<seed>/export``,
    tests the SFT policy's solve rate; also prepares the seed's preference data for the methods."""
    import lightning as L

    from stepwise_lit.models.export import export_policy
    from stepwise_lit.models.loading import TinyModelConfig
    from stepwise_lit.module import StepwiseDPOModule

    quiet()
    start = time.perf_counter()
    root = out / "sft" / f"{task.name}-seed{seed}"
    with printed_to(out / "logs" / f"{task.name}-sft-seed{seed}.log"):
        L.seed_everything(seed, verbose=False)
        shape = TinyModelConfig(hidden_size=task.hidden_size, num_layers=2, num_heads=4, intermediate_size=3 * task.hidden_size)
        module = StepwiseDPOModule(tiny_model=shape, sft_warmup_steps=task.sft_steps, optimizer=adamw(task.sft_lr), **task.model)
        data_module(task, paths["preference"], None, seed, out / "cache", task.preference_batch_size).prepare_data()
        evaluation = solve_rate_callback(task)
        run = trainer(root, [evaluation], task.sft_steps)
        run.fit(module, datamodule=data_module(task, paths["sft"], None, seed, out / "cache"))
        export_policy(module, root / "export")
        run.test(module, datamodule=data_module(task, paths["val"], paths["test"], 0, out / "cache"), verbose=False)
    return {"task": task.name, "method": SFT_START, "seed": seed, "seconds": time.perf_counter() - start,
            "metrics": {"solve_rate": evaluation.results["solve_rate"]}}


def run_method(task: Task, name: str, seed: int, paths: dict[str, Path], out: Path, generator: str) -> dict:
    """One method's preference stage from the seed's SFT export, then its evaluation (see the module
    docstring); `generator`: the online methods' decoding backend (an import path)."""
    import lightning as L

    from stepwise_lit.module import StepwiseDPOModule
    from stepwise_lit.evaluation.report import StepRewardReport

    quiet()
    start = time.perf_counter()
    method = METHODS[name]
    root = out / "runs" / f"{task.name}-{name}-seed{seed}"
    settings = {**task.model, **method.settings}
    if method.sft_only:
        settings["sft_warmup_steps"] = task.preference_steps
    reports = {kind: root / "report" / kind for kind in ("val", "val_per_token", "test", "test_per_token")}
    evaluation = solve_rate_callback(task)
    with printed_to(out / "logs" / f"{task.name}-{name}-seed{seed}.log"):
        L.seed_everything(seed, verbose=False)
        module = StepwiseDPOModule(
            model_name_or_path=str(out / "sft" / f"{task.name}-seed{seed}" / "export"),
            optimizer=adamw(method.lr or task.preference_lr), **settings,
        )
        callbacks, settings_of_fit = [], {}
        if method.online is not None:
            callback, settings_of_fit = online_rounds(task, seed, generator, method.online)
            callbacks.append(callback)
        trainer(root, callbacks, task.preference_steps, **settings_of_fit).fit(
            module, datamodule=data_module(task, paths["preference"], None, seed, out / "cache", task.preference_batch_size)
        )
        trainer(root, [StepRewardReport(dirpath=str(reports["val"])),
                       StepRewardReport(dirpath=str(reports["val_per_token"]), per_token=True)]).validate(
            module, datamodule=data_module(task, paths["val"], paths["val"], 0, out / "cache"), verbose=False
        )
        thresholds = {kind: json.loads((reports[kind] / "report.json").read_text())["processbench"]["threshold"]
                      for kind in ("val", "val_per_token")}
        trainer(root, [evaluation, StepRewardReport(dirpath=str(reports["test"]), threshold=thresholds["val"]),
                       StepRewardReport(dirpath=str(reports["test_per_token"]), per_token=True,
                                        threshold=thresholds["val_per_token"])]).test(
            module, datamodule=data_module(task, paths["val"], paths["test"], 0, out / "cache"), verbose=False
        )
    test = json.loads((reports["test"] / "report.json").read_text())["metrics"]
    per_token = json.loads((reports["test_per_token"] / "report.json").read_text())["metrics"]
    metrics = {metric: test.get(metric) for metric in METRICS if metric in test}
    metrics["solve_rate"] = evaluation.results["solve_rate"]
    metrics["processbench_f1_per_token"] = per_token.get("processbench_f1")
    result = {"task": task.name, "method": name, "seed": seed, "seconds": time.perf_counter() - start,
              "metrics": metrics, "thresholds": thresholds, "settings": {**settings, "lr": method.lr or task.preference_lr}}
    if method.online is not None:  # per round: pairs, share of right samples, seconds
        summaries = [json.loads(path.read_text()) for path in sorted(
            (root / "online").glob("round-*/summary.json"), key=lambda path: int(path.parent.name.split("-")[1]))]
        result["online"] = {key: [summary[key] for summary in summaries]
                            for key in ("pairs", "reference_pairs", "sample_accuracy", "generation_s", "scoring_s", "training_s")}
    return result


# ------------------------------------------------------------------ statistics and output


def sign_test(differences: list[float]) -> dict:
    """Exact two-sided sign test of paired differences (ties, differences of 0, are dropped).

    Returns:
        ``wins`` (> 0), ``losses`` (< 0), ``ties`` and ``p`` = min(1, 2 P(X <= min(wins,
        losses))), X ~ Binomial(wins + losses, 1/2); 1.0 with no untied pair. With 5 pairs the
        smallest p is 2/32 = 0.0625.
    """
    wins = sum(d > 0 for d in differences)
    losses = sum(d < 0 for d in differences)
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return {"wins": wins, "losses": losses, "ties": len(differences) - n, "p": min(1.0, 2 * tail) if n else 1.0}


def summarise(runs: list[dict]) -> dict:
    """Per task and method, each metric's values by seed, mean and sample std, and against
    plain DPO (same task, same seeds) the paired differences and `sign_test`."""
    summary: dict = {}
    for run in runs:
        entry = summary.setdefault(run["task"], {}).setdefault(run["method"], {})
        for metric, value in run["metrics"].items():
            if value is not None:
                entry.setdefault(metric, {"by_seed": {}})["by_seed"][run["seed"]] = value
    for methods in summary.values():
        baseline = methods.get(BASELINE, {})
        for name, metrics in methods.items():
            for metric, values in metrics.items():
                numbers = list(values["by_seed"].values())
                values["mean"] = statistics.fmean(numbers)
                values["std"] = statistics.stdev(numbers) if len(numbers) > 1 else None
                seeds = sorted(set(values["by_seed"]) & set(baseline.get(metric, {}).get("by_seed", {})))
                if name != BASELINE and seeds:
                    differences = [values["by_seed"][s] - baseline[metric]["by_seed"][s] for s in seeds]
                    values["vs_plain_dpo"] = {
                        "seeds": seeds, "mean_difference": statistics.fmean(differences),
                        "std_difference": statistics.stdev(differences) if len(differences) > 1 else None,
                        **sign_test(differences),
                    }
    return summary


def mean_std(values: dict | None) -> str:
    """``mean ± sample std`` (the mean alone for one seed), ``–`` when absent."""
    if values is None:
        return "–"
    return f"{values['mean']:.3f}" + (f" ± {values['std']:.3f}" if values["std"] is not None else "")


def paired(values: dict | None) -> str:
    """``+0.050 ± 0.020 (4 up, 1 down, p 0.38)``: the mean and sample std of the paired
    differences with plain DPO, and the sign test."""
    versus = (values or {}).get("vs_plain_dpo")
    if not versus:
        return "–"
    spread = f" ± {versus['std_difference']:.3f}" if versus["std_difference"] is not None else ""
    ties = f", {versus['ties']} tied" if versus["ties"] else ""
    return (f"{versus['mean_difference']:+.3f}{spread} ({versus['wins']} up, {versus['losses']} down{ties}, "
            f"p {versus['p']:.2f})")


def markdown(summary: dict) -> str:
    """Per task: mean ± std of every metric by method, then each method minus plain DPO, paired by seed."""
    lines = []
    for task, methods in summary.items():
        lines += [f"### {task}: mean ± sample std over seeds", "",
                  "| method | seeds | " + " | ".join(METRICS) + " |", "| --- | ---: |" + " ---: |" * len(METRICS)]
        for name, metrics in methods.items():
            seeds = max(len(values["by_seed"]) for values in metrics.values())
            label = "SFT policy (every method's start)" if name == SFT_START else name
            lines.append(f"| {label} | {seeds} | " + " | ".join(mean_std(metrics.get(m)) for m in METRICS) + " |")
        lines += ["", f"### {task}: minus {BASELINE}, paired by seed (mean ± std of the differences; exact two-sided sign test)", "",
                  "| method | " + " | ".join(PAIRED_METRICS) + " |", "| --- |" + " ---: |" * len(PAIRED_METRICS)]
        for name, metrics in methods.items():
            if name not in (BASELINE, SFT_START):
                lines.append(f"| {name} | " + " | ".join(paired(metrics.get(m)) for m in PAIRED_METRICS) + " |")
        lines.append("")
    return "\n".join(lines)


def online_markdown(runs: list[dict]) -> str:
    """Per online method and seed: pairs per round, the share of right samples in the first and last
    round, and the seconds spent generating, scoring and training."""
    lines = []
    for run in runs:
        rounds = run.get("online")
        if rounds:
            if not lines:
                lines = ["### online rounds", "", "| task | method | seed | pairs per round | of them with the reference | right samples, "
                         "first → last round | generation s | scoring s | training s |",
                         "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: |"]
            accuracy = rounds["sample_accuracy"]
            lines.append(f"| {run['task']} | {run['method']} | {run['seed']} | {' '.join(map(str, rounds['pairs']))} | "
                         f"{sum(rounds['reference_pairs'])} | {accuracy[0]:.3f} → {accuracy[-1]:.3f} | {sum(rounds['generation_s']):.0f} | "
                         f"{sum(rounds['scoring_s']):.1f} | {sum(rounds['training_s']):.0f} |")
    return "\n".join(lines + [""]) if lines else ""


def plot(summary: dict, metric: str, title: str, path: Path) -> None:
    """Per task a panel: each method's seeds as dots, their mean ± std as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(summary), 3.4))
    for index, (task, methods) in enumerate(summary.items()):
        axes = figure.add_subplot(1, len(summary), index + 1)
        names = [name for name, metrics in methods.items() if metric in metrics]
        for position, name in enumerate(names):
            values = methods[name][metric]
            seeds = list(values["by_seed"].values())
            axes.bar(position, values["mean"], yerr=values["std"] or 0, color="#9ecae1", edgecolor="#3182bd", capsize=4)
            axes.scatter([position] * len(seeds), seeds, color="#08306b", s=12, zorder=3)
        axes.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axes.set_ylim(0, 1)
        axes.set_title(f"{task}: {title}", fontsize=9)
        axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


# ------------------------------------------------------------------ the command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "study", help="output folder (created)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(MAIN_METHODS), choices=list(METHODS),
                        help=f"methods (see METHODS); {BASELINE} is the paired baseline")
    parser.add_argument("--hypotheses", action="store_true",
                        help=f"the hypotheses' methods instead: {' '.join(HYPOTHESES)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--max-value", type=int, default=50, help="largest number of an arithmetic problem (tiny.yaml: 20)")
    parser.add_argument("--eval-pairs", type=int, default=256, help="arithmetic validation and test pairs (each)")
    parser.add_argument("--gsm8k-source", type=Path, default=GSM8K)
    parser.add_argument("--gsm8k-limit", type=int, default=None, help="first N GSM8K questions only")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (processes of one torch thread)")
    parser.add_argument("--online-generator", default="stepwise_lit.models.generate.TransformersGenerator",
                        help="the online method's decoding backend, an import path (online.generator)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiplies every task's SFT and preference steps")
    parser.add_argument("--smoke", action="store_true",
                        help="the test's budget: 1 seed, 4+4 steps, plain_dpo, stepwise and online, 64 GSM8K questions, "
                             "1 worker")
    args = parser.parse_args(argv)
    if args.hypotheses:
        args.methods = list(HYPOTHESES)
    if args.smoke:
        args.seeds, args.methods, args.gsm8k_limit, args.eval_pairs, args.workers = [0], ["plain_dpo", "stepwise", "online"], 64, 64, 1
    return args


def scaled(task: Task, args: argparse.Namespace) -> Task:
    """The task with the command's step budget (`--smoke`: 4 + 4 steps, 8 test prompts, 2 online rounds of 8 prompts)."""
    if args.smoke:
        return replace(task, sft_steps=4, preference_steps=4, max_prompts=8, max_new_tokens=32, online_rounds=2,
                       online_prompts=8)
    return replace(task, sft_steps=max(1, round(task.sft_steps * args.steps_scale)),
                   preference_steps=max(1, round(task.preference_steps * args.steps_scale)))


def prepare(args: argparse.Namespace, tasks: dict[str, Task]) -> dict[str, dict[str, Path]]:
    """Writes each task's data files and tokenizes its evaluation splits once (before the workers start)."""
    paths = {}
    for name, task in tasks.items():
        folder = args.out / "data" / name
        if name == "arithmetic":
            paths[name] = prepare_arithmetic(folder, task, args.max_value, args.eval_pairs)
        else:
            paths[name] = prepare_gsm8k(folder, args.gsm8k_source, args.gsm8k_limit)
        for train, val in ((paths[name]["val"], paths[name]["val"]), (paths[name]["val"], paths[name]["test"])):
            data_module(task, train, val, 0, args.out / "cache").prepare_data()
    return paths


def run_all(
    args: argparse.Namespace, tasks: dict[str, Task], paths: dict[str, dict[str, Path]], on_result
) -> list[dict]:
    """Every SFT warm-up and every method, `--workers` at a time; `on_result(runs)` after each
    finished run. A free worker takes a method of a finished warm-up before the next warm-up,
    so whole seeds finish in seed order."""
    runs: list[dict] = []
    warmups = [(name, seed) for seed in args.seeds for name in tasks]
    ready: list[tuple[str, str, int]] = []  # (task, method, seed) whose warm-up is done
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
        running: set[Future] = set()
        while warmups or ready or running:
            while len(running) < args.workers and (ready or warmups):
                if ready:
                    name, method, seed = ready.pop(0)
                    running.add(pool.submit(run_method, tasks[name], method, seed, paths[name], args.out,
                                            args.online_generator))
                else:
                    name, seed = warmups.pop(0)
                    running.add(pool.submit(run_sft, tasks[name], seed, paths[name], args.out))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                result = future.result()
                runs.append(result)
                metrics = ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items() if v is not None)
                print(f"[study] {result['task']} {result['method']} seed {result['seed']}: {metrics} "
                      f"({result['seconds']:.0f} s)", flush=True)
                if result["method"] == SFT_START:
                    ready += [(result["task"], method, result["seed"]) for method in args.methods
                              if METHODS[method].runs_on(result["task"])]
                on_result(runs)
    return runs


def write_outputs(args: argparse.Namespace, tasks: dict[str, Task], runs: list[dict], start: float, load: tuple) -> str:
    """Writes runs.json, table.json, table.md and the plots of the runs so far; returns table.md's text."""
    order = {name: index for index, name in enumerate([SFT_START, *METHODS])}
    runs = sorted(runs, key=lambda run: (run["task"], order[run["method"]], run["seed"]))
    summary = summarise(runs)
    plot(summary, "solve_rate", "greedy solve rate (test)", args.out / "solve_rate.png")
    plot(summary, "processbench_f1", "ProcessBench F1 of h_t (test)", args.out / "f1.png")
    wall = time.perf_counter() - start
    load_end = os.getloadavg()
    expected = len(args.seeds) * sum(1 + sum(METHODS[m].runs_on(task) for m in args.methods) for task in tasks)
    status = "" if len(runs) == expected else f" (**unfinished: {len(runs)} of {expected} runs so far**)"
    command = " ".join(["python bench/study.py", *args.argv])
    table = (f"`{command}`: wall time {wall / 60:.1f} min{status} on {os.cpu_count()} CPUs; load average "
             f"{load[0]:.2f} at the start (1 min), {load_end[2]:.2f} over the last 15 min at the end\n\n"
             + markdown(summary) + online_markdown(runs))
    (args.out / "runs.json").write_text(json.dumps(runs, indent=2))
    (args.out / "table.json").write_text(json.dumps({
        "command": command, "wall_seconds": wall, "finished_runs": len(runs), "expected_runs": expected,
        "load_average_at_start": load, "load_average_at_end": load_end,
        "tasks": {n: asdict(t) for n, t in tasks.items()}, "methods": {n: asdict(METHODS[n]) for n in args.methods},
        "seeds": args.seeds, "max_value": args.max_value, "summary": summary,
    }, indent=2))
    (args.out / "table.md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars, here and in the workers
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    quiet(threads=1)
    tasks = {name: scaled(TASKS[name], args) for name in args.tasks}
    args.out.mkdir(parents=True, exist_ok=True)
    if (args.out / "runs").exists() or (args.out / "sft").exists():
        sys.exit(f"--out: {args.out} already holds a study's runs; name a new folder")
    load = os.getloadavg()
    paths = prepare(args, tasks)
    runs = run_all(args, tasks, paths, lambda runs: write_outputs(args, tasks, runs, start, load))
    table = write_outputs(args, tasks, runs, start, load)
    print(table)
    print(f"wall time of the whole command: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
