"""ArithmeticStepVerifier: a model-free rule verifier for GSM8K-style steps."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from stepwise_lit.data.records import Prompt
from stepwise_lit.grading.answers import ANSWER_PHRASE
from stepwise_lit.grading.arithmetic import NUMBER, NUMBER_PATTERN, evaluate_arithmetic
from stepwise_lit.rewards.base import StepScorer, prompt_text

ANNOTATION = re.compile(r"<<([^<>]*)>>")
# A stated final answer: "####" or "A:" at a line start (GSM8K), or "the answer is" anywhere (answers.ANSWER_PHRASE,
# as the embedded task writes it mid-line: "Step 4: 76 - 9 = 67. The answer is 67.").
ANSWER = re.compile(
    r"(?:^\s*(?:####|A:)\s*|" + ANSWER_PHRASE + r")\$?\s*(" + NUMBER_PATTERN + ")", re.IGNORECASE | re.MULTILINE
)
THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
TIMES = re.compile(r"(?<=[\d)])\s*[x×]\s*(?=[\d($.])")
# A run of characters that can form arithmetic, with at least one "=" in it.
EQUATION_RUN = re.compile(r"[\d.+\-*/() ]*=[\d.+\-*/()= ]*")
OPERATOR_AFTER_OPERAND = re.compile(r"[\d.)]\s*[-+*/]")


@dataclass
class StepCheck:
    """What the rules found in one step.

    Attributes:
        arithmetic_ok: False when an annotation or plain equation in the step is wrong.
        result: The value the step computes (its last annotation's or equation's
            result), None when it computes nothing.
        answer: The final answer the step states ("A: 18", "#### 18", "... The answer is 18."), else None.
    """

    arithmetic_ok: bool
    result: float | None
    answer: float | None


class ArithmeticStepVerifier(StepScorer):
    """Checks the arithmetic of GSM8K-style steps and, given a ground-truth solution,
    their results against it. No model; +1 or -1 per step.

    The rule. A step gets -1 when
      1. a calculator annotation ``<<expr=result>>`` in it is wrong: ``expr``
         evaluates (``+ - * / // % **``, parentheses, decimals) to something else than
         ``result``; or
      2. a plain equation in its text (``16 - 3 - 4 = 9``, ``2 x 0.5 = 1.0``, chains
         ``a = b = c``; annotations removed, ``$``, thousands commas and ``x``/``×``
         as times normalised) has a side with an operator whose value differs from
         the next side's; or, only when a reference solution is given,
      3. it states a final answer (``A: n`` or ``#### n`` at a line start, or ``the answer
         is n`` anywhere, any case) other than the reference's final answer; or
      4. the response's final answer differs from the reference's and the step's
         result (its last annotation's or equation's value) is none of the values
         the reference computes, states as its answer, or the problem states (the
         step is where the response leaves the reference's path).
    Every other step gets +1. A value matches a claimed result when they differ by
    less than one unit of the claimed result's last decimal (so rounding and
    truncation pass) or by a relative 1e-6.

    Limits. It checks only arithmetic that is written out: a wrong quantity put into
    a correct calculation ("she eats 7 meals", then 16 * 7 = 112) passes rules 1-2,
    and without a reference such steps always get +1. Equations with words, units
    or percent signs inside (``20% of 50 = 10``, ``3 hours * 2 = 6``), implicit
    products and algebra are skipped, never flagged. Rule 4 depends on the response
    reaching a final answer; a response cut off before its answer gets only rules
    1-2. A correct alternative path through values the reference never computes is
    flagged by rule 4 only when the final answer is also wrong. Rounding is
    tolerated, so 7 / 2 = 3 passes.
    """

    def _score_steps(
        self, prompts: list[Prompt], steps: list[list[str]], reference_solutions: list[str | None]
    ) -> list[list[float]]:
        return [
            self.score_response(prompt, row_steps, reference)
            for prompt, row_steps, reference in zip(prompts, steps, reference_solutions)
        ]

    def score_response(self, prompt: Prompt, steps: list[str], reference: str | None) -> list[float]:
        """+1 / -1 per step of one response (see the class docstring for the rule)."""
        checks = [check_step(step) for step in steps]
        if reference is None:
            return [1.0 if check.arithmetic_ok else -1.0 for check in checks]
        reference_answer = final_answer(reference)
        answers = [check.answer for check in checks if check.answer is not None]
        off_path = bool(answers) and reference_answer is not None and not matches(answers[-1], reference_answer)
        supported = reference_values(reference) | problem_values(prompt)
        return [1.0 if step_ok(check, reference_answer, supported, off_path) else -1.0 for check in checks]


def step_ok(check: StepCheck, reference_answer: float | None, supported: set[float], off_path: bool) -> bool:
    """Rules 1-4 for one step, given the reference's answer and values."""
    if not check.arithmetic_ok:
        return False
    if check.answer is not None and reference_answer is not None and not matches(check.answer, reference_answer):
        return False
    if off_path and check.result is not None:
        return any(matches(check.result, value) for value in supported)
    return True


def check_step(step: str) -> StepCheck:
    """Checks a step's annotations and plain equations and finds its result and stated answer."""
    annotation_ok, annotation_result = check_annotations(step)
    equation_ok, equation_result = check_equations(normalise(ANNOTATION.sub("", step)))
    answers = ANSWER.findall(step)
    return StepCheck(
        arithmetic_ok=annotation_ok and equation_ok,
        result=annotation_result if annotation_result is not None else equation_result,
        answer=parse_number(answers[-1]) if answers else None,
    )


def check_annotations(text: str) -> tuple[bool, float | None]:
    """Whether every ``<<expr=result>>`` in `text` is right, and the last one's result."""
    ok, result = True, None
    for content in ANNOTATION.findall(text):
        expression, _, claimed = content.rpartition("=")
        claimed_value = parse_number(claimed)
        if claimed_value is None:
            continue
        value = evaluate(expression)
        if value is not None and not matches(value, claimed_value, claimed):
            ok = False
        result = claimed_value
    return ok, result


def check_equations(text: str) -> tuple[bool, float | None]:
    """Whether every plain equation chain in (normalised) `text` holds, and the last chain's value.

    A pair of neighbouring sides is compared only when both evaluate and one of
    them has an operator (``50 = 10`` out of ``20% of 50 = 10`` is not an equation).
    """
    ok, result = True, None
    for run in EQUATION_RUN.findall(text):
        sides = [side.strip() for side in run.split("=")]
        values = [evaluate(side) if is_expression(side) else None for side in sides]
        for left, right, left_value, right_value in zip(sides, sides[1:], values, values[1:]):
            if left_value is None or right_value is None:
                continue
            if not (has_operator(left) or has_operator(right)):
                continue
            if not matches(left_value, right_value, right):
                ok = False
            result = right_value
    return ok, result


def is_expression(side: str) -> bool:
    """A side starts and ends like arithmetic (a digit, a decimal point or a parenthesis),
    so it is not the tail of a phrase such as ``tickets - 3``."""
    return bool(side) and side[0] in "0123456789.(" and side[-1] in "0123456789)."


def has_operator(side: str) -> bool:
    """Whether a side has a binary operator (a leading minus sign does not count)."""
    return bool(OPERATOR_AFTER_OPERAND.search(side))


def normalise(text: str) -> str:
    """``$`` and thousands commas removed, ``x`` / ``×`` between numbers and ``÷`` / ``−`` made ASCII."""
    text = THOUSANDS_COMMA.sub("", text.replace("$", ""))
    return TIMES.sub("*", text).replace("÷", "/").replace("−", "-")


def evaluate(expression: str) -> float | None:
    """Value of an arithmetic expression after :func:`normalise` (``$``, thousands commas,
    ``x`` as times), by the shared safe evaluator (``stepwise_lit.grading.arithmetic``); None when it
    is not arithmetic, divides by zero or overflows."""
    return evaluate_arithmetic(normalise(expression))


def parse_number(text: str) -> float | None:
    """A number written as in GSM8K (``$``, thousands commas, trailing period allowed), else None."""
    cleaned = normalise(text).strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def matches(value: float, claimed: float, claimed_text: str | None = None) -> bool:
    """Whether a computed value agrees with a claimed one: within one unit of the
    claimed text's last decimal (rounding or truncation), or a relative 1e-6."""
    if math.isclose(value, claimed, rel_tol=1e-6, abs_tol=1e-9):
        return True
    if claimed_text is None:
        return False
    digits = normalise(claimed_text).strip().rstrip(".")
    decimals = len(digits.partition(".")[2]) if "." in digits else 0
    return abs(value - claimed) < 10.0**-decimals


def final_answer(solution: str) -> float | None:
    """The number of the last stated answer in a solution (``A: n`` / ``#### n`` at a line start,
    ``the answer is n`` anywhere), else None."""
    answers = ANSWER.findall(solution)
    return parse_number(answers[-1]) if answers else None


def reference_values(reference: str) -> set[float]:
    """Every value a reference solution computes (annotation results, equation sides) or states as its answer."""
    values = [parse_number(content.rpartition("=")[2]) for content in ANNOTATION.findall(reference)]
    for run in EQUATION_RUN.findall(normalise(ANNOTATION.sub("", reference))):
        values.extend(evaluate(side) for side in map(str.strip, run.split("=")) if is_expression(side))
    values.append(final_answer(reference))
    return {value for value in values if value is not None}


def problem_values(prompt: Prompt) -> set[float]:
    """The numbers the problem states (unsigned: a "-" in prose is a hyphen, "ages 3-5")."""
    return {abs(float(number)) for number in NUMBER.findall(normalise(prompt_text(prompt)))}
