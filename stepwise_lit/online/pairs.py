"""Training pairs from K scored solutions per prompt, by a named strategy (pure functions).

A prompt's sampled solutions (:class:`ScoredSolution`, each with its steps, one verifier
score per step, its final answer and whether that answer is right) become canonical rows
(``stepwise_lit.data.formats``: ``prompt``, ``chosen_steps``, ``rejected_steps``,
``chosen_step_scores``, ``rejected_step_scores``, ``id``, ``reference_solution``) by one of
:data:`PAIR_STRATEGIES`:

- ``best_vs_worst``: the solution with the highest aggregated step score (``aggregation``,
  as ``stepwise_lit.objective.losses.aggregate_rewards`` computes it) against the one with the
  lowest. Ties: the lowest sample index among the best, and among the worst. Correctness
  is not used.
- ``first_error_branch`` (Step-DPO / SCDPO): a correct solution against an incorrect one
  that shares the longest common prefix of steps with it, so the pair differs from the
  first wrong step on. Ties: the lowest correct index, then the lowest incorrect index.
- ``all_pairs``: every (correct, incorrect) pair, or ``max_pairs_per_prompt`` of them drawn
  with ``random.Random(f"{seed}-{prompt id}")`` when there are more; kept in (correct index,
  incorrect index) order.

Which solutions are correct is the ``correctness`` setting: ``answer`` (the final answer
matches the reference, ``stepwise_lit.grading.answers.answers_match``), ``steps`` (no step scored
below 0, the verifier's flag) or ``answer_and_steps`` (both). A solution whose correctness
cannot be told (no reference answer under ``answer``) is neither side.

With ``reference_fallback`` (``first_error_branch``, ``all_pairs``), a prompt none of whose
samples is correct takes its reference solution as the correct side: split into lines
(steps), every step scored 1, sample index K (one past the K samples) in the pair id. A
policy too weak to solve a prompt still gives a pair: the reference against its own
wrong samples. `Pairs.reference_pairs` counts them.

A solution with no non-blank step cannot be a side (a canonical row needs one); a pair
whose two step lists are the same is never built. A prompt with no valid pair is skipped
and counted under one reason of :data:`SKIP_REASONS`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import torch

from stepwise_lit.data.records import Prompt
from stepwise_lit.data.tokenize import first_divergence
from stepwise_lit.errors import SettingError
from stepwise_lit.evaluation.rerank import split_solution
from stepwise_lit.objective.losses import AGGREGATION_STRATEGIES, AggregationName, aggregate_rewards

PairStrategy = Literal["best_vs_worst", "first_error_branch", "all_pairs"]
Correctness = Literal["answer", "steps", "answer_and_steps"]
PAIR_STRATEGIES: tuple[str, ...] = get_args(PairStrategy)
SKIP_REASONS = ("fewer_than_two_usable", "equal_scores", "correctness_unknown", "no_correct", "no_incorrect")
"""Why a prompt gives no pair: fewer than two solutions with a non-blank step; every usable
solution aggregates to the same score, or the best and the worst are the same text
(``best_vs_worst``); no usable solution's correctness is known; no correct one; no incorrect
one (``first_error_branch``, ``all_pairs``, checked in this order)."""


@dataclass
class PairSettings:
    """How pairs are built from a round's scored solutions (the ``online.pairs`` settings).

    Attributes:
        strategy: ``best_vs_worst``, ``first_error_branch`` or ``all_pairs`` (see the module docstring).
        aggregation: How ``best_vs_worst`` aggregates step scores: a built-in name of
            ``model.aggregation_strategy`` (``min``, ``mean``, ``sum``, ...; ``weighted_sum``
            uses weight 1 and ``discounted`` gamma 0.9).
        correctness: What makes a solution correct for ``first_error_branch`` and ``all_pairs``:
            ``answer``, ``steps`` (no step scored below 0) or ``answer_and_steps``.
        max_pairs_per_prompt: Cap of ``all_pairs`` per prompt (the other strategies give one).
        seed: Seed of the draw under the ``all_pairs`` cap.
        reference_fallback: Where no sample of a prompt is correct, its reference solution (lines
            as steps, each scored 1) is the correct side (``first_error_branch``, ``all_pairs``).
    """

    strategy: PairStrategy = "first_error_branch"
    aggregation: AggregationName = "min"
    correctness: Correctness = "answer"
    max_pairs_per_prompt: int = 4
    seed: int = 0
    reference_fallback: bool = False

    def __post_init__(self) -> None:
        problems = {
            "strategy": (self.strategy not in PAIR_STRATEGIES, f"choose one of {', '.join(PAIR_STRATEGIES)}"),
            "aggregation": (
                self.aggregation not in AGGREGATION_STRATEGIES, f"choose one of {', '.join(AGGREGATION_STRATEGIES)}"
            ),
            "correctness": (self.correctness not in get_args(Correctness), "choose answer, steps or answer_and_steps"),
            "max_pairs_per_prompt": (self.max_pairs_per_prompt < 1, "must be at least 1"),
            "reference_fallback": (
                self.reference_fallback and self.strategy == "best_vs_worst",
                "needs strategy first_error_branch or all_pairs (best_vs_worst does not use correctness)",
            ),
        }
        for name, (is_bad, problem) in problems.items():
            if is_bad:
                raise SettingError(f"online.pairs.{name}: {problem}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ScoredSolution:
    """One sampled solution, split and scored.

    Attributes:
        completion: The generated text.
        steps: Its steps (``"".join(steps) == completion``); empty when the text is blank.
        step_scores: One verifier score in [-1, 1] per step.
        answer: Its final answer, None when it states none.
        correct: Whether the answer matches the reference answer; None without a reference.
    """

    completion: str
    steps: list[str]
    step_scores: list[float]
    answer: str | None
    correct: bool | None


@dataclass(frozen=True)
class ScoredPrompt:
    """A prompt and its K scored solutions, in sample order.

    Attributes:
        id: The prompt's id, unique in the round (pair ids start with it).
        prompt: Text or chat messages.
        reference_solution: Ground-truth solution text, or None.
        solutions: The scored samples.
    """

    id: str
    prompt: Prompt
    reference_solution: str | None
    solutions: list[ScoredSolution] = field(default_factory=list)


@dataclass(frozen=True)
class Pairs:
    """The pairs of some prompts and the prompts skipped.

    Attributes:
        rows: Canonical rows, in prompt order.
        skipped: Skip reason (:data:`SKIP_REASONS`) -> number of prompts; reasons with none left out.
        reference_pairs: Rows whose correct side is the reference solution (``reference_fallback``).
    """

    rows: list[dict]
    skipped: dict[str, int]
    reference_pairs: int = 0


def is_usable(solution: ScoredSolution) -> bool:
    """Whether the solution can be a side of a pair: it has a non-blank step."""
    return any(step.strip() for step in solution.steps)


def is_correct(solution: ScoredSolution, correctness: Correctness) -> bool | None:
    """The solution's correctness under the ``correctness`` setting; None when it cannot be told.

    ``answer_and_steps``: a flagged step (score < 0) makes it incorrect even without a
    reference; otherwise it is its answer's correctness.
    """
    flagged = any(score < 0 for score in solution.step_scores)
    if correctness == "steps":
        return not flagged
    if correctness == "answer":
        return solution.correct
    return False if flagged else solution.correct


def aggregated_scores(solutions: Sequence[ScoredSolution], aggregation: AggregationName) -> list[float]:
    """Each solution's step scores aggregated by ``aggregate_rewards`` (padded to the longest; a
    solution with no step gets 0)."""
    width = max(1, max(len(solution.step_scores) for solution in solutions))
    scores = torch.zeros(len(solutions), width)  # [K, S]
    mask = torch.zeros(len(solutions), width, dtype=torch.bool)  # [K, S]
    for row, solution in enumerate(solutions):
        scores[row, : len(solution.step_scores)] = torch.tensor(solution.step_scores, dtype=torch.float32)
        mask[row, : len(solution.step_scores)] = True
    return aggregate_rewards(scores, mask, aggregation).tolist()


def common_prefix_steps(first: Sequence[str], second: Sequence[str]) -> int:
    """How many leading steps two solutions share, i.e. the 0-based index of their first differing
    step (``stepwise_lit.data.tokenize.first_divergence``); the common length when identical."""
    divergence = first_divergence(list(first), list(second))
    return len(first) if divergence is None else divergence


def best_vs_worst(solutions: Sequence[ScoredSolution], aggregation: AggregationName) -> list[tuple[int, int]] | str:
    """The (best, worst) sample indices by aggregated score, or a skip reason.

    Args:
        solutions: A prompt's K solutions.
        aggregation: The aggregation name.

    Returns:
        ``[(chosen, rejected)]``, or ``"fewer_than_two_usable"`` / ``"equal_scores"``.
    """
    usable = [index for index, solution in enumerate(solutions) if is_usable(solution)]
    if len(usable) < 2:
        return "fewer_than_two_usable"
    values = aggregated_scores([solutions[index] for index in usable], aggregation)
    best = usable[max(range(len(usable)), key=lambda position: (values[position], -position))]
    worst = usable[min(range(len(usable)), key=lambda position: (values[position], position))]
    if max(values) == min(values) or solutions[best].steps == solutions[worst].steps:
        return "equal_scores"
    return [(best, worst)]


def correct_incorrect_pairs(
    solutions: Sequence[ScoredSolution], correctness: Correctness
) -> list[tuple[int, int]] | str:
    """Every (correct, incorrect) pair of usable solutions with different steps, in index order,
    or the skip reason when there is none."""
    usable = [index for index, solution in enumerate(solutions) if is_usable(solution)]
    if len(usable) < 2:
        return "fewer_than_two_usable"
    verdicts = {index: is_correct(solutions[index], correctness) for index in usable}
    if all(verdict is None for verdict in verdicts.values()):
        return "correctness_unknown"
    correct = [index for index in usable if verdicts[index] is True]
    incorrect = [index for index in usable if verdicts[index] is False]
    if not correct:
        return "no_correct"
    pairs = [(good, bad) for good in correct for bad in incorrect if solutions[good].steps != solutions[bad].steps]
    return pairs or "no_incorrect"


def first_error_branch(solutions: Sequence[ScoredSolution], correctness: Correctness) -> list[tuple[int, int]] | str:
    """The (correct, incorrect) pair with the longest common step prefix (ties: lowest indices), or a skip reason."""
    pairs = correct_incorrect_pairs(solutions, correctness)
    if isinstance(pairs, str):
        return pairs
    return [max(pairs, key=lambda pair: (common_prefix_steps(solutions[pair[0]].steps, solutions[pair[1]].steps),
                                         -pair[0], -pair[1]))]


def all_pairs(
    solutions: Sequence[ScoredSolution], correctness: Correctness, cap: int, rng: random.Random
) -> list[tuple[int, int]] | str:
    """Every (correct, incorrect) pair, or ``cap`` of them drawn with ``rng``, in index order; or a skip reason."""
    pairs = correct_incorrect_pairs(solutions, correctness)
    if isinstance(pairs, str) or len(pairs) <= cap:
        return pairs
    return sorted(rng.sample(pairs, cap))


def pair_row(prompt: ScoredPrompt, chosen: int, rejected: int) -> dict:
    """The canonical row of samples ``chosen`` and ``rejected`` of ``prompt``; its id is
    ``"<prompt id>/<chosen>-<rejected>"`` (sample indices, 0-based)."""
    good, bad = prompt.solutions[chosen], prompt.solutions[rejected]
    return {
        "prompt": prompt.prompt,
        "chosen_steps": list(good.steps),
        "rejected_steps": list(bad.steps),
        "chosen_step_scores": [float(score) for score in good.step_scores],
        "rejected_step_scores": [float(score) for score in bad.step_scores],
        "chosen_score": None,
        "rejected_score": None,
        "id": f"{prompt.id}/{chosen}-{rejected}",
        "reference_solution": prompt.reference_solution,
    }


def with_reference(prompt: ScoredPrompt, correctness: Correctness) -> ScoredPrompt:
    """``prompt`` with its reference solution appended as a correct sample (lines as steps, each
    scored 1) when none of its usable samples is correct and it has a non-blank reference; else ``prompt``."""
    reference = prompt.reference_solution
    if not reference or not reference.strip():
        return prompt
    if any(is_usable(solution) and is_correct(solution, correctness) for solution in prompt.solutions):
        return prompt
    steps = split_solution(reference, "\n")
    solution = ScoredSolution(reference, steps, [1.0] * len(steps), answer=None, correct=True)
    return replace(prompt, solutions=[*prompt.solutions, solution])


def prompt_pairs(prompt: ScoredPrompt, settings: PairSettings) -> list[tuple[int, int]] | str:
    """The (chosen, rejected) sample indices ``settings.strategy`` picks for one prompt, or its skip reason."""
    if settings.strategy == "best_vs_worst":
        return best_vs_worst(prompt.solutions, settings.aggregation)
    if settings.strategy == "first_error_branch":
        return first_error_branch(prompt.solutions, settings.correctness)
    rng = random.Random(f"{settings.seed}-{prompt.id}")
    return all_pairs(prompt.solutions, settings.correctness, settings.max_pairs_per_prompt, rng)


def build_pairs(prompts: Sequence[ScoredPrompt], settings: PairSettings) -> Pairs:
    """Canonical training rows of every prompt by ``settings.strategy``; prompts without a pair are counted.

    Args:
        prompts: The round's prompts with their scored solutions.
        settings: Strategy, aggregation, correctness, cap and seed.

    Returns:
        The rows (prompt order, then the strategy's order) and the skip counts by reason. The
        same inputs and settings always give the same rows.
    """
    rows: list[dict] = []
    skipped: Counter[str] = Counter()
    reference_pairs = 0
    for prompt in prompts:
        num_samples = len(prompt.solutions)
        if settings.reference_fallback:
            prompt = with_reference(prompt, settings.correctness)
        picked = prompt_pairs(prompt, settings)
        if isinstance(picked, str):
            skipped[picked] += 1
            continue
        rows.extend(pair_row(prompt, chosen, rejected) for chosen, rejected in picked)
        reference_pairs += sum(chosen == num_samples for chosen, _ in picked)
    return Pairs(rows, {reason: skipped[reason] for reason in SKIP_REASONS if skipped[reason]}, reference_pairs)
