"""StepTagScorer against the math-shepherd and RLHFlow model cards' readouts, on tiny random
Mistral and Llama stand-ins (tests/helpers/prm_models.py)."""

import pytest

from stepwise_lit.rewards import StepTagScorer
from tests.helpers.prm_models import (
    PROMPTS,
    STEPS,
    assert_matches_readout,
    math_shepherd_readout,
    prm_folder,
    rlhflow_readout,
)

RLHFLOW = {"step_tag": "+", "read_at": "before_tag", "format": "chat"}


@pytest.mark.parametrize("batch_size", [1, 4])
def test_math_shepherd_matches_the_model_cards_readout(tmp_path_factory, batch_size):
    scorer = StepTagScorer(prm_folder(tmp_path_factory, "math_shepherd"), batch_size=batch_size)
    assert_matches_readout(scorer, lambda question, steps: math_shepherd_readout(scorer.model, scorer.tokenizer, question, steps))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_rlhflow_matches_the_model_cards_readout(tmp_path_factory, batch_size):
    scorer = StepTagScorer(prm_folder(tmp_path_factory, "rlhflow"), batch_size=batch_size, **RLHFLOW)
    assert_matches_readout(scorer, lambda question, steps: rlhflow_readout(scorer.model, scorer.tokenizer, question, steps))


def test_reading_at_the_tag_differs_from_reading_before_it(tmp_path_factory):
    folder = prm_folder(tmp_path_factory, "rlhflow")
    at = StepTagScorer(folder, step_tag="+", format="chat").score_steps(PROMPTS[:1], STEPS[:1])
    before = StepTagScorer(folder, **RLHFLOW).score_steps(PROMPTS[:1], STEPS[:1])
    assert at[0] != pytest.approx(before[0], abs=1e-3)


def test_bad_settings_are_refused(tmp_path_factory):
    folder = prm_folder(tmp_path_factory, "math_shepherd")
    with pytest.raises(ValueError, match="positive_token: '\\+\\+' is 2 tokens"):
        StepTagScorer(folder, positive_token="++")
    with pytest.raises(ValueError, match="format must be one of"):
        StepTagScorer(folder, format="html")
    with pytest.raises(ValueError, match="same token"):
        StepTagScorer(folder, negative_token="+")
