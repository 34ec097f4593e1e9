"""ProcessBench error localisation of any step scorer on labelled responses (``python -m stepwise_lit.evaluate``).

Labelled responses (:mod:`stepwise_lit.data.labelled`: ProcessBench, TRL stepwise supervision,
PRM800K, or canonical ``labelled`` rows) are scored step by step by a
:class:`~stepwise_lit.rewards.base.StepScorer`. A response's prediction is its first step whose
score is below a threshold, or -1 (:func:`stepwise_lit.evaluation.processbench.first_error_prediction`); its
label is ``first_error``. The threshold is given (``labelled.threshold``; every response is then
evaluated) or chosen on a validation part of the data (:func:`split_by_problem`: a seeded share
of the distinct problems, with all their responses) to maximise F1
(:func:`stepwise_lit.evaluation.processbench.choose_threshold`) and applied to the rest. The report gives
``error_acc``, ``correct_acc``, ``processbench_f1`` and ``within_response_auroc`` of the
evaluated part, the threshold and where it came from.

Labelled responses carry no reference solution, so scorers get None for it (the rule verifier
then checks the written arithmetic only).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from stepwise_lit.data.labelled import LabelledFormat, read_labelled
from stepwise_lit.errors import SettingError
from stepwise_lit.evaluation.processbench import ProcessBenchF1, WithinResponseAUROC, choose_threshold
from stepwise_lit.rewards.base import StepScorer


@dataclass
class LabelledSettings:
    """Labelled responses to localise errors on, and how the threshold is set (``labelled.*``).

    Attributes:
        path: A ``.json``/``.jsonl``/``.parquet``/``.csv`` file of labelled responses; null: no
            localisation.
        format: ``processbench`` (rows ``problem``, ``steps``, ``label``), ``trl_stepwise``
            (``prompt``, ``completions``, ``labels``), ``prm800k`` (PRM800K label records) or
            ``labelled`` (canonical labelled responses); see ``stepwise_lit.data.labelled``.
        threshold: A step score below it marks the step wrong; null: chosen on the validation part.
        validation_fraction: With no threshold, the share of the distinct problems (all their
            responses) the threshold is chosen on, in (0, 1); the rest is evaluated.
        seed: Seed of the draw of validation problems.
        batch_size: Responses per scorer call (the scorer batches inside a call by its own settings).
    """

    path: str | None = None
    format: LabelledFormat = "processbench"
    threshold: float | None = None
    validation_fraction: float = 0.5
    seed: int = 0
    batch_size: int = 64


def check_labelled_settings(settings: LabelledSettings) -> None:
    """Fails on settings that cannot work, before anything is read or loaded.

    Raises:
        SettingError: Naming the ``labelled.*`` setting.
    """
    if settings.threshold is None and not 0 < settings.validation_fraction < 1:
        raise SettingError(
            f"labelled.validation_fraction: must be in (0, 1) when labelled.threshold is null, got {settings.validation_fraction}"
        )
    if settings.batch_size < 1:
        raise SettingError(f"labelled.batch_size: must be at least 1, got {settings.batch_size}")


def split_by_problem(responses: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Validation and evaluated parts: every response of a problem goes to the same part.

    The distinct prompts, in first-seen order, are shuffled by ``random.Random(seed)``; the first
    ``round(fraction * problems)`` of them (at least 1, at most all but one) are the validation
    problems. Each part keeps the file order.

    Args:
        responses: Labelled responses, at least two distinct prompts.
        fraction: Share of the problems for validation, in (0, 1).
        seed: Seed of the shuffle.

    Returns:
        The validation responses and the evaluated ones.
    """
    problems = list(dict.fromkeys(json.dumps(response["prompt"]) for response in responses))
    random.Random(seed).shuffle(problems)
    size = min(max(round(fraction * len(problems)), 1), len(problems) - 1)
    validation = set(problems[:size])
    chosen = [json.dumps(response["prompt"]) in validation for response in responses]
    return (
        [response for response, held in zip(responses, chosen) if held],
        [response for response, held in zip(responses, chosen) if not held],
    )


def score_responses(scorer: StepScorer, responses: Sequence[dict], batch_size: int) -> list[list[float]]:
    """Each response's step scores, ``batch_size`` responses per `score_steps` call (with a progress bar)."""
    scores: list[list[float]] = []
    starts = range(0, len(responses), batch_size)
    for start in tqdm(starts, desc="scoring labelled steps", disable=len(starts) < 2, leave=False):
        part = responses[start : start + batch_size]
        scores += scorer.score_steps([r["prompt"] for r in part], [r["steps"] for r in part], None)
    return scores


def padded(rows: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows as float64 ``[N, S]`` (0 past a row's end) and the bool mask of real entries ``[N, S]``."""
    width = max((len(row) for row in rows), default=0)
    values = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for index, row in enumerate(rows):
        values[index, : len(row)] = torch.tensor(row, dtype=torch.float64)
        mask[index, : len(row)] = True
    return values, mask


def localisation_values(responses: Sequence[dict], scores: Sequence[Sequence[float]], threshold: float) -> dict:
    """ProcessBench values of scored labelled responses at ``threshold``.

    Returns:
        ``num_responses``, ``num_erroneous``, ``num_correct``, ``error_acc``, ``correct_acc``,
        ``processbench_f1`` and ``within_response_auroc`` (None where nothing is counted).
    """
    step_scores, step_mask = padded(scores)
    step_labels, _ = padded([response["step_scores"] for response in responses])
    labels = torch.tensor([response["first_error"] for response in responses], dtype=torch.long)
    metric = ProcessBenchF1(threshold, sync_on_compute=False)
    metric.update(step_scores, step_mask, labels)
    auroc = WithinResponseAUROC(sync_on_compute=False)
    auroc.update(step_scores, step_labels, step_mask)
    values = metric.compute()
    return {
        "num_responses": len(responses),
        "num_erroneous": int((labels >= 0).sum()),
        "num_correct": int((labels < 0).sum()),
        "error_acc": finite(values["error_acc"]),
        "correct_acc": finite(values["correct_acc"]),
        "processbench_f1": finite(values["f1"]),
        "within_response_auroc": finite(auroc.compute()),
    }


def finite(value: torch.Tensor) -> float | None:
    """A JSON number: float, or None for NaN (nothing counted)."""
    value = float(value)
    return value if math.isfinite(value) else None


def read_responses(settings: LabelledSettings) -> list[dict]:
    """The labelled responses of ``settings.path``.

    Raises:
        DataFormatError: For a bad record (file, line or row, field).
        SettingError: Naming ``labelled.path`` for a file without responses, or
            ``labelled.threshold`` when a threshold is to be chosen and there is one problem only.
    """
    responses = read_labelled(settings.path, settings.format)
    if not responses:
        raise SettingError(f"labelled.path: {settings.path} holds no labelled response")
    if settings.threshold is None and len({json.dumps(response["prompt"]) for response in responses}) < 2:
        raise SettingError(
            f"labelled.threshold: {settings.path} has one problem only, so no validation part can be split off; set a threshold"
        )
    return responses


def localise(scorer: StepScorer, responses: Sequence[dict], settings: LabelledSettings) -> dict:
    """Scores every labelled response and computes the ProcessBench values.

    Args:
        scorer: The step scorer.
        responses: Labelled responses (:func:`read_responses`).
        settings: Where they come from, the threshold or how to choose it.

    Returns:
        The report section: ``data``, ``format``, ``scorer``, ``threshold``, ``threshold_source``
        (``labelled.threshold`` or ``validation part``), ``split`` (fraction, seed, problems and
        responses per part; None with a given threshold), the values of the evaluated part
        (:func:`localisation_values`) and, with a chosen threshold, ``validation`` (the values of
        the validation part at it).

    Raises:
        SettingError: Naming ``labelled.validation_fraction`` when the validation part lacks
            responses with or without an error (a threshold cannot be chosen).
    """
    report = {"data": settings.path, "format": settings.format, "scorer": type(scorer).__name__}
    if settings.threshold is not None:
        scores = score_responses(scorer, responses, settings.batch_size)
        values = localisation_values(responses, scores, settings.threshold)
        return {**report, "threshold": settings.threshold, "threshold_source": "labelled.threshold", "split": None, **values}
    validation, evaluated = split_by_problem(responses, settings.validation_fraction, settings.seed)
    labels = torch.tensor([response["first_error"] for response in validation])
    if not ((labels >= 0).any() and (labels < 0).any()):
        raise SettingError(
            f"labelled.validation_fraction: the validation part ({len(validation)} responses, seed {settings.seed}) has "
            f"{int((labels >= 0).sum())} responses with an error and {int((labels < 0).sum())} without; a threshold needs "
            "both: raise the fraction, change labelled.seed, or set labelled.threshold"
        )
    scores = score_responses(scorer, validation + evaluated, settings.batch_size)
    validation_scores, evaluated_scores = scores[: len(validation)], scores[len(validation) :]
    step_scores, step_mask = padded(validation_scores)
    threshold = choose_threshold(step_scores, step_mask, labels)
    split = {
        "validation_fraction": settings.validation_fraction,
        "seed": settings.seed,
        "validation_problems": len({json.dumps(response["prompt"]) for response in validation}),
        "validation_responses": len(validation),
        "evaluated_problems": len({json.dumps(response["prompt"]) for response in evaluated}),
        "evaluated_responses": len(evaluated),
    }
    return {
        **report,
        "threshold": threshold,
        "threshold_source": "validation part",
        "split": split,
        **localisation_values(evaluated, evaluated_scores, threshold),
        "validation": localisation_values(validation, validation_scores, threshold),
    }
