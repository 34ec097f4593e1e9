"""CombinedRewardModel: process (step) scores mixed with an outcome reward model's score."""

from __future__ import annotations

from stepwise_lit.data.records import Prompt
from stepwise_lit.rewards.base import StepScorer
from stepwise_lit.rewards.outcome import OutcomeRewardModel


class CombinedRewardModel(StepScorer):
    """Step t of a response gets ``(w_p g_t + w_o R) / (w_p + w_o)``: g_t from the
    process scorer, R the outcome reward model's score of the whole response, w_p =
    `process_weight`, w_o = `outcome_weight`. A convex mix, so it stays in [-1, 1];
    only the ratio of the weights matters."""

    def __init__(
        self,
        process: StepScorer,
        outcome: OutcomeRewardModel,
        process_weight: float = 0.5,
        outcome_weight: float = 0.5,
    ) -> None:
        """Mixes two scorers.

        Args:
            process: Scores every step (e.g. a `GenerativeStepScorer`, a
                `ClassifierStepScorer` or an `ArithmeticStepVerifier`).
            outcome: Scores the whole response.
            process_weight: Weight of the step score, >= 0.
            outcome_weight: Weight of the outcome score, >= 0.

        Raises:
            ValueError: If a weight is negative or both are zero.
        """
        super().__init__()
        if process_weight < 0 or outcome_weight < 0 or process_weight + outcome_weight <= 0:
            raise ValueError(
                f"process_weight and outcome_weight must be >= 0 and not both 0; got {process_weight}, {outcome_weight}"
            )
        self.process = process
        self.outcome = outcome
        self.process_weight = process_weight / (process_weight + outcome_weight)
        self.outcome_weight = outcome_weight / (process_weight + outcome_weight)

    def _score_steps(
        self, prompts: list[Prompt], steps: list[list[str]], reference_solutions: list[str | None]
    ) -> list[list[float]]:
        step_scores = self.process.score_steps(prompts, steps, reference_solutions)
        outcomes = self.outcome.score_outcomes(prompts, ["".join(row_steps) for row_steps in steps])
        return [
            [self.process_weight * score + self.outcome_weight * outcome for score in row_scores]
            for row_scores, outcome in zip(step_scores, outcomes)
        ]
