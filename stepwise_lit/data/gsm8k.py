"""The GSM8K adapter (openai/grade-school-math) and its corruption engine.

``example_model_solutions.jsonl`` gives the ground truth vs a model's incorrect solution;
``train.jsonl`` / ``test.jsonl`` give the answer vs a seeded corruption of it: one
calculator result changed and the change carried through every later step
(:func:`corrupt_solution`). Calculations are redone with the shared safe evaluator of
``stepwise_lit.grading.arithmetic``.
"""

from __future__ import annotations

import random
import re

from stepwise_lit.data.records import (
    RecordContext,
    RecordSkipped,
    checked_id,
    required_object,
    required_text,
    split_lines,
)
from stepwise_lit.grading.arithmetic import NUMBER, NUMBER_PATTERN, evaluate_arithmetic

# Strongest model first: its incorrect solutions are the hardest negatives.
GSM8K_MODEL_FIELDS = ("175b_verification", "175b_finetuning", "6b_verification", "6b_finetuning")
CALCULATOR_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>(" + NUMBER_PATTERN + ")?")


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


def format_number(value: float, decimals: int) -> str:
    """Format like GSM8K: integers without a point, else ``max(decimals, 2)`` places without trailing zeros."""
    if value == round(value):
        return str(int(round(value)))
    return f"{value:.{max(decimals, 2)}f}".rstrip("0").rstrip(".")
