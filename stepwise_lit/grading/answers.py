"""Final answers of generated solutions: extraction per source, normalisation and comparison.

Each source has an extractor (solution text -> final answer string, or None when the
text states none) and a normaliser (answer string -> the form two answers are compared
in). :data:`ANSWER_SOURCES` holds them by name:

- ``embedded``: the synthetic arithmetic task (``stepwise_lit.data.synthetic``), whose
  last step ends ``"... = 14. The answer is 14."``;
- ``gsm8k``: GSM8K solutions, ``#### 72`` as in the data set, else the last number
  (model solutions end ``A: 18``);
- ``math``: MATH / MATH-500 solutions, the last ``\\boxed{...}`` (or ``\\fbox{...}``).

:func:`answers_match` compares two answers of one source: numerically when both read
as numbers, else as normalised strings (:func:`normalized_match`). ``math`` answers are compared
by Hugging Face's ``math-verify`` instead when it is installed (the ``[math]`` extra:
:func:`symbolic_match`), as TRL's ``accuracy_reward`` and open-r1 grade them; the normaliser
remains the fallback (docs/evaluation.md, "Grading MATH answers").
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

logger = logging.getLogger(__name__)

AnswerSourceName = Literal["embedded", "gsm8k", "math"]

ANSWER_NUMBER = re.compile(r"-?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
ANSWER_PHRASE = r"\bthe answer is:?\s*"
"""How a solution states its final answer in words, anywhere in a line (any case): the embedded
task's last step ``"Step 4: 76 - 9 = 67. The answer is 67."``. The rule verifier
(``stepwise_lit.rewards.rules``) reads the same phrase."""
EMBEDDED_ANSWER = re.compile(ANSWER_PHRASE + r"(-?\d+)", re.IGNORECASE)
GSM8K_ANSWER = re.compile(r"####\s*(\S+)")
BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
FRACTION = re.compile(r"(-?)\\frac(?:\{(\d+)\}|(\d))(?:\{(\d+)\}|(\d))")
SLASH_FRACTION = re.compile(r"(-?\d+)/(\d+)")
TEXT_COMMAND = re.compile(r"\\(?:text|mbox)\{([^{}]*)\}")
TRAILING_UNIT = re.compile(r"(?<=\S)\s*\\(?:text|mbox)\{[^{}]*\}(?:\^\{?\d\}?)?\s*$")
MATH_DELETIONS = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "^{\\circ}", "^\\circ", "\\$", "$")
NUMERIC_TOLERANCE = 1e-6
MATH_VERIFY_TIMEOUT = 5
"""Seconds math-verify may spend parsing or comparing one answer (its own default)."""
MATH_VERIFY_INSTALL = 'pip install "stepwise_lit[math]"'


def normalize_number(answer: str) -> str:
    """A number as written in a solution, made comparable.

    Removes spaces, ``$``, thousands commas and a trailing ``.`` (the sentence's full
    stop): ``"$1,000."`` -> ``"1000"``, ``"-3.5"`` stays.

    Args:
        answer: The answer text.

    Returns:
        The cleaned text (still a string; :func:`answers_match` reads it as a number).
    """
    return answer.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")


def extract_embedded(text: str) -> str | None:
    """The answer of an embedded-task solution: the number in its last ``"The answer is N"`` (any case,
    anywhere in a line, an optional colon after ``is``: :data:`ANSWER_PHRASE`).

    A solution that never says ``"The answer is"`` (cut by a budget, or off format)
    has no answer: its last number is an intermediate value, not a claim.

    Args:
        text: A generated solution.

    Returns:
        ``"N"``, or None.
    """
    matches = EMBEDDED_ANSWER.findall(text)
    return matches[-1] if matches else None


def extract_gsm8k(text: str) -> str | None:
    """The answer of a GSM8K solution: the number after the last ``####``, else the last number.

    Numbers may carry ``$``, thousands commas and a trailing full stop, all removed
    (:func:`normalize_number`): ``"#### 1,200"`` -> ``"1200"``, ``"A: $18."`` -> ``"18"``.

    Args:
        text: A reference solution (``... #### 72``) or a generated one.

    Returns:
        The number as a string, or None when the text has no number.
    """
    marked = GSM8K_ANSWER.findall(text)
    if marked and PLAIN_NUMBER.fullmatch(normalize_number(marked[-1])):
        return normalize_number(marked[-1])
    numbers = ANSWER_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def extract_math(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}``, nested braces included.

    ``"so $\\boxed{\\frac{1}{2}}$."`` -> ``"\\frac{1}{2}"``. The braced form only
    (``\\boxed 5`` without braces is not read); a box whose braces never close is None.

    Args:
        text: A MATH solution.

    Returns:
        The box's content as written (see :func:`normalize_math`), or None.
    """
    starts = [match.end() for match in BOXED.finditer(text)]
    if not starts:
        return None
    depth = 1
    for position in range(starts[-1], len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[starts[-1] : position]
    return None


def normalize_math(answer: str) -> str:
    """A MATH answer in a light canonical form; only these changes, in this order:

    1. a trailing ``\\text{...}`` or ``\\mbox{...}`` after other content is a unit
       and is dropped with a power after it (``"5.4 \\text{ cents}"`` -> ``"5.4"``,
       ``"15\\mbox{ cm}^2"`` -> ``"15"``); any other one is
       unwrapped (``"\\text{(C)}"`` -> ``"(C)"``);
    2. ``\\left``, ``\\right``, the spacing commands ``\\!`` ``\\,`` ``\\;`` ``\\:``,
       degree marks ``^\\circ`` ``^{\\circ}`` and dollar signs are deleted;
    3. ``\\dfrac`` and ``\\tfrac`` become ``\\frac``;
    4. all whitespace and a trailing ``.`` are removed;
    5. a number with thousands commas loses them (``"10,080"`` -> ``"10080"``); other
       commas (tuples, intervals, lists) stay.

    Nothing else: no reordering, no simplification, no symbolic equivalence.

    Args:
        answer: A boxed answer or a data set's ``answer`` field.

    Returns:
        The normalised string.
    """
    answer = TRAILING_UNIT.sub("", answer)
    answer = TEXT_COMMAND.sub(r"\1", answer)
    for deletion in MATH_DELETIONS:
        answer = answer.replace(deletion, "")
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    answer = re.sub(r"\s+", "", answer).rstrip(".")
    return answer.replace(",", "") if THOUSANDS.fullmatch(answer) else answer


def as_number(answer: str) -> float | None:
    """The value of a normalised answer that is a plain number or an integer fraction.

    Reads ``"-3.5"``, ``"\\frac{3}{4}"``, ``"\\frac34"``, ``"-\\frac{270}7"`` and
    ``"3/4"``; anything else (``"\\sqrt{2}"``, ``"(1,2)"``) is None.

    Args:
        answer: A normalised answer.

    Returns:
        The number, or None.
    """
    if PLAIN_NUMBER.fullmatch(answer):
        return float(answer)
    fraction = FRACTION.fullmatch(answer)
    if fraction:
        sign, numerator_braced, numerator_digit, denominator_braced, denominator_digit = fraction.groups()
        numerator = float(numerator_braced or numerator_digit)
        denominator = float(denominator_braced or denominator_digit)
        return None if denominator == 0 else (-1 if sign else 1) * numerator / denominator
    fraction = SLASH_FRACTION.fullmatch(answer)
    if fraction and float(fraction.group(2)) != 0:
        return float(fraction.group(1)) / float(fraction.group(2))
    return None


@dataclass(frozen=True)
class AnswerSource:
    """How one source states and compares final answers.

    Attributes:
        extract: Solution text -> final answer, or None when the text states none.
        normalize: Answer -> the form answers are compared in.
    """

    extract: Callable[[str], str | None]
    normalize: Callable[[str], str]


ANSWER_SOURCES: dict[str, AnswerSource] = {
    "embedded": AnswerSource(extract_embedded, normalize_number),
    "gsm8k": AnswerSource(extract_gsm8k, normalize_number),
    "math": AnswerSource(extract_math, normalize_math),
}


def answer_source(source: AnswerSourceName) -> AnswerSource:
    """The registered :class:`AnswerSource` called ``source``.

    Raises:
        ValueError: If no source has that name (the message lists the names).
    """
    if source not in ANSWER_SOURCES:
        raise ValueError(f"unknown answer source {source!r}; choose from {sorted(ANSWER_SOURCES)}")
    return ANSWER_SOURCES[source]


def extract_answer(text: str, source: AnswerSourceName) -> str | None:
    """The final answer of ``text`` by the extractor of ``source`` (``embedded``, ``gsm8k``, ``math``)."""
    return answer_source(source).extract(text)


def answer_key(answer: str, source: AnswerSourceName) -> str | float:
    """What two answers of ``source`` are equal on: the number when the answer reads as one,
    else the normalised string. Majority votes group answers by this key."""
    normalized = answer_source(source).normalize(answer)
    number = as_number(normalized)
    return normalized if number is None else number


def normalized_match(predicted: str, reference: str, source: AnswerSourceName) -> bool:
    """Whether two answers are equal after the source's normaliser (the hand grader).

    When both then read as numbers (:func:`as_number`) they match within
    ``1e-6 * max(1, |reference|)`` (``"0.5"`` matches ``"\\frac{1}{2}"``, ``"18.00"`` matches
    ``"18"``); otherwise the normalised strings must be equal.
    """
    predicted_key, reference_key = answer_key(predicted, source), answer_key(reference, source)
    if isinstance(predicted_key, float) and isinstance(reference_key, float):
        return math.fabs(predicted_key - reference_key) <= NUMERIC_TOLERANCE * max(1.0, math.fabs(reference_key))
    return predicted_key == reference_key


@functools.cache
def math_verifier() -> ModuleType | None:
    """The ``math_verify`` module when it is installed, else None; logs a warning (once per
    process) that ``math`` answers fall back to :func:`normalize_math`, and how to install it."""
    try:
        import math_verify
    except ImportError:
        logger.warning(
            "math-verify is not installed: MATH answers are graded by the hand normaliser "
            "(no symbolic equivalence; docs/evaluation.md). Install it with: %s", MATH_VERIFY_INSTALL,
        )
        return None
    return math_verify


def announce_grader(source: AnswerSourceName) -> None:
    """At a run's start, for the ``math`` source: load math-verify, or log once that it is
    missing (:func:`math_verifier`); nothing for the other sources."""
    if source == "math":
        math_verifier()


def symbolic_match(predicted: str, reference: str, verifier: ModuleType) -> bool | None:
    """math-verify's verdict on two ``math`` answers, or None when either does not parse.

    Each answer is parsed as the content of a ``\\boxed{}`` (``parse``), and ``verify(gold,
    answer)`` compares them symbolically and numerically (``"0.5"`` = ``"\\frac12"``,
    ``"2x+x^2"`` = ``"x^2+2x"``, ``"\\{1,2\\}"`` = ``"\\{2,1\\}"``). Only the LaTeX extraction
    runs (``LatexExtractionConfig``): the plain-expression one hands text to sympy's ``parse_expr``,
    which evaluates it with ``eval``, and a generated answer is untrusted text. Its signal-based
    timeouts only work in the main thread; elsewhere they are off.

    Args:
        predicted: An extracted answer.
        reference: The reference answer.
        verifier: The ``math_verify`` module (:func:`math_verifier`).
    """
    seconds = MATH_VERIFY_TIMEOUT if threading.current_thread() is threading.main_thread() else None
    latex_only = [verifier.LatexExtractionConfig()]
    gold = verifier.parse("\\boxed{" + reference + "}", latex_only, parsing_timeout=seconds)
    answer = verifier.parse("\\boxed{" + predicted + "}", latex_only, parsing_timeout=seconds)
    if not gold or not answer:
        return None
    return bool(verifier.verify(gold, answer, timeout_seconds=seconds))


def answers_match(predicted: str | None, reference: str, source: AnswerSourceName) -> bool:
    """Whether a predicted final answer equals the reference answer.

    ``math`` answers: math-verify's verdict (:func:`symbolic_match`) when it is installed and
    both parse; otherwise, and for the other sources, :func:`normalized_match`.

    Args:
        predicted: The extracted answer; None (no answer) never matches.
        reference: The reference final answer (not a whole solution).
        source: ``embedded``, ``gsm8k`` or ``math``.

    Returns:
        True when they match.
    """
    if predicted is None:
        return False
    verifier = math_verifier() if source == "math" else None
    verdict = None if verifier is None else symbolic_match(predicted, reference, verifier)
    return normalized_match(predicted, reference, source) if verdict is None else verdict
