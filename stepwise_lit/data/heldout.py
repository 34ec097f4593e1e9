"""Held-out problems: the distinct prompts of some rows with their reference final answers.

The solve-rate evaluation and the online rounds draw the problems they generate for from here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from stepwise_lit.data.records import Prompt
from stepwise_lit.grading.answers import AnswerSourceName, extract_answer


@dataclass(frozen=True)
class Problem:
    """A held-out problem to solve.

    Attributes:
        prompt: The prompt as the data has it (text or chat messages).
        answer: Its reference final answer (:func:`reference_answer`).
        solution: The reference solution text, passed to a verifier.
    """

    prompt: Prompt
    answer: str
    solution: str


def reference_answer(reference_solution: str | None, chosen_steps: Sequence[str], source: AnswerSourceName) -> str | None:
    """A problem's reference final answer: extracted from the row's ``reference_solution``
    when it has one, else from its chosen solution (``"".join(chosen_steps)``).

    For the embedded task the reference solution is the correct solution (``... The answer
    is 14.``); for GSM8K it is the data set's answer (``... #### 72``). A reference that
    states no answer by the source's rule (a MATH ``answer`` field is the bare answer, not a
    ``\\boxed{}``) is the answer itself, stripped.

    Returns:
        The answer, or None when the row has neither a reference solution nor a chosen one.
    """
    text = reference_solution if reference_solution else "".join(chosen_steps)
    if not text.strip():
        return None
    answer = extract_answer(text, source)
    return answer if answer is not None else text.strip()


def held_out_problems(
    prompts: Sequence[Prompt],
    reference_solutions: Sequence[str | None],
    chosen_steps: Sequence[Sequence[str]],
    source: AnswerSourceName,
    max_prompts: int | None,
) -> tuple[list[Problem], int]:
    """The distinct prompts of some rows with their reference answers, in first-seen order.

    A prompt's first row gives its reference; rows without one are left out.

    Returns:
        The problems (at most ``max_prompts``), and the rows left out for having no reference.
    """
    problems: dict[str, Problem] = {}
    without_reference = 0
    for prompt, solution, steps in zip(prompts, reference_solutions, chosen_steps):
        key = json.dumps(prompt)
        if key in problems:
            continue
        answer = reference_answer(solution, steps, source)
        if answer is None:
            without_reference += 1
            continue
        problems[key] = Problem(prompt, answer, solution or "".join(steps))
        if max_prompts is not None and len(problems) == max_prompts:
            break
    return list(problems.values()), without_reference
