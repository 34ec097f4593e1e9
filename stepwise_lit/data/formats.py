"""Input formats: read records, convert them to canonical rows, validate them.

A canonical row (docs/contract.md) is a plain dict with ``prompt``,
``chosen_steps``, ``rejected_steps``, ``chosen_step_scores``,
``rejected_step_scores``, ``chosen_score``, ``rejected_score``, ``id`` and
``reference_solution``. Every adapter maps one input record to zero or more
canonical rows; :func:`to_canonical` runs an adapter over all records, counts
and logs the records that give no row, and validates every row it keeps.

Row indexes in messages are 0-based positions in the record list; JSON line
numbers are 1-based, as an editor shows them.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import math
import operator
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

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
SIDES = ("chosen", "rejected")


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
        index: 0-based row index of the record.
        step_delimiter: Delimiter for text responses split into steps.
        seed: Seed for adapters that draw random numbers (GSM8K corruption).
    """

    source: str
    index: int
    step_delimiter: str
    seed: int

    def error(self, field: str | None, problem: str) -> DataFormatError:
        """Build the error for this record."""
        return DataFormatError(problem, source=self.source, index=self.index, field=field)

    def default_id(self) -> str:
        """An id for records without one: the source's file stem and the row index."""
        return f"{Path(self.source).stem}-{self.index}"


# ---------------------------------------------------------------- step splitting


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


# ---------------------------------------------------------------- reading files


def read_records(path: str | Path) -> list[dict]:
    """Read all records of a local ``.json``, ``.jsonl``, ``.parquet`` or ``.csv`` file.

    A ``.json`` file holds one list of objects (or is JSON Lines). Blank lines in
    JSON Lines are skipped. CSV cells are strings; a cell that holds a JSON list or
    object (``"[1, -1]"``) is decoded, and an empty cell reads as None.

    Args:
        path: The file.

    Returns:
        The records, in file order.

    Raises:
        DataFormatError: On an unparseable JSON line (with its line number), a JSON
            file that is not a list, or an unknown file extension.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_json_lines(path)
    if suffix == ".json":
        return read_json(path)
    if suffix == ".parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path).to_pylist()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return [{key: decode_csv_cell(value) for key, value in row.items()} for row in csv.DictReader(handle)]
    raise DataFormatError(
        f"unknown file type '{suffix}'; expected .json, .jsonl, .parquet or .csv", source=path.name
    )


def read_json_lines(path: Path) -> list[dict]:
    """Parse a JSON Lines file, naming the first bad line."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataFormatError(
                    f"invalid JSON: {error.msg} (column {error.colno})", source=path.name, line=line_number
                ) from None
    return records


def read_json(path: Path) -> list[dict]:
    """Parse a JSON file holding a list of records, or JSON Lines saved as ``.json``."""
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":
            return read_json_lines(path)
        raise DataFormatError(
            f"invalid JSON: {error.msg} (column {error.colno})", source=path.name, line=error.lineno
        ) from None
    if not isinstance(records, list):
        raise DataFormatError(
            f"expected a JSON list of records, got {type(records).__name__}", source=path.name
        )
    return records


def decode_csv_cell(cell: str | None) -> Any:
    """Read a CSV cell: empty -> None, a JSON list or object -> decoded, else the string."""
    if cell is None or cell == "":
        return None
    if cell.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(cell)
        except json.JSONDecodeError:
            return cell
    return cell


# ---------------------------------------------------------------- validation


def validate_row(row: Any, index: int, source: str, require_scores: bool = True) -> dict:
    """Check a canonical row and return it with exactly the canonical keys.

    Args:
        row: The candidate canonical row.
        index: 0-based row index, for messages.
        source: File or dataset name, for messages.
        require_scores: If True, missing step scores are an error (no scorer will
            fill them at train time).

    Returns:
        The row with every canonical key; scores as lists of floats, optional fields None.

    Raises:
        DataFormatError: Naming the first problem found.
    """
    context = RecordContext(source, index, step_delimiter="", seed=0)
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
                field, f"message {position} must be an object with string 'role' and 'content', got {message!r:.80}"
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


def checked_id(row: dict, context: RecordContext) -> str | None:
    """An optional id; integer ids become strings."""
    row_id = row.get("id")
    if row_id is None or isinstance(row_id, str):
        return row_id
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        return str(row_id)
    raise context.error("id", f"expected a string, got {type(row_id).__name__}")


def checked_optional_text(row: dict, field: str, context: RecordContext) -> str | None:
    """An optional string field."""
    value = row.get(field)
    if value is None or isinstance(value, str):
        return value
    raise context.error(field, f"expected a string, got {type(value).__name__}")


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


# ---------------------------------------------------------------- GSM8K

# Strongest model first: its incorrect solutions are the hardest negatives.
GSM8K_MODEL_FIELDS = ("175b_verification", "175b_finetuning", "6b_verification", "6b_finetuning")
# A number, maybe with thousands commas ("1,040"), not part of a longer number.
NUMBER_PATTERN = r"(?<![\d.,])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d]|[.,]\d)"
NUMBER = re.compile(NUMBER_PATTERN)
CALCULATOR_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>(" + NUMBER_PATTERN + ")?")
ARITHMETIC = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def gsm8k(record: dict, context: RecordContext) -> list[dict]:
    """openai/grade-school-math records, either file kind.

    ``example_model_solutions.jsonl`` (records with ``ground_truth``): the ground
    truth is chosen (+1 per step, outcome +1); the incorrect solution of the
    strongest model that has one is rejected (step scores missing, outcome -1).
    A question whose model solutions are all correct gives no pair.

    ``train.jsonl`` / ``test.jsonl`` (``question``, ``answer``): the answer is
    chosen (+1 per step) and a seeded corruption of it is rejected: +1 before the
    corrupted step, -1 from it on (see :func:`corrupt_solution`).

    Steps are lines keeping their ``"\\n"``; ``reference_solution`` is the ground truth.
    """
    question = required_text(record, "question", context)
    row_id = checked_id(record, context) or context.default_id()
    if "ground_truth" in record:
        return [gsm8k_model_solution_pair(record, question, row_id, context)]
    answer = required_text(record, "answer", context)
    chosen_steps = split_lines(answer)
    rejected_steps, error_step = corrupt_solution(chosen_steps, random.Random(f"{context.seed}:{row_id}"))
    return [
        {
            "prompt": question,
            "chosen_steps": chosen_steps,
            "rejected_steps": rejected_steps,
            "chosen_step_scores": [1.0] * len(chosen_steps),
            "rejected_step_scores": [1.0] * error_step + [-1.0] * (len(rejected_steps) - error_step),
            "id": row_id,
            "reference_solution": answer,
        }
    ]


def gsm8k_model_solution_pair(record: dict, question: str, row_id: str, context: RecordContext) -> dict:
    """Ground truth vs the strongest model's incorrect solution."""
    ground_truth = required_text(record, "ground_truth", context)
    incorrect = [solution for solution in gsm8k_model_solutions(record, context) if not solution["is_correct"]]
    if not incorrect:
        raise RecordSkipped("no incorrect model solution")
    chosen_steps = split_lines(ground_truth)
    return {
        "prompt": question,
        "chosen_steps": chosen_steps,
        "rejected_steps": split_lines(incorrect[0]["solution"]),
        "chosen_step_scores": [1.0] * len(chosen_steps),
        "rejected_step_scores": None,
        "chosen_score": 1.0,
        "rejected_score": -1.0,
        "id": row_id,
        "reference_solution": ground_truth,
    }


def gsm8k_model_solutions(record: dict, context: RecordContext) -> list[dict]:
    """The four ``{is_correct, solution}`` objects, strongest model first, checked."""
    solutions = []
    for field in GSM8K_MODEL_FIELDS:
        solution = required_object(record, field, context)
        if not isinstance(solution.get("is_correct"), bool) or not isinstance(solution.get("solution"), str):
            raise context.error(field, "expected an object with a bool 'is_correct' and a string 'solution'")
        solutions.append(solution)
    return solutions


def corrupt_solution(steps: list[str], rng: random.Random) -> tuple[list[str], int]:
    """Inject one arithmetic error into a GSM8K solution and propagate it.

    A step (never the final ``#### answer`` line) whose last calculator annotation
    ``<<expr=result>>`` has a numeric result is drawn, and that result is changed
    by a small nonzero amount; later steps get the changed numbers substituted and
    their annotations recomputed, so the error flows into the final answer. A
    solution without such annotations gets the last number of a drawn step changed.

    Args:
        steps: The correct solution's line steps.
        rng: Seeded random source.

    Returns:
        The corrupted steps (same count) and the 0-based index of the corrupted step.

    Raises:
        RecordSkipped: If no step but the last holds a number.
    """
    body = steps[:-1]
    targets = [annotated_result(step) for step in body]
    if not any(targets):
        targets = [last_number(step) for step in body]
    candidates = [position for position, target in enumerate(targets) if target is not None]
    if not candidates:
        raise RecordSkipped("no number to corrupt before the final answer")
    error_step = rng.choice(candidates)
    start, old = targets[error_step]
    step = steps[error_step]
    old = old.replace(",", "")
    replacements = {old: perturbed_number(old, rng)}
    corrupted = steps[:error_step] + [step[:start] + substitute_numbers(step[start:], replacements)]
    for step in steps[error_step + 1 :]:
        corrupted.append(recompute_annotations(substitute_numbers(step, replacements), replacements))
    return corrupted, error_step


def annotated_result(step: str) -> tuple[int, str] | None:
    """``(position, text)`` of the result of the step's last calculator annotation, if it is a number."""
    annotations = list(CALCULATOR_ANNOTATION.finditer(step))
    if not annotations or not NUMBER.fullmatch(annotations[-1].group(2)):
        return None
    return annotations[-1].start(2), annotations[-1].group(2)


def last_number(step: str) -> tuple[int, str] | None:
    """``(position, text)`` of the step's last number, or None."""
    numbers = list(NUMBER.finditer(step))
    return (numbers[-1].start(), numbers[-1].group()) if numbers else None


def perturbed_number(number: str, rng: random.Random) -> str:
    """``number`` plus a nonzero offset of 1-9 units of its last decimal place, kept non-negative if it was."""
    decimals = len(number.partition(".")[2])
    offset = rng.choice([-1, 1]) * rng.randint(1, 9) * 10.0**-decimals
    value = float(number)
    if value >= 0 and value + offset < 0:
        offset = -offset
    return f"{value + offset:.{decimals}f}"


def substitute_numbers(text: str, replacements: dict[str, str]) -> str:
    """Replace numbers in ``text`` whose comma-free form is a key of ``replacements``, keeping thousands commas."""

    def replace(match: re.Match) -> str:
        number = match.group()
        new = replacements.get(number.replace(",", ""))
        if new is None:
            return number
        return with_thousands_commas(new) if "," in number else new

    return NUMBER.sub(replace, text)


def with_thousands_commas(number: str) -> str:
    """``"11480.5"`` -> ``"11,480.5"``."""
    whole, point, fraction = number.partition(".")
    sign = "-" if whole.startswith("-") else ""
    return f"{sign}{int(whole.lstrip('-')):,}{point}{fraction}"


def recompute_annotations(step: str, replacements: dict[str, str]) -> str:
    """Re-evaluate each ``<<expr=result>>display`` whose expression changed; record new results in ``replacements``."""

    def recompute(match: re.Match) -> str:
        expression, result, display = match.groups()
        value = evaluate_arithmetic(expression)
        if value is None or not NUMBER.fullmatch(result):
            return match.group()
        new_result = format_number(value, decimals=len(result.partition(".")[2]))
        if new_result == result:
            return match.group()
        replacements[result.replace(",", "")] = new_result
        shown = "" if display is None else substitute_numbers(display, {display.replace(",", ""): new_result})
        return f"<<{expression}={new_result}>>{shown}"

    return CALCULATOR_ANNOTATION.sub(recompute, step)


def evaluate_arithmetic(expression: str) -> float | None:
    """Evaluate a calculator expression of numbers and + - * / // % ( ); None if it is anything else."""
    try:
        value = evaluate_node(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def evaluate_node(node: ast.AST) -> float:
    """Evaluate one node of an arithmetic expression tree; ValueError for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = evaluate_node(node.operand)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
        return ARITHMETIC[type(node.op)](evaluate_node(node.left), evaluate_node(node.right))
    raise ValueError(f"not arithmetic: {ast.dump(node)}")


def format_number(value: float, decimals: int) -> str:
    """Format like GSM8K: integers without a point, else ``max(decimals, 2)`` places without trailing zeros."""
    if value == round(value):
        return str(int(round(value)))
    return f"{value:.{max(decimals, 2)}f}".rstrip("0").rstrip(".")


# ---------------------------------------------------------------- PRM800K


def prm800k(record: dict, context: RecordContext) -> list[dict]:
    """PRM800K label records: one pair per step rated both +1 and -1.

    The labelled trajectory follows each step's ``chosen_completion``, or its
    ``human_completion`` (an object written by the labeler as a correct step,
    scored +1) when no completion was chosen; it ends at the first step with
    neither (labelling stopped), with ``"completions": null``, or with an unrated
    (``"rating": null``) choice. At a step on the trajectory, or the step where it
    ends, that has a +1 option (the trajectory's own choice if it scores +1, else
    the first completion rated +1) and a completion rated -1 (the first one): the
    chosen response is the whole trajectory if the +1 option is the trajectory's
    own, else the shared prefix plus the +1 option; the rejected response is the
    shared prefix plus the -1 completion. Ratings (-1, 0, +1) are the step scores.
    Steps are the texts joined as lines. ``reference_solution`` is the question's
    ``ground_truth_solution`` (phase 2), else its ``ground_truth_answer``.

    Records that give no pair (``finish_reason`` ``bad_problem``, or no step rated
    both ways) are skipped with their reason counted in the log.
    """
    question = required_object(record, "question", context)
    if not isinstance(question.get("problem"), str) or not question["problem"].strip():
        raise context.error("question.problem", "missing or not a non-empty string")
    label = required_object(record, "label", context)
    if not isinstance(label.get("steps"), list):
        raise context.error("label.steps", "expected a list of step objects")
    if label.get("finish_reason") == "bad_problem":
        raise RecordSkipped("finish_reason is bad_problem")
    steps = [checked_prm800k_step(step, position, context) for position, step in enumerate(label["steps"])]
    trajectory = labelled_trajectory(steps)  # [(text, score)] along the labeller's path
    reference = question.get("ground_truth_solution") or question.get("ground_truth_answer")
    base_id = checked_id(record, context) or f"{record.get('labeler', context.default_id())}:{record.get('timestamp', '')}"
    rows = []
    for position, step in enumerate(steps[: len(trajectory) + 1]):
        own_option = trajectory_option(step)
        own_score = trajectory[position][1] if position < len(trajectory) else None
        plus_option = own_option if own_score == 1.0 else first_rated(step, 1)
        minus_option = first_rated(step, -1)
        if plus_option is None or minus_option is None:
            continue
        prefix = trajectory[:position]
        chosen_path = trajectory if plus_option is own_option else [*prefix, (plus_option["text"], 1.0)]
        rejected_path = [*prefix, (minus_option["text"], -1.0)]
        rows.append(
            {
                "prompt": question["problem"],
                "chosen_steps": join_as_lines([text for text, _ in chosen_path]),
                "rejected_steps": join_as_lines([text for text, _ in rejected_path]),
                "chosen_step_scores": [score for _, score in chosen_path],
                "rejected_step_scores": [score for _, score in rejected_path],
                "id": f"{base_id}:step{position + 1}",
                "reference_solution": reference,
            }
        )
    if not rows:
        raise RecordSkipped("no labelled step has both a +1 (or human) and a -1 completion")
    return rows


def checked_prm800k_step(step: Any, position: int, context: RecordContext) -> dict:
    """A label step whose completions (or null) and human completion (or null) are objects with string text."""
    field = f"label.steps[{position}]"
    if not isinstance(step, dict):
        raise context.error(field, f"expected an object, got {type(step).__name__}")
    completions = step.get("completions")
    options = [*(completions if isinstance(completions, list) else []), step.get("human_completion")]
    if completions is not None and not isinstance(completions, list):
        raise context.error(f"{field}.completions", f"expected a list or null, got {type(completions).__name__}")
    for option in options:
        if option is not None and not (isinstance(option, dict) and isinstance(option.get("text"), str)):
            raise context.error(field, f"a completion must be an object with string 'text', got {option!r:.80}")
    return step


def trajectory_option(step: dict) -> dict | None:
    """The option the labeller continued with: the chosen completion, else the human completion, else None."""
    chosen_index = step.get("chosen_completion")
    completions = step.get("completions") or []
    if isinstance(chosen_index, int) and 0 <= chosen_index < len(completions):
        return completions[chosen_index]
    return step.get("human_completion")


def labelled_trajectory(steps: list[dict]) -> list[tuple[str, float]]:
    """``(text, score)`` of the labeller's path, up to the first step without a rated choice.

    The human completion scores +1; a completion scores its rating.
    """
    trajectory = []
    for step in steps:
        option = trajectory_option(step)
        if option is None:
            break
        score = 1.0 if option is step.get("human_completion") else option.get("rating")
        if score is None:
            break
        trajectory.append((option["text"], float(score)))
    return trajectory


def first_rated(step: dict, rating: int) -> dict | None:
    """The step's first completion with this rating, or None."""
    return next((option for option in step.get("completions") or [] if option.get("rating") == rating), None)


# ---------------------------------------------------------------- entry point

Adapter = Callable[[dict, RecordContext], list[dict]]
ADAPTERS: dict[str, Adapter] = {
    "delimited": delimited,
    "stepwise": stepwise,
    "preference": preference,
    "gsm8k": gsm8k,
    "prm800k": prm800k,
    "synthetic": stepwise,
}


def to_canonical(
    records: Sequence[dict],
    format: str,
    source: str,
    step_delimiter: str = "\n\nStep",
    *,
    require_scores: bool = True,
    seed: int = 0,
) -> list[dict]:
    """Convert records with the adapter for ``format`` and validate every row.

    Args:
        records: Input records (dicts), e.g. from :func:`read_records`.
        format: One of ``delimited``, ``stepwise``, ``preference``, ``gsm8k``,
            ``prm800k``, ``synthetic``.
        source: File or dataset name used in messages and logs.
        step_delimiter: Delimiter for formats whose responses are text.
        require_scores: If True, rows without step scores are an error.
        seed: Seed for adapters that draw random numbers (GSM8K corruption).

    Returns:
        Valid canonical rows, in record order.

    Raises:
        DataFormatError: For an unknown format or the first invalid record.
    """
    adapter = ADAPTERS.get(format)
    if adapter is None:
        raise DataFormatError(f"unknown format {format!r}; expected one of {', '.join(sorted(ADAPTERS))}", source=source)
    rows: list[dict] = []
    skipped: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        context = RecordContext(source, index, step_delimiter, seed)
        if not isinstance(record, dict):
            raise context.error(None, f"expected a record object (dict), got {type(record).__name__}")
        try:
            produced = adapter(record, context)
        except RecordSkipped as skip:
            skipped.setdefault(skip.reason, []).append(index)
            continue
        rows.extend(validate_row(row, index, source, require_scores) for row in produced)
    for reason, indexes in skipped.items():
        shown = ", ".join(map(str, indexes[:10])) + (", ..." if len(indexes) > 10 else "")
        logger.warning("%s: skipped %d of %d records (%s): rows %s", source, len(indexes), len(records), reason, shown)
    logger.info("%s: %d canonical rows from %d records (format %s)", source, len(rows), len(records), format)
    return rows
