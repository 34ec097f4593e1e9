"""Best-of-N: pick one of N sampled solutions per prompt, by implicit step reward, log-prob or vote.

Rules, each giving the chosen candidate's index per prompt:

- ``implicit_min`` / ``implicit_sum``: the highest min (sum) over steps of the implicit step
  reward h_t (`stepwise_lit.rewards.implicit.ImplicitStepScorer.raw_step_rewards`, per token when
  the scorer's ``per_token`` is set): min asks that no step looks wrong, sum adds evidence up;
- ``log_prob``: the highest policy log-prob of the whole solution (sum of its steps' log-probs);
- ``majority``: the first candidate whose answer is the majority answer
  (`stepwise_lit.evaluation.solve_rate.majority_answer`).

Ties go to the lowest index (the first sample) in every rule; a prompt where no candidate
states an answer picks index 0 under ``majority``. `rerank_report` grades the picks against
reference answers, next to the first sample alone (``first``) and any correct candidate (``oracle``).

Generated solutions are split into steps at `step_end` (default ``"\\n"``: the embedded task
writes one step per line, ``Step k: ...``), see `split_solution`.
"""

from __future__ import annotations

from collections.abc import Sequence

from stepwise_lit.evaluation.solve_rate import majority_answer
from stepwise_lit.grading.answers import AnswerSourceName, answers_match, extract_answer
from stepwise_lit.rewards.implicit import ImplicitStepScorer


def split_solution(text: str, step_end: str = "\n") -> list[str]:
    """The steps of a generated solution: pieces of `text` each ending with `step_end` (the last may
    not); a piece with only whitespace joins the step before it (the first step, before any), so
    ``"".join(steps) == text``.

    Args:
        text: The solution.
        step_end: The text that ends a step; must not be empty.

    Returns:
        At least one step (``[""]`` for an empty solution, whose one step is its EOS).

    Raises:
        ValueError: If `step_end` is empty.
    """
    if not step_end:
        raise ValueError("step_end must not be empty")
    pieces = [piece + step_end for piece in text.split(step_end)]
    pieces[-1] = pieces[-1][: -len(step_end)]
    steps: list[str] = []
    leading = ""  # whitespace before the first step joins it
    for piece in pieces:
        if piece.strip():
            steps.append(leading + piece)
            leading = ""
        elif steps:
            steps[-1] += piece
        else:
            leading += piece
    return steps or [text]


def first_best(values: Sequence[float]) -> int:
    """Index of the largest value; ties go to the lowest index."""
    return max(range(len(values)), key=lambda index: (values[index], -index))


def pick_by_step_rewards(step_rewards: Sequence[Sequence[float]], aggregation: str) -> int:
    """The candidate with the highest min or sum of its step rewards (ties: lowest index).

    Args:
        step_rewards: One list of step rewards per candidate.
        aggregation: ``"min"`` or ``"sum"``.
    """
    if aggregation not in ("min", "sum"):
        raise ValueError(f"aggregation must be 'min' or 'sum', got {aggregation!r}")
    reduce = min if aggregation == "min" else sum
    return first_best([reduce(rewards) for rewards in step_rewards])


def pick_by_majority(answers: Sequence[str | None], source: AnswerSourceName) -> int:
    """The first candidate whose answer matches the majority answer; 0 when no candidate has one."""
    winner = majority_answer(list(answers), source)
    if winner is None:
        return 0
    return next(
        index for index, answer in enumerate(answers) if answer is not None and answers_match(answer, winner, source)
    )


def choose(
    step_rewards: Sequence[Sequence[Sequence[float]]],
    log_probs: Sequence[Sequence[float]],
    answers: Sequence[Sequence[str | None]],
    source: AnswerSourceName,
) -> dict[str, list[int]]:
    """The chosen candidate per prompt under each rule (``implicit_min``, ``implicit_sum``, ``log_prob``,
    ``majority``; see the module docstring).

    Args:
        step_rewards: Per prompt, per candidate, the step rewards h_t.
        log_probs: Per prompt, per candidate, the policy log-prob of the solution.
        answers: Per prompt, per candidate, the extracted answer (None: none stated).
        source: How answers are compared (``embedded``, ``gsm8k``, ``math``).

    Returns:
        Rule name -> one candidate index per prompt.
    """
    return {
        "implicit_min": [pick_by_step_rewards(rewards, "min") for rewards in step_rewards],
        "implicit_sum": [pick_by_step_rewards(rewards, "sum") for rewards in step_rewards],
        "log_prob": [first_best(values) for values in log_probs],
        "majority": [pick_by_majority(prompt_answers, source) for prompt_answers in answers],
    }


def rerank_report(
    chosen: dict[str, list[int]],
    answers: Sequence[Sequence[str | None]],
    references: Sequence[str],
    source: AnswerSourceName,
) -> dict[str, float]:
    """Accuracy of each rule's picks, with ``first`` (candidate 0 alone) and ``oracle`` (any
    candidate right: the best a rule could do).

    Args:
        chosen: Rule name -> chosen index per prompt (from `choose`).
        answers: Per prompt, per candidate, the extracted answer.
        references: Reference answer per prompt.
        source: How answers are compared.

    Returns:
        Name -> share of prompts answered right, in [0, 1].
    """
    correct = [[answers_match(answer, reference, source) for answer in prompt_answers]
               for prompt_answers, reference in zip(answers, references)]
    count = max(len(correct), 1)
    report = {rule: sum(row[index] for row, index in zip(correct, picks)) / count for rule, picks in chosen.items()}
    report["first"] = sum(row[0] for row in correct) / count
    report["oracle"] = sum(any(row) for row in correct) / count
    return report


def rerank(
    scorer: ImplicitStepScorer,
    prompts: Sequence[str | list[dict]],
    solutions: Sequence[Sequence[str]],
    source: AnswerSourceName,
    step_end: str = "\n",
) -> tuple[dict[str, list[int]], list[list[str | None]]]:
    """Picks one of the N solutions of each prompt under every rule, with one scorer call for all.

    Args:
        scorer: The implicit PRM (policy and reference).
        prompts: P prompts.
        solutions: Per prompt, its N >= 1 generated solutions (text).
        source: How answers are extracted and compared.
        step_end: The text that ends a step (`split_solution`).

    Returns:
        `choose`'s picks and the extracted answers (per prompt, per candidate), for `rerank_report`.
    """
    flat = [(prompt, split_solution(text, step_end)) for prompt, texts in zip(prompts, solutions) for text in texts]
    log_probs = scorer.step_log_probs([prompt for prompt, _ in flat], [steps for _, steps in flat])
    rewards = scorer.rewards_of(log_probs)  # [P·N, S]
    totals = log_probs.policy.sum(-1)  # [P·N], 0 past each response's steps
    step_rewards, policy_log_probs, answers, start = [], [], [], 0
    for texts in solutions:
        rows = range(start, start + len(texts))
        step_rewards.append([rewards[row][log_probs.step_mask[row]].tolist() for row in rows])
        policy_log_probs.append([float(totals[row]) for row in rows])
        answers.append([extract_answer(text, source) for text in texts])
        start += len(texts)
    return choose(step_rewards, policy_log_probs, answers, source), answers

