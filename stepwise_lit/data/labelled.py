"""Labelled responses for error localisation: one solution, its steps, and where its first error is.

A canonical labelled response is a plain dict:

| field | type | notes |
| --- | --- | --- |
| ``prompt`` | str or chat messages | the problem |
| ``steps`` | list[str], >= 1 | joined in order they give the response text |
| ``step_scores`` | list[float] in [-1, 1] | +1 right, -1 wrong, 0 neutral or not labelled |
| ``first_error`` | int | 0-based index of the earliest wrong step, -1 when every step is right |
| ``id`` | str | the source's, else ``<file stem>-<0-based row>`` |
| ``reference_answer`` | str or None | the correct final answer, where the source has it |

``first_error`` is the label the evaluation side scores against: ProcessBench
(Zheng et al. 2024, arXiv:2412.06559) counts a prediction right when the first step a
scorer flags (reward below a threshold) is exactly ``first_error``, or when it flags
none and ``first_error`` is -1 (``stepwise_lit.evaluation.processbench.ProcessBenchF1``, whose
``labels`` are these values). The step scores agree with it by validation: every score
before ``first_error`` is >= 0 and the score at it is < 0 (so
``stepwise_lit.evaluation.processbench.first_error_labels`` on the scores gives ``first_error`` back).

Sources (:data:`LabelledFormat`), read with :func:`read_labelled`:

- ``processbench``: ProcessBench rows ``{id, generator, problem, steps, label,
  final_answer_correct}``, ``label`` the index of the earliest wrong step or -1. ProcessBench
  labels only that step, so the scores are +1 before it, -1 at it and 0 (not labelled)
  after it. ProcessBench's steps are paragraphs without separators; here each but the
  last ends with a blank line (``"\\n\\n"``), so the response reads as paragraphs.
- ``trl_stepwise``: TRL's stepwise-supervision rows ``{prompt, completions, labels}``
  (``labels`` one bool per step): scores +1 / -1, first error the first False. Steps end
  with ``"\\n"`` but the last (TRL's default step separator).
- ``prm800k``: PRM800K label records (docs/data.md, "Labelled responses"): the labeller's
  rated trajectory (as the ``prm800k`` pair format follows it: chosen completions, human
  completions scored +1) with its ratings -1 / 0 / +1 as scores; where it stops without an
  error at a step with a completion rated -1 (``finish_reason`` ``found_error``), that
  completion ends it. First error: the first -1. A trajectory that stops without one is
  labelled all right as far as it goes. ``ground_truth_answer`` is the reference answer.
  Records with ``finish_reason`` ``bad_problem`` or no rated step are skipped, counted in
  the log. Steps end with ``"\\n"`` but the last.
- ``labelled``: canonical labelled responses (e.g. a file written from
  ``stepwise_lit.data.synthetic.generate_labelled``).

Places in messages count as in ``stepwise_lit.data.formats``: ``line N`` for JSON Lines and
CSV, ``row N`` otherwise, both 1-based, and fields are named as the source file names them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from stepwise_lit.data.formats import (
    check_score_value,
    checked_optional_text,
    checked_prompt,
    checked_steps,
    registered,
)
from stepwise_lit.data.prm800k import checked_prm800k_step, first_rated, labelled_trajectory
from stepwise_lit.data.readers import read_records
from stepwise_lit.data.records import RecordContext, RecordSkipped, checked_id, join_as_lines, required_object

logger = logging.getLogger(__name__)

LABELLED_KEYS = ("prompt", "steps", "step_scores", "first_error", "id", "reference_answer")
LabelledFormat = Literal["processbench", "trl_stepwise", "prm800k", "labelled"]


def processbench(record: dict, context: RecordContext) -> dict:
    """A ProcessBench row: +1 before ``label``, -1 at it, 0 (not labelled) after it."""
    steps = checked_steps(record, "steps", context)
    label = record.get("label")
    if isinstance(label, bool) or not isinstance(label, int):
        raise context.error("label", f"expected an integer step index or -1, got {type(label).__name__} {label!r:.40}")
    if not -1 <= label < len(steps):
        raise context.error("label", f"{label} is not -1 or a step index in 0..{len(steps) - 1} ({len(steps)} steps)")
    scores = [1.0] * len(steps) if label == -1 else [1.0] * label + [-1.0] + [0.0] * (len(steps) - label - 1)
    return {
        "prompt": record.get("problem"),
        "steps": [step + "\n\n" for step in steps[:-1]] + steps[-1:],
        "step_scores": scores,
        "first_error": label,
        "id": record.get("id"),
    }


def trl_stepwise(record: dict, context: RecordContext) -> dict:
    """A TRL stepwise-supervision row: one bool label per completion step, +1 / -1."""
    steps = checked_steps(record, "completions", context)
    labels = one_per_step(record, "labels", "booleans", ("completions", len(steps)), context)
    for position, label in enumerate(labels):
        if not isinstance(label, bool):
            raise context.error("labels", f"label {position + 1} is {type(label).__name__} {label!r:.40}, expected true or false")
    return {
        "prompt": record.get("prompt"),
        "steps": join_as_lines(steps),
        "step_scores": [1.0 if label else -1.0 for label in labels],
        "first_error": labels.index(False) if False in labels else -1,
        "id": record.get("id"),
    }


def prm800k_solution(record: dict, context: RecordContext) -> dict:
    """A PRM800K label record: the rated trajectory, ended by a -1 completion where labelling found one."""
    question = required_object(record, "question", context)
    steps = required_object(record, "label", context).get("steps")
    if not isinstance(steps, list):
        raise context.error("label.steps", "expected a list of step objects")
    if record["label"].get("finish_reason") == "bad_problem":
        raise RecordSkipped("finish_reason is bad_problem")
    steps = [checked_prm800k_step(step, position, context) for position, step in enumerate(steps)]
    path = labelled_trajectory(steps)  # [(text, score)]
    error = first_rated(steps[len(path)], -1) if len(path) < len(steps) else None
    if error is not None and all(score >= 0 for _, score in path):
        path.append((error["text"], -1.0))
    if not path:
        raise RecordSkipped("no rated step")
    scores = [score for _, score in path]
    return {
        "prompt": question.get("problem"),
        "steps": join_as_lines([text for text, _ in path]),
        "step_scores": scores,
        "first_error": scores.index(-1.0) if -1.0 in scores else -1,
        "id": record.get("id") or f"{record.get('labeler', context.default_id())}:{record.get('timestamp', '')}",
        "reference_answer": question.get("ground_truth_answer"),
    }


def one_per_step(record: dict, field: str, items: str, steps: tuple[str, int], context: RecordContext) -> list:
    """The list in ``field`` with one value per step.

    Args:
        record: The record.
        field: The list's field.
        items: What the list holds, for messages (``"booleans"``).
        steps: The steps' field name (as the record names it) and how many steps there are.
        context: Where the record comes from.
    """
    values = record.get(field)
    if not isinstance(values, (list, tuple)):
        raise context.error(field, "missing" if values is None else f"expected a list of {items}, got {type(values).__name__}")
    steps_field, num_steps = steps
    if len(values) != num_steps:
        raise context.error(field, f"{steps_field} has {num_steps} steps but {field} has {len(values)} values")
    return list(values)


def labelled(record: dict, context: RecordContext) -> dict:
    """The canonical labelled response itself."""
    return record


LabelledReader = Callable[[dict, RecordContext], dict]
LABELLED_READERS: dict[str, LabelledReader] = {
    "processbench": processbench,
    "trl_stepwise": trl_stepwise,
    "prm800k": prm800k_solution,
    "labelled": labelled,
}
# Canonical field -> the source's name for it, for messages.
SOURCE_FIELD_NAMES = {
    "processbench": {"prompt": "problem"},
    "trl_stepwise": {"steps": "completions"},
    "prm800k": {"prompt": "question.problem", "reference_answer": "question.ground_truth_answer"},
}


def read_labelled(path: str | Path, format: str) -> list[dict]:
    """Read labelled responses from a ``.json``, ``.jsonl``, ``.parquet`` or ``.csv`` file.

    Args:
        path: The file.
        format: One of :data:`LabelledFormat`.

    Returns:
        Valid canonical labelled responses, in file order.

    Raises:
        DataFormatError: Naming the file, line or row, field and problem of the first bad record.
    """
    return labelled_responses(read_records(path), format, Path(path).name)


def labelled_responses(records: Sequence[dict], format: str, source: str) -> list[dict]:
    """Convert records (e.g. rows of a hub dataset) with the reader for ``format`` and validate them.

    Args:
        records: Input records; :class:`~stepwise_lit.data.readers.Records` give their line
            numbers to messages, other sequences are counted as rows (1-based).
        format: One of :data:`LabelledFormat`.
        source: File or dataset name for messages.

    Returns:
        Valid canonical labelled responses, in record order; records that give none
        (PRM800K ``bad_problem``) are counted in the log.

    Raises:
        DataFormatError: For an unknown format, no records, or the first bad record.
    """
    reader, line_numbers = registered(LABELLED_READERS, format, records, source)
    responses = []
    skipped: dict[str, int] = {}
    for index, record in enumerate(records):
        line = None if line_numbers is None else line_numbers[index]
        context = RecordContext(source, index, "", 0, line=line, field_names=SOURCE_FIELD_NAMES.get(format, {}))
        if not isinstance(record, dict):
            raise context.error(None, f"expected a record object (dict), got {type(record).__name__}")
        try:
            responses.append(validate_labelled(reader(record, context), context))
        except RecordSkipped as skip:
            skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
    for reason, count in skipped.items():
        logger.warning("%s: skipped %d of %d records (%s)", source, count, len(records), reason)
    return responses


def validate_labelled(response: Any, context: RecordContext) -> dict:
    """Check a canonical labelled response and return it with exactly :data:`LABELLED_KEYS`.

    Raises:
        DataFormatError: Naming the first problem: a bad prompt or steps, a score count
            that differs from the step count, a score that is not a finite number in
            [-1, 1], a ``first_error`` that is not -1 or a step index, or scores that
            disagree with ``first_error``.
    """
    if not isinstance(response, dict):
        raise context.error(None, f"expected a labelled response (dict), got {type(response).__name__}")
    steps = checked_steps(response, "steps", context)
    scores = one_per_step(response, "step_scores", "numbers", ("steps", len(steps)), context)
    for position, score in enumerate(scores):
        check_score_value(score, "step_scores", f"score {position + 1}", context)
    first_error = response.get("first_error")
    if isinstance(first_error, bool) or not isinstance(first_error, int) or not -1 <= first_error < len(steps):
        raise context.error("first_error", f"expected -1 or a step index in 0..{len(steps) - 1}, got {first_error!r:.40}")
    first_negative = next((position for position, score in enumerate(scores) if score < 0), -1)
    if first_negative != first_error:
        raise context.error(
            "step_scores",
            f"the first negative score is at step index {first_negative} but first_error is {first_error}",
        )
    return {
        "prompt": checked_prompt(response, context),
        "steps": steps,
        "step_scores": [float(score) for score in scores],
        "first_error": first_error,
        "id": checked_id(response, context) or context.default_id(),
        "reference_answer": checked_optional_text(response, "reference_answer", context),
    }
