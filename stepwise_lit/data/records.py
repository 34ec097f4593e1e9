"""What every input adapter shares: where a record comes from, skipping it, reading its fields.

The registry of adapters (``stepwise_lit.data.formats``) imports the large adapters
(``gsm8k``, ``prm800k``); they import this module, never the registry, so there is no
import circle.

Places in messages count as an editor shows them: ``line N`` (1-based line of the file) for
records read from JSON Lines or CSV, ``row N`` (1-based position) for any other source.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stepwise_lit.errors import DataFormatError

SIDES = ("chosen", "rejected")

Prompt = str | list[dict]
"""A prompt as the data has it: text, or chat messages ``[{"role": ..., "content": ...}]``."""


class RecordSkipped(Exception):
    """Raised by an adapter for a record that gives no pair; ``to_canonical`` counts it.

    Args:
        reason: Why the record gives no pair (one short phrase, shared by all such records).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RecordContext:
    """Where a record comes from and the options its adapter needs.

    Attributes:
        source: File or dataset name used in messages.
        index: 0-based position of the record in the source (default ids use it).
        step_delimiter: Delimiter for text responses split into steps.
        seed: Seed for adapters that draw random numbers (GSM8K corruption).
        line: 1-based line of the file where the record starts (JSON Lines, CSV); None for
            other sources, whose messages say ``row <index + 1>``.
        field_names: Canonical field -> the name the user's file has for it (``delimited``
            responses are ``chosen``, not ``chosen_steps``), used in messages.
    """

    source: str
    index: int
    step_delimiter: str
    seed: int
    line: int | None = None
    field_names: Mapping[str, str] = field(default_factory=dict)

    def error(self, field: str | None, problem: str) -> DataFormatError:
        """Build the error for this record, naming the field as the user's file does."""
        shown_field = None if field is None else self.field_names.get(field, field)
        row = None if self.line is not None else self.index + 1
        return DataFormatError(problem, source=self.source, row=row, field=shown_field, line=self.line)

    def default_id(self) -> str:
        """An id for records without one: the source's file stem and the 0-based row index."""
        return f"{Path(self.source).stem}-{self.index}"


def required_text(record: dict, field: str, context: RecordContext) -> str:
    """A string field that must be present."""
    if field not in record or record[field] is None:
        raise context.error(field, "missing")
    value = record[field]
    if not isinstance(value, str):
        raise context.error(field, f"expected a string, got {type(value).__name__}")
    return value


def required_object(record: dict, field: str, context: RecordContext) -> dict:
    """A JSON object field that must be present."""
    value = record.get(field)
    if not isinstance(value, dict):
        problem = "missing" if value is None else f"expected an object, got {type(value).__name__}"
        raise context.error(field, problem)
    return value


def checked_id(row: dict, context: RecordContext) -> str | None:
    """An optional id; integer ids become strings."""
    row_id = row.get("id")
    if row_id is None or isinstance(row_id, str):
        return row_id
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        return str(row_id)
    raise context.error("id", f"expected a string, got {type(row_id).__name__}")


def split_lines(text: str) -> list[str]:
    """Split text into line steps, each keeping its trailing ``"\\n"``.

    Blank lines are joined to the line before them (leading blank lines to the
    first line), so ``"".join(steps) == text`` and no step is blank.

    Args:
        text: Text with one step per line.

    Returns:
        The line steps.
    """
    steps: list[str] = []
    for line in re.findall(r"[^\n]*\n|[^\n]+$", text):
        if steps and (not line.strip() or not steps[-1].strip()):
            steps[-1] += line
        else:
            steps.append(line)
    return steps


def join_as_lines(texts: Sequence[str]) -> list[str]:
    """Turn step texts without separators into line steps: ``"\\n"`` ends every step but the last."""
    return [text + "\n" for text in texts[:-1]] + list(texts[-1:])


def extract_steps(text: str, delimiter: str, max_steps: int | None = None) -> list[str]:
    """Split a response into steps before each occurrence of ``delimiter``.

    Each step after the first starts with the delimiter (``"\\n\\nStep 2: ..."``), so
    ``"".join(steps) == text``. Text before the first delimiter is a step of its own
    unless it is empty. A whitespace-only piece is joined to the step before it, so
    no step is blank unless the whole text is.

    Args:
        text: The response text.
        delimiter: Non-empty step delimiter, e.g. ``"\\n\\nStep"``.
        max_steps: If given, steps past this many are joined into the last one.

    Returns:
        The steps; empty only when ``text`` is empty.
    """
    if not delimiter:
        raise ValueError("step delimiter must be a non-empty string")
    first, *rest = text.split(delimiter)
    pieces = ([first] if first else []) + [delimiter + piece for piece in rest]
    steps: list[str] = []
    for piece in pieces:
        if steps and not piece.strip():
            steps[-1] += piece
        else:
            steps.append(piece)
    if max_steps is not None and len(steps) > max_steps:
        steps = steps[: max_steps - 1] + ["".join(steps[max_steps - 1 :])]
    return steps
