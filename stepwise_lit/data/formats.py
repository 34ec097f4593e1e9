"""Input formats: read records, convert them to canonical rows, validate them.

A canonical row (docs/data.md, "The canonical row") is a plain dict with ``prompt``,
``chosen_steps``, ``rejected_steps``, ``chosen_step_scores``,
``rejected_step_scores``, ``chosen_score``, ``rejected_score``, ``id`` and
``reference_solution``. Every adapter maps one input record to zero or more
canonical rows; :func:`to_canonical` runs an adapter over all records, counts
and logs the records that give no row, and validates every row it keeps.

This module holds the registry of adapters (:data:`ADAPTERS`), the
canonical row validation and the small adapters; the GSM8K, PRM800K and Step-DPO adapters live
in ``stepwise_lit.data.gsm8k``, ``stepwise_lit.data.prm800k`` and ``stepwise_lit.data.stepdpo``, the
file readers in ``stepwise_lit.data.readers``.

Places in messages count as an editor shows them: ``line N`` (the 1-based line of the
file) for JSON Lines and CSV, ``row N`` (1-based) for any other source.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any, Literal

from datasets.utils import tqdm

from stepwise_lit.data.gsm8k import gsm8k
from stepwise_lit.data.prm800k import prm800k
from stepwise_lit.data.readers import Records
from stepwise_lit.data.records import SIDES, RecordContext, RecordSkipped, checked_id, extract_steps, required_text
from stepwise_lit.data.stepdpo import step_dpo
from stepwise_lit.errors import DataFormatError

logger = logging.getLogger(__name__)

SCORE_COMMAND = "python -m stepwise_lit.score"
CANONICAL_KEYS = (
    "prompt",
    "chosen_steps",
    "rejected_steps",
    "chosen_step_scores",
    "rejected_step_scores",
    "chosen_score",
    "rejected_score",
    "id",
    "reference_solution",
)
Format = Literal["delimited", "stepwise", "preference", "gsm8k", "prm800k", "step_dpo", "synthetic"]
# Formats whose responses are text fields split into steps: messages name the user's field.
TEXT_RESPONSE_FIELDS = {"chosen_steps": "chosen", "rejected_steps": "rejected"}
PROGRESS_MIN_RECORDS = 1000  # fewer records convert in a blink: no progress bar


class CanonicalRows(list):
    """Canonical rows, and where in its source each one's record is.

    A plain list of row dicts to every reader; tokenization takes the places for its
    messages (a record can give several rows, e.g. PRM800K).

    Args:
        rows: The canonical rows.
        places: Per row, where its record is: ``{"line": n}`` or ``{"row": n}`` (1-based),
            the keyword arguments of :class:`~stepwise_lit.errors.DataFormatError`.
    """

    def __init__(self, rows: Sequence[dict], places: Sequence[Mapping[str, int]]) -> None:
        super().__init__(rows)
        self.places = list(places)


# ---------------------------------------------------------------- validation


def validate_row(row: Any, context: RecordContext, require_scores: bool = True) -> dict:
    """Check a canonical row and return it with exactly the canonical keys.

    Args:
        row: The candidate canonical row.
        context: Where the row comes from, for messages.
        require_scores: If True, missing step scores are an error (no scorer will
            fill them at train time).

    Returns:
        The row with every canonical key; scores as lists of floats, optional fields None.

    Raises:
        DataFormatError: Naming the first problem found.
    """
    if not isinstance(row, dict):
        raise context.error(None, f"expected a row object (dict), got {type(row).__name__}")
    valid = {"prompt": checked_prompt(row, context)}
    for side in SIDES:
        steps = checked_steps(row, f"{side}_steps", context)
        valid[f"{side}_steps"] = steps
        valid[f"{side}_step_scores"] = checked_step_scores(row, side, len(steps), require_scores, context)
    for side in SIDES:
        valid[f"{side}_score"] = checked_outcome_score(row, f"{side}_score", context)
    valid["id"] = checked_id(row, context)
    valid["reference_solution"] = checked_optional_text(row, "reference_solution", context)
    return valid


def checked_prompt(row: dict, context: RecordContext) -> str | list[dict]:
    """The prompt: a non-blank string or a non-empty list of ``{role, content}`` messages."""
    if "prompt" not in row or row["prompt"] is None:
        raise context.error("prompt", "missing")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise context.error("prompt", "empty prompt")
        return prompt
    if isinstance(prompt, list):
        return checked_messages(prompt, "prompt", context)
    raise context.error("prompt", f"expected a string or a list of messages, got {type(prompt).__name__}")


def checked_messages(messages: list, field: str, context: RecordContext) -> list[dict]:
    """Chat messages: a non-empty list of dicts with string ``role`` and ``content``."""
    if not messages:
        raise context.error(field, "empty prompt (no messages)")
    for position, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise context.error(
                field, f"message {position + 1} must be an object with string 'role' and 'content', got {message!r:.80}"
            )
    if not any(message["content"].strip() for message in messages):
        raise context.error(field, "empty prompt (every message is blank)")
    return messages


def checked_steps(row: dict, field: str, context: RecordContext) -> list[str]:
    """A non-empty list of non-blank step strings."""
    if field not in row or row[field] is None:
        raise context.error(field, "missing")
    steps = row[field]
    if not isinstance(steps, (list, tuple)):
        raise context.error(field, f"expected a list of strings, got {type(steps).__name__}")
    if not steps:
        raise context.error(field, "no steps (the list is empty)")
    for position, step in enumerate(steps):
        if not isinstance(step, str):
            raise context.error(field, f"step {position + 1} is {type(step).__name__}, expected a string")
        if not step.strip():
            raise context.error(field, f"step {position + 1} is empty")
    return list(steps)


def checked_step_scores(
    row: dict, side: str, num_steps: int, require_scores: bool, context: RecordContext
) -> list[float] | None:
    """One finite score in [-1, 1] per step, or None when allowed."""
    field = f"{side}_step_scores"
    scores = row.get(field)
    if scores is None:
        if require_scores:
            raise context.error(
                field,
                "step scores are missing; score the steps with a verifier first "
                f"(`{SCORE_COMMAND} ...`, see --help) or set require_scores=False "
                "and train with a step scorer that fills them",
            )
        return None
    if not isinstance(scores, (list, tuple)):
        raise context.error(field, f"expected a list of numbers, got {type(scores).__name__}")
    if len(scores) != num_steps:
        raise context.error(field, f"{side} has {num_steps} steps but {field} has {len(scores)} values")
    for position, score in enumerate(scores):
        check_score_value(score, field, f"score {position + 1}", context)
    return [float(score) for score in scores]


def check_score_value(score: Any, field: str, what: str, context: RecordContext) -> None:
    """Raise unless ``score`` is a finite real number in [-1, 1]."""
    if isinstance(score, bool) or not isinstance(score, Real):
        raise context.error(field, f"{what} is {type(score).__name__} {score!r:.40}, expected a number")
    if not math.isfinite(score):
        raise context.error(field, f"{what} is {score}, expected a finite number")
    if not -1.0 <= score <= 1.0:
        raise context.error(field, f"{what} is {score}, outside [-1, 1]")


def checked_outcome_score(row: dict, field: str, context: RecordContext) -> float | None:
    """An optional finite outcome score."""
    score = row.get(field)
    if score is None:
        return None
    if isinstance(score, bool) or not isinstance(score, Real):
        raise context.error(field, f"expected a number, got {type(score).__name__}")
    if not math.isfinite(score):
        raise context.error(field, f"{score} is not a finite number")
    return float(score)


def checked_optional_text(row: dict, field: str, context: RecordContext) -> str | None:
    """An optional string field."""
    value = row.get(field)
    if value is None or isinstance(value, str):
        return value
    raise context.error(field, f"expected a string, got {type(value).__name__}")


# ---------------------------------------------------------------- adapters


def optional_fields(record: dict) -> dict:
    """The optional canonical fields a record carries (scores, id, reference_solution)."""
    return {
        key: record.get(key)
        for key in ("chosen_step_scores", "rejected_step_scores", "chosen_score", "rejected_score", "id", "reference_solution")
    }


def delimited(record: dict, context: RecordContext) -> list[dict]:
    """The seed format: ``prompt``, ``chosen``, ``rejected`` strings split on the step delimiter.

    Optional fields (step and outcome scores, ``id``, ``reference_solution``) are
    carried through and validated later.
    """
    row = optional_fields(record)
    row["prompt"] = record.get("prompt")
    for side in SIDES:
        row[f"{side}_steps"] = extract_steps(required_text(record, side, context), context.step_delimiter)
    return [row]


def stepwise(record: dict, context: RecordContext) -> list[dict]:
    """The canonical row itself (also the format of files written from ``generate_pairs``)."""
    return [record]


def preference(record: dict, context: RecordContext) -> list[dict]:
    """TRL preference rows ``{prompt, chosen, rejected}``, plain or conversational.

    Conversational rows hold message lists: the prompt messages are the prompt and
    ``chosen`` / ``rejected`` each hold one assistant message whose content is split
    on the step delimiter. Without a ``prompt`` field (TRL's implicit prompt) the
    chosen and rejected conversations share all but their last message, which is
    the prompt.
    """
    row = optional_fields(record)
    explicit_prompt = "prompt" in record
    row["prompt"] = record["prompt"] if explicit_prompt else implicit_prompt(record, context)
    for side in SIDES:
        text = assistant_text(record.get(side), side, explicit_prompt, context)
        row[f"{side}_steps"] = extract_steps(text, context.step_delimiter)
    return [row]


def implicit_prompt(record: dict, context: RecordContext) -> list[dict]:
    """The shared leading messages of ``chosen`` and ``rejected`` conversations."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not isinstance(chosen, list):
        raise context.error("prompt", "missing (and 'chosen' is not a conversation to take it from)")
    if not isinstance(rejected, list) or rejected[:-1] != chosen[:-1]:
        raise context.error("rejected", "implicit prompt: the conversation does not start with chosen's prompt messages")
    return chosen[:-1]


def assistant_text(value: Any, field: str, explicit_prompt: bool, context: RecordContext) -> str:
    """The response text of a preference side: a string, or the last (assistant) message."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        problem = "missing" if value is None else f"expected a string or a list of messages, got {type(value).__name__}"
        raise context.error(field, problem)
    if explicit_prompt and len(value) != 1:
        raise context.error(field, f"expected one assistant message after an explicit prompt, got {len(value)} messages")
    message = value[-1]
    if not (isinstance(message, dict) and message.get("role") == "assistant" and isinstance(message.get("content"), str)):
        raise context.error(field, f"the last message must be an assistant message with string content, got {message!r:.80}")
    return message["content"]


# ---------------------------------------------------------------- entry point

Adapter = Callable[[dict, RecordContext], list[dict]]
ADAPTERS: dict[str, Adapter] = {
    "delimited": delimited,
    "stepwise": stepwise,
    "preference": preference,
    "gsm8k": gsm8k,
    "prm800k": prm800k,
    "step_dpo": step_dpo,
    "synthetic": stepwise,
}


def registered(
    registry: dict[str, Callable], format: str, records: Sequence[dict], source: str
) -> tuple[Callable, list[int] | None]:
    """The reader of `format` in `registry` and the records' line numbers (None: places are rows).

    Raises:
        DataFormatError: For an unknown format or no records at all.
    """
    if format not in registry:
        raise DataFormatError(f"unknown format {format!r}; expected one of {', '.join(sorted(registry))}", source=source)
    if not records:
        raise DataFormatError("no records (the source is empty)", source=source)
    return registry[format], records.line_numbers if isinstance(records, Records) else None


def to_canonical(
    records: Sequence[dict],
    format: str,
    source: str,
    step_delimiter: str = "\n\nStep",
    *,
    require_scores: bool = True,
    seed: int = 0,
) -> CanonicalRows:
    """Convert records with the adapter for ``format`` and validate every row.

    Args:
        records: Input records (dicts), e.g. from :func:`read_records`; :class:`Records`
            give their line numbers to messages (``line N``), other sequences are counted
            as rows (``row N``, 1-based).
        format: One of :data:`Format`.
        source: File or dataset name used in messages and logs.
        step_delimiter: Delimiter for formats whose responses are text.
        require_scores: If True, rows without step scores are an error.
        seed: Seed for adapters that draw random numbers (GSM8K corruption).

    Returns:
        Valid canonical rows, in record order, with their records' places (a progress
        bar shows for many records).

    Raises:
        DataFormatError: For an unknown format, no records at all, or the first invalid record.
    """
    adapter, line_numbers = registered(ADAPTERS, format, records, source)
    field_names = TEXT_RESPONSE_FIELDS if format in ("delimited", "preference") else {}
    rows: list[dict] = []
    places: list[dict[str, int]] = []
    skipped: dict[str, list[str]] = {}
    progress = tqdm(records, desc=f"Reading {source}", disable=len(records) < PROGRESS_MIN_RECORDS)
    for index, record in enumerate(progress):
        line = None if line_numbers is None else line_numbers[index]
        context = RecordContext(source, index, step_delimiter, seed, line=line, field_names=field_names)
        if not isinstance(record, dict):
            raise context.error(None, f"expected a record object (dict), got {type(record).__name__}")
        try:
            produced = adapter(record, context)
        except RecordSkipped as skip:
            skipped.setdefault(skip.reason, []).append(f"{index + 1}" if line is None else f"{line}")
            continue
        rows.extend(validate_row(row, context, require_scores) for row in produced)
        places.extend([{"row": index + 1} if line is None else {"line": line}] * len(produced))
    kind = "rows" if line_numbers is None else "lines"
    for reason, where in skipped.items():
        shown = ", ".join(where[:10]) + (", ..." if len(where) > 10 else "")
        logger.warning("%s: skipped %d of %d records (%s): %s %s", source, len(where), len(records), reason, kind, shown)
    logger.info("%s: %d canonical rows from %d records (format %s)", source, len(rows), len(records), format)
    return CanonicalRows(rows, places)
