"""The evaluation report of a ``validate`` or ``test`` run: terminal table, ``report.json`` and plots.

:class:`StepRewardReport` collects what the module's eval steps return (implicit
rewards per pair and per step, verifier step scores, masks, pair weights) and,
at the end of the run, writes to ``<default_root_dir>/report/<stage>/``:

- ``report.json``: the metrics of :class:`~stepwise_lit.evaluation.preference.PreferenceMetrics`
  (reward accuracy and margin, step accuracy and AUROC, first-error
  localisation, ...), ProcessBench localisation of the implicit step rewards
  (``processbench_f1``, ``error_acc``, ``correct_acc`` at a threshold chosen on
  validation, ``within_response_auroc``; see `processbench_values`), the solve
  rates of :class:`~stepwise_lit.evaluation.generation.SolveRateEvaluation` when it ran
  (``solve_rate``, ``pass_at_k``, ``maj_at_k``), step accuracy by step index, a
  summary of the implicit step rewards of steps the verifier marks good
  (``g_t > 0``) and bad (``g_t < 0``), and the training curves read from the
  run's ``metrics.csv``;
- ``step_accuracy_by_index.png``, ``step_reward_distribution.png``, when a
  ``metrics.csv`` is found ``training_curves.png``, and with solve rates ``solve_rate.png``.

The ProcessBench values are also logged (``val/processbench_f1`` ...).

The same plots and the step reward histograms go to TensorBoard when a
``TensorBoardLogger`` is on. ``fit`` never writes a report.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Collection
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from matplotlib.figure import Figure
from torchmetrics.aggregation import CatMetric, SumMetric

from stepwise_lit.data.batch import PairBatch, num_steps
from stepwise_lit.evaluation.figures import HISTORY_METRICS, HISTORY_STAGES, report_figures
from stepwise_lit.evaluation.generation import SolveRateEvaluation
from stepwise_lit.evaluation.preference import PreferenceMetrics
from stepwise_lit.evaluation.processbench import (
    LabelledStepRewards,
    ProcessBenchF1,
    WithinResponseAUROC,
    choose_threshold,
    first_error_labels,
)
from stepwise_lit.evaluation.values import json_count, json_number
from stepwise_lit.logprobs.forward import step_token_counts
from stepwise_lit.objective.stepwise import per_token_step_rewards

REPORT_FILE = "report.json"
_REPORTED_STAGES = (TrainerFn.VALIDATING, TrainerFn.TESTING)
PROCESSBENCH_METRICS = ("processbench_f1", "error_acc", "correct_acc", "within_response_auroc")
GENERATION_METRICS = ("solve_rate", "pass_at_k", "maj_at_k", "flagged_step_share", "flagged_solution_share", "first_flagged_step")


class StepRewardReport(L.Callback):
    """Writes the evaluation report at the end of ``validate`` and ``test`` runs.

    Args:
        dirpath: Folder of the report; None: ``<default_root_dir>/report/<stage>``
            (stage ``val`` or ``test``).
        history: A ``metrics.csv`` (``CSVLogger``) to draw the training curves from; None:
            the one the fit run that wrote the checkpoint logged to, when found
            (see `find_history`).
        enabled: Write the report; False switches it off.
        bins: Histogram bins of the step reward distribution.
        max_step_index: Most step indices shown by step accuracy by step index.
        per_token: Localise errors with the per-token step reward ``h_t / n_t`` (``n_t`` the
            step's tokens, its EOS included for the last step) instead of ``h_t``, which sums
            over the step's tokens and so grows with the step's length.
        threshold: The ProcessBench threshold of ``test`` (a step reward below it marks the
            step wrong); None: the one ``validate`` chose and wrote to
            ``<default_root_dir>/report/val/report.json`` (when ``dirpath`` is None), else no
            ProcessBench values. ``validate`` always chooses its own (best F1 on its data).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        history: str | None = None,
        enabled: bool = True,
        bins: int = 40,
        max_step_index: int = 16,
        per_token: bool = False,
        threshold: float | None = None,
    ) -> None:
        self.dirpath = dirpath
        self.history = history
        self.enabled = enabled
        self.bins = bins
        self.metrics = PreferenceMetrics(max_step_index)
        self.good_step_rewards = CatMetric(nan_strategy="disable")
        self.bad_step_rewards = CatMetric(nan_strategy="disable")
        self.num_pairs = SumMetric(nan_strategy="disable")
        self.per_token = per_token
        self.threshold = threshold
        self.labelled = LabelledStepRewards()
        self.within_response_auroc = WithinResponseAUROC()

    def _active(self, trainer: L.Trainer) -> bool:
        return self.enabled and trainer.state.fn in _REPORTED_STAGES

    def _accumulators(self) -> tuple[torch.nn.Module, ...]:
        return (
            self.metrics, self.good_step_rewards, self.bad_step_rewards, self.num_pairs, self.labelled,
            self.within_response_auroc,
        )

    # ------------------------------------------------------------ hooks
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active(trainer):
            self._collect(outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active(trainer):
            self._collect(outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer):
            self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer):
            self._report(trainer, pl_module, "test")

    # ------------------------------------------------------------ collecting
    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Puts the accumulators on the module's device, emptied."""
        if not self._active(trainer):
            return
        for accumulator in self._accumulators():
            accumulator.to(pl_module.device)
            accumulator.reset()

    def _collect(self, outputs: dict[str, torch.Tensor | int | None], batch: PairBatch) -> None:
        """Adds one batch: the `PreferenceMetrics.update` arguments an eval step returns, and
        the ProcessBench labels of its responses (`first_error_labels` of the verifier step
        scores; responses without step scores are left out)."""
        if not isinstance(outputs, dict) or "step_rewards" not in outputs:
            raise RuntimeError(
                "StepRewardReport needs the eval step to return the PreferenceMetrics.update arguments "
                "(StepwiseDPOModule's validation_step/test_step do)."
            )
        self.metrics.update(**outputs)
        weight = outputs.get("weight")
        if weight is None:
            weight = torch.ones(outputs["num_pairs"], device=outputs["rewards"].device)
        step_rewards = outputs["step_rewards"].float()  # [2N, S], chosen rows first
        step_scores = outputs["step_scores"]
        counted = outputs["step_mask"].bool() & (weight.repeat(2) > 0)[:, None]
        self.good_step_rewards.update(step_rewards[counted & (step_scores > 0)])
        self.bad_step_rewards.update(step_rewards[counted & (step_scores < 0)])
        self.num_pairs.update(weight.float().sum())
        step_mask = outputs["step_mask"].bool()
        if self.per_token:
            step_rewards = per_token_step_rewards(step_rewards, step_token_counts(batch, num_steps(batch)))
        response_weight = weight.float().repeat(2) * batch["has_step_scores"].float()  # [2N]
        labels = first_error_labels(step_scores, step_mask)
        self.labelled.update(step_rewards, step_mask, labels, response_weight)
        self.within_response_auroc.update(step_rewards, step_scores, step_mask, response_weight)

    # ------------------------------------------------------------ writing
    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Computes (every rank takes part in the sync), logs the ProcessBench values and
        writes the report (rank 0)."""
        values = self.metrics.compute()
        good, bad = _concatenated(self.good_step_rewards), _concatenated(self.bad_step_rewards)
        num_pairs = float(self.num_pairs.compute())
        threshold, threshold_source = (None, "validation data") if stage == "val" else self._test_threshold(trainer)
        processbench = processbench_values(
            self.labelled.compute(), float(self.within_response_auroc.compute()), threshold, threshold_source
        )
        processbench["per_token"] = self.per_token
        for name in PROCESSBENCH_METRICS:
            if processbench[name] is not None:
                pl_module.log(f"{stage}/{name}", processbench[name], sync_dist=True)
        if not trainer.is_global_zero:
            return
        generation = next(
            (callback.results for callback in trainer.callbacks if isinstance(callback, SolveRateEvaluation)), None
        )
        history_path = self._history_path(trainer)
        report = build_report(
            stage, values, good, bad, num_pairs,
            checkpoint=trainer.ckpt_path, global_step=_evaluated_step(trainer),
            history=read_history(history_path) if history_path else None,
            history_source=str(history_path) if history_path else None,
            processbench=processbench, generation=generation,
        )
        folder = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "report" / stage
        folder.mkdir(parents=True, exist_ok=True)
        figures = report_figures(report, good, bad, self.bins)
        report["plots"] = [f"{name}.png" for name in figures]
        for name, figure in figures.items():
            figure.savefig(folder / f"{name}.png", dpi=110)
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
        print(format_table(report, folder))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                _log_to_tensorboard(logger, stage, figures, good, bad, report["global_step"])

    def _test_threshold(self, trainer: L.Trainer) -> tuple[float | None, str | None]:
        """The ProcessBench threshold of ``test`` and where it comes from (see ``threshold``)."""
        if self.threshold is not None:
            return self.threshold, "report.threshold"
        if self.dirpath is None:
            path = Path(trainer.default_root_dir) / "report" / "val" / REPORT_FILE
            if path.is_file():
                threshold = (json.loads(path.read_text()).get("processbench") or {}).get("threshold")
                if threshold is not None:
                    return float(threshold), str(path)
        return None, None

    def _history_path(self, trainer: L.Trainer) -> Path | None:
        """The metrics.csv to read the training curves from (see `find_history`), None when there is none."""
        if self.history:
            return Path(self.history)
        if not trainer.ckpt_path:
            return None
        current = {Path(logger.log_dir) for logger in trainer.loggers if getattr(logger, "log_dir", None)}
        return find_history(Path(trainer.ckpt_path), exclude=current)


def find_history(checkpoint: Path, exclude: Collection[Path] = ()) -> Path | None:
    """The metrics.csv of the fit run that wrote a checkpoint ``<root>/<folder>/x.ckpt``.

    Looks at ``<root>/metrics.csv`` and ``<root>/*/version_*/metrics.csv`` (CSVLogger
    layouts), leaves out files in `exclude` folders (the loggers of the evaluation run
    itself) and files without training metrics, and takes the most recently written.
    """
    root = checkpoint.parent.parent
    candidates = [
        path
        for path in [root / "metrics.csv", *root.glob("*/version_*/metrics.csv")]
        if path.is_file() and path.parent not in exclude and _has_training_metrics(path)
    ]
    return max(candidates, key=lambda path: path.stat().st_mtime, default=None)


def processbench_values(
    labelled: dict[str, torch.Tensor], within_response_auroc: float, threshold: float | None, threshold_source: str | None
) -> dict:
    """ProcessBench localisation of the collected responses' step rewards.

    Args:
        labelled: `LabelledStepRewards.compute()`: step rewards, mask, labels, weights.
        within_response_auroc: `WithinResponseAUROC.compute()`.
        threshold: The threshold to score at; None: choose it here (`choose_threshold`,
            best F1 on these responses), as ``validate`` does.
        threshold_source: Where a given threshold comes from; with no threshold and no
            source (``test`` without a validation threshold) nothing is scored.

    Returns:
        ``threshold``, ``threshold_source``, ``num_erroneous`` and ``num_correct`` (responses
        with and without a wrong step, weighted), and the `PROCESSBENCH_METRICS` (None where
        there is no threshold or no response to count).
    """
    labels, weights = labelled["labels"], labelled["weights"]
    erroneous = float(weights[labels >= 0].sum())
    correct = float(weights[labels < 0].sum())
    values = {"threshold": threshold, "threshold_source": threshold_source, "num_erroneous": json_count(erroneous),
              "num_correct": json_count(correct), "within_response_auroc": json_number(within_response_auroc)}
    if threshold is None and threshold_source == "validation data" and erroneous > 0 and correct > 0:
        values["threshold"] = threshold = choose_threshold(labelled["step_rewards"], labelled["step_mask"], labels, weights)
    if threshold is None:
        return {**values, "threshold_source": None, "processbench_f1": None, "error_acc": None, "correct_acc": None}
    metric = ProcessBenchF1(threshold, sync_on_compute=False)
    metric.update(labelled["step_rewards"], labelled["step_mask"], labels, weights)
    scores = metric.compute()
    return {**values, "processbench_f1": json_number(scores["f1"]), "error_acc": json_number(scores["error_acc"]),
            "correct_acc": json_number(scores["correct_acc"])}


def _has_training_metrics(path: Path) -> bool:
    with open(path) as handle:
        return any(column.startswith("train/") for column in handle.readline().strip().split(","))


def _evaluated_step(trainer: L.Trainer) -> int:
    """The training step of the evaluated weights: the local checkpoint's ``global_step``
    (``validate``/``test`` do not restore the trainer's), else the trainer's."""
    if trainer.ckpt_path and Path(trainer.ckpt_path).is_file():
        checkpoint = torch.load(trainer.ckpt_path, map_location="cpu", mmap=True, weights_only=True)
        return int(checkpoint.get("global_step", trainer.global_step))
    return trainer.global_step


def _concatenated(metric: CatMetric) -> torch.Tensor:
    """A CatMetric's values on the CPU; empty when it saw none."""
    values = metric.compute()
    return values.cpu() if isinstance(values, torch.Tensor) else torch.empty(0)


def summarize(values: torch.Tensor) -> dict[str, float | int | None]:
    """Count, mean, standard deviation, min, median and max of a 1-D tensor (None when empty)."""
    values = values.double()
    if not values.numel():
        return {"count": 0, "mean": None, "std": None, "min": None, "median": None, "max": None}
    return {
        "count": values.numel(),
        "mean": json_number(values.mean()),
        "std": json_number(values.std(correction=0)),
        "min": json_number(values.min()),
        "median": json_number(values.median()),
        "max": json_number(values.max()),
    }


def build_report(
    stage: str,
    values: dict[str, torch.Tensor],
    good: torch.Tensor,
    bad: torch.Tensor,
    num_pairs: float,
    checkpoint: str | None,
    global_step: int,
    history: dict[str, dict[str, list[float]]] | None,
    history_source: str | None,
    processbench: dict | None = None,
    generation: dict | None = None,
) -> dict:
    """The JSON-ready report.

    Args:
        stage: ``val`` or ``test``.
        values: `PreferenceMetrics.compute()`.
        good: Implicit step rewards of the steps the verifier marks good (``g_t > 0``).
        bad: The same for steps marked bad (``g_t < 0``).
        num_pairs: Pairs evaluated (sum of the pair weights).
        checkpoint: The checkpoint evaluated, if any.
        global_step: The training step of the evaluated weights.
        history: Training curves (see `read_history`), None when no metrics.csv was found.
        history_source: The metrics.csv the curves come from.
        processbench: `processbench_values`, or None.
        generation: `SolveRateEvaluation.results`, or None when it did not run.

    Returns:
        ``stage``, ``num_pairs`` (an int unless a pair weight is fractional), ``checkpoint``,
        ``global_step``, ``metrics`` (scalars; None for NaN), ``step_accuracy_by_index``
        (``step``: 1-based step numbers up to the last one seen; ``chosen``, ``rejected``:
        accuracies; ``chosen_count``, ``rejected_count``: steps counted, ints unless a pair
        weight is fractional), ``step_rewards`` (``good``, ``bad``: summaries), ``history``
        (``source``, ``series``) or None, ``processbench`` (threshold, its source, counts,
        ``per_token``) and ``generation`` (source, k, prompts, settings, examples) or None;
        their scalars (`PROCESSBENCH_METRICS`, `GENERATION_METRICS`) are in ``metrics``.
    """
    counts = values["chosen_steps_by_index"].cpu(), values["rejected_steps_by_index"].cpu()
    seen = ((counts[0] > 0) | (counts[1] > 0)).nonzero()
    num_indices = int(seen.max()) + 1 if seen.numel() else 0
    by_index = {"step": list(range(1, num_indices + 1))}
    for side, count in zip(("chosen", "rejected"), counts):
        by_index[side] = [json_number(v) for v in values[f"{side}_step_accuracy_by_index"][:num_indices]]
        by_index[f"{side}_count"] = [json_count(c) for c in count[:num_indices].tolist()]
    metrics = {name: json_number(value) for name, value in values.items() if value.numel() == 1}
    sections = {}
    for section, found, names in (
        ("processbench", processbench, PROCESSBENCH_METRICS), ("generation", generation, GENERATION_METRICS)
    ):
        if found is not None:
            metrics.update({name: found[name] for name in names if name in found})
            sections[section] = {key: value for key, value in found.items() if key not in names}
    return {
        "stage": stage,
        "num_pairs": json_count(num_pairs),
        "checkpoint": checkpoint,
        "global_step": global_step,
        "metrics": metrics,
        "processbench": sections.get("processbench"),
        "generation": sections.get("generation"),
        "step_accuracy_by_index": by_index,
        "step_rewards": {"good": summarize(good), "bad": summarize(bad)},
        "history": None if history is None else {"source": history_source, "series": history},
    }


def read_history(path: str | Path) -> dict[str, dict[str, list[float]]]:
    """Reward accuracy and margin, and the solve rate when logged, over training from a CSVLogger ``metrics.csv``.

    Returns:
        For each ``{train,val}/{reward_accuracy,reward_margin,solve_rate}`` column present,
        ``{"step": [...], "value": [...]}`` of its non-empty rows, in file order.
    """
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    series = {}
    for stage in HISTORY_STAGES:
        for metric in HISTORY_METRICS:
            column = f"{stage}/{metric}"
            points = [(int(row["step"]), float(row[column])) for row in rows if row.get(column)]
            if points:
                series[column] = {"step": [step for step, _ in points], "value": [value for _, value in points]}
    return series


def format_table(report: dict, folder: Path) -> str:
    """The terminal table: metrics, step accuracy by step index, step reward summaries, files."""
    checkpoint = report["checkpoint"] or "(no checkpoint)"
    lines = [
        f"Step report: {report['stage']}, {report['num_pairs']:g} pairs, global step {report['global_step']}, {checkpoint}",
        f"  {'metric':<28}{'value':>10}",
    ]
    lines += [f"  {name:<28}{_cell(value):>10}" for name, value in report["metrics"].items()]
    by_index = report["step_accuracy_by_index"]
    lines.append(f"  {'step':<8}{'chosen acc':>12}{'(n)':>7}{'rejected acc':>14}{'(n)':>7}")
    rows = zip(by_index["step"], by_index["chosen"], by_index["chosen_count"], by_index["rejected"], by_index["rejected_count"])
    lines += [
        f"  {step:<8}{_cell(chosen):>12}{count_c:>7g}{_cell(rejected):>14}{count_r:>7g}"
        for step, chosen, count_c, rejected, count_r in rows
    ]
    lines.append(f"  {'h_t of steps':<14}{'count':>8}{'mean':>10}{'std':>10}{'median':>10}")
    for kind, summary in report["step_rewards"].items():
        lines.append(
            f"  {kind:<14}{summary['count']:>8}{_cell(summary['mean']):>10}{_cell(summary['std']):>10}{_cell(summary['median']):>10}"
        )
    processbench = report["processbench"]
    if processbench is not None:
        threshold = processbench["threshold"]
        lines.append(
            f"  ProcessBench threshold {_cell(threshold)} (from {processbench['threshold_source']})" if threshold is not None
            else "  ProcessBench: no threshold (validate chooses one; or set report.threshold)"
        )
    if report["history"] is None:
        lines.append("  no metrics.csv found for the training curves (set report.history)")
    lines.append(f"  written to {folder}: {REPORT_FILE}, {', '.join(report['plots'])}")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _log_to_tensorboard(
    logger: TensorBoardLogger, stage: str, figures: dict[str, Figure], good: torch.Tensor, bad: torch.Tensor, step: int
) -> None:
    """The report's figures and the step reward histograms, under ``report/<stage>/``."""
    experiment = logger.experiment
    for name, figure in figures.items():
        experiment.add_figure(f"report/{stage}/{name}", figure, global_step=step, close=False)
    for kind, values in (("good", good), ("bad", bad)):
        if values.numel():
            experiment.add_histogram(f"report/{stage}/step_rewards_{kind}", values, global_step=step)
    experiment.flush()
