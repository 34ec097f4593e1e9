"""One online round in memory: sample K solutions per prompt, score every step, build pairs.

:func:`generate_round` decodes with any ``stepwise_lit.models.generate.Generator`` (the policy through
``TransformersGenerator``, or another backend), splits each completion into steps at
``generation.step_end`` (``stepwise_lit.evaluation.rerank.split_solution``, so the steps join back to the
completion), scores all steps with a ``StepScorer`` in one call, grades each final answer
against the prompt's reference answer, and builds pairs (``stepwise_lit.online.pairs``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from stepwise_lit.data.heldout import reference_answer
from stepwise_lit.data.records import Prompt
from stepwise_lit.errors import SettingError
from stepwise_lit.evaluation.rerank import split_solution
from stepwise_lit.grading.answers import AnswerSourceName, announce_grader, answers_match, extract_answer
from stepwise_lit.models.generate import GenerationSettings, Generator
from stepwise_lit.online.pairs import Pairs, PairSettings, ScoredPrompt, ScoredSolution, build_pairs
from stepwise_lit.rewards.base import StepScorer

log = logging.getLogger("stepwise_lit")

SCORING_CHUNK = 64
"""Solutions per ``score_steps`` call in a round (so long scoring shows progress)."""


def default_generation() -> GenerationSettings:
    """Sampling, 4 solutions per prompt."""
    return GenerationSettings(do_sample=True, num_samples=4)


@dataclass
class RoundSettings:
    """How one round samples, grades and pairs (the ``online`` settings).

    Attributes:
        generation: Decoding; must sample (``do_sample: true``) at least 2 solutions per prompt.
            Completions are split into steps at its ``step_end``.
        pairs: Pair building (``stepwise_lit.online.pairs.PairSettings``).
        answer_source: How final answers are read and compared: ``embedded``, ``gsm8k`` or ``math``
            (math-verify when installed: `stepwise_lit.grading.answers.answers_match`).
    """

    generation: GenerationSettings = field(default_factory=default_generation)
    pairs: PairSettings = field(default_factory=PairSettings)
    answer_source: AnswerSourceName = "embedded"

    def __post_init__(self) -> None:
        if not self.generation.do_sample or self.generation.num_samples < 2:
            raise SettingError(
                "online.generation.num_samples: an online round samples at least 2 solutions per prompt "
                f"(set do_sample: true and num_samples >= 2), got do_sample={self.generation.do_sample}, "
                f"num_samples={self.generation.num_samples}"
            )
        announce_grader(self.answer_source)


@dataclass(frozen=True)
class RoundRecord:
    """One round: the scored samples and the pairs built from them.

    Attributes:
        prompts: Every prompt with its scored solutions, in prompt order.
        pairs: The canonical training rows and the skipped prompts by reason.
        seconds: Wall time by phase (``generation``, ``scoring``); empty for a round read from disk.
    """

    prompts: list[ScoredPrompt]
    pairs: Pairs
    seconds: dict[str, float] = field(default_factory=dict)


def solution_steps(completion: str, step_end: str) -> list[str]:
    """The steps of a completion (``split_solution``); none for a blank completion, which no scorer sees."""
    return split_solution(completion, step_end) if completion.strip() else []


def checked_prompt_ids(prompt_ids: Sequence[str] | None, num_prompts: int) -> list[str]:
    """The prompts' ids: as given (one per prompt, unique), or ``"0"``, ``"1"``, ... by position."""
    if prompt_ids is None:
        return [str(index) for index in range(num_prompts)]
    if len(prompt_ids) != num_prompts or len(set(prompt_ids)) != num_prompts:
        raise ValueError(f"generate_round needs {num_prompts} unique prompt ids, got {list(prompt_ids)[:5]}...")
    return list(prompt_ids)


def generate_round(
    generator: Generator,
    scorer: StepScorer,
    prompts: Sequence[Prompt],
    references: Sequence[str | None],
    settings: RoundSettings,
    prompt_ids: Sequence[str] | None = None,
    progress: bool = False,
) -> RoundRecord:
    """Sample, score, grade and pair one round.

    Args:
        generator: Decodes ``settings.generation.num_samples`` completions per prompt.
        scorer: Scores every step (given the reference solutions, which rule verifiers use).
        prompts: N prompts.
        references: N reference solutions (``None`` where unknown: those solutions'
            ``correct`` is None).
        settings: Decoding, pairing and answer source.
        prompt_ids: N unique ids (pair ids start with them); default the positions.
        progress: Show a progress bar over the scorer's calls (``SCORING_CHUNK`` solutions each).

    Returns:
        The round, with the time spent generating and scoring.
    """
    if len(references) != len(prompts):
        raise ValueError(f"generate_round got {len(prompts)} prompts but {len(references)} references")
    ids = checked_prompt_ids(prompt_ids, len(prompts))
    start = time.perf_counter()
    completions = generator.generate(prompts, settings.generation)
    generated = time.perf_counter()
    num_samples = settings.generation.num_samples
    if len(completions) != len(prompts) or any(len(samples) != num_samples for samples in completions):
        raise RuntimeError(f"the generator must return {num_samples} completions for each of {len(prompts)} prompts")
    steps = [[solution_steps(text, settings.generation.step_end) for text in samples] for samples in completions]
    scored_places = [(row, sample) for row in range(len(prompts)) for sample in range(num_samples) if steps[row][sample]]
    scores = []
    chunks = range(0, len(scored_places), SCORING_CHUNK)
    for first in tqdm(chunks, desc="score steps", disable=not progress or len(chunks) < 2):
        places = scored_places[first : first + SCORING_CHUNK]
        scores += scorer.score_steps(
            [prompts[row] for row, _ in places],
            [steps[row][sample] for row, sample in places],
            [references[row] for row, _ in places],
        )
    step_scores = dict(zip(scored_places, scores))  # (prompt row, sample) -> scores
    scored = time.perf_counter()
    source = settings.answer_source
    round_prompts = []
    for row, (prompt, reference) in enumerate(zip(prompts, references)):
        expected = reference_answer(reference, [], source)
        solutions = []
        for sample, text in enumerate(completions[row]):
            answer = extract_answer(text, source)
            correct = None if expected is None else answers_match(answer, expected, source)
            sample_scores = step_scores.get((row, sample), [])
            solutions.append(ScoredSolution(text, steps[row][sample], sample_scores, answer, correct))
        round_prompts.append(ScoredPrompt(ids[row], prompt, reference, solutions))
    return RoundRecord(
        round_prompts,
        build_pairs(round_prompts, settings.pairs),
        {"generation": generated - start, "scoring": scored - generated},
    )
