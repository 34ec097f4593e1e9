"""Step scorers for tests, importable by class_path (``tests.helpers.stub_scorers.BracketScorer``) from YAML."""

from __future__ import annotations

import re

from stepwise_lit.rewards.base import StepScorer

BRACKET = re.compile(r"\[(-?\d+(?:\.\d+)?)\]")


class BracketScorer(StepScorer):
    """Scores a step with the number written in brackets in its text (``"[0.9] 2 + 3 = 5"`` -> 0.9), 0 without one."""

    def _score_steps(self, prompts, steps, reference_solutions):
        return [[float(match.group(1)) if (match := BRACKET.search(step)) else 0.0 for step in row] for row in steps]
