"""Step scorers: give every step of a response a score in [-1, 1] (see `StepScorer`)."""

from stepwise_lit.rewards.base import StepScorer
from stepwise_lit.rewards.classifier import ClassifierStepScorer
from stepwise_lit.rewards.combined import CombinedRewardModel
from stepwise_lit.rewards.genrm import GenerativeStepScorer
from stepwise_lit.rewards.implicit import ImplicitStepScorer
from stepwise_lit.rewards.outcome import OutcomeRewardModel
from stepwise_lit.rewards.qwen_prm import QwenProcessRewardScorer
from stepwise_lit.rewards.rules import ArithmeticStepVerifier
from stepwise_lit.rewards.step_tag import StepTagScorer
from stepwise_lit.rewards.value_head import ValueHeadStepScorer

__all__ = [
    "ArithmeticStepVerifier",
    "ClassifierStepScorer",
    "CombinedRewardModel",
    "GenerativeStepScorer",
    "ImplicitStepScorer",
    "OutcomeRewardModel",
    "QwenProcessRewardScorer",
    "StepScorer",
    "StepTagScorer",
    "ValueHeadStepScorer",
]
