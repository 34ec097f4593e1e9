"""ValueHeadStepScorer against Skywork-o1-Open-PRM's reference readout, on a tiny random Qwen2
with the value head (tests/helpers/prm_models.py); a checkpoint without the head is refused."""

import pytest

from stepwise_lit.errors import SettingError
from stepwise_lit.rewards import ValueHeadStepScorer
from tests.helpers.prm_models import (
    assert_matches_readout,
    prm_folder,
    skywork_readout,
)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_matches_the_reference_readout(tmp_path_factory, batch_size):
    folder = prm_folder(tmp_path_factory, "skywork")
    scorer = ValueHeadStepScorer(folder, batch_size=batch_size)
    assert_matches_readout(scorer, lambda question, steps: skywork_readout(folder, scorer.tokenizer, question, steps))


@pytest.mark.parametrize("kind", ["skywork_headless", "qwen_prm"])
def test_a_checkpoint_without_the_value_head_is_refused(tmp_path_factory, kind):
    """The backbone alone, or a checkpoint with another head (Qwen PRM's ``score``): ``v_head`` is missing."""
    with pytest.raises(SettingError) as refused:
        ValueHeadStepScorer(prm_folder(tmp_path_factory, kind))
    assert str(refused.value).startswith(f"model_name_or_path: ValueHeadStepScorer cannot score with {prm_folder(tmp_path_factory, kind)!r}")
    assert "has no weights for v_head.summary.bias, v_head.summary.weight (weights it lacks would be freshly initialised" in str(refused.value)
