"""QwenProcessRewardScorer against the Qwen2.5-Math-PRM model card's readout, on a tiny random
Qwen2 with the 2-class head (tests/helpers/prm_models.py); a checkpoint without the head is refused."""

import pytest

from stepwise_lit.errors import SettingError
from stepwise_lit.rewards import QwenProcessRewardScorer
from tests.helpers.prm_models import (
    assert_matches_readout,
    prm_folder,
    qwen_prm_readout,
)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_matches_the_model_cards_readout(tmp_path_factory, batch_size):
    folder = prm_folder(tmp_path_factory, "qwen_prm")
    scorer = QwenProcessRewardScorer(folder, batch_size=batch_size)
    assert_matches_readout(scorer, lambda question, steps: qwen_prm_readout(folder, scorer.tokenizer, question, steps))


def test_a_checkpoint_without_the_head_is_refused(tmp_path_factory):
    with pytest.raises(SettingError, match=r"model_name_or_path: QwenProcessRewardScorer .* has no weights for "
                                           r"score\.0\.bias, score\.0\.weight, score\.2\.bias, score\.2\.weight"):
        QwenProcessRewardScorer(prm_folder(tmp_path_factory, "qwen_prm_headless"))


def test_a_separator_that_is_not_one_token_is_refused(tmp_path_factory):
    with pytest.raises(ValueError, match="step_separator: '<extra_1>' is 9 tokens"):
        QwenProcessRewardScorer(prm_folder(tmp_path_factory, "qwen_prm"), step_separator="<extra_1>")
