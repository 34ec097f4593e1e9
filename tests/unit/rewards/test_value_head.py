"""ValueHeadStepScorer against Skywork-o1-Open-PRM's reference readout, on a tiny random Qwen2
with the value head (tests/helpers/prm_models.py); a checkpoint without the head is refused."""

import pytest

from stepwise_lit.errors import SettingError
from stepwise_lit.rewards import ValueHeadStepScorer
from tests.helpers.prm_models import PROMPTS, QUESTIONS, STEPS, prm_folder, skywork_readout


@pytest.mark.parametrize("batch_size", [1, 4])
def test_matches_the_reference_readout(tmp_path_factory, batch_size):
    folder = prm_folder(tmp_path_factory, "skywork")
    scorer = ValueHeadStepScorer(folder, batch_size=batch_size)
    scores = scorer.score_steps(PROMPTS, STEPS)
    expected = [skywork_readout(folder, scorer.tokenizer, q, s) for q, s in zip(QUESTIONS, STEPS)]
    assert [len(row) for row in expected] == [2, 3]
    assert scores == [pytest.approx(row, abs=1e-6) for row in expected]
    assert max(abs(s) for row in scores for s in row) > 0.05


def test_a_checkpoint_without_the_value_head_is_refused(tmp_path_factory):
    with pytest.raises(SettingError, match=r"ValueHeadStepScorer .* has no weights for v_head\.summary\.bias, "
                                           r"v_head\.summary\.weight .*freshly initialised"):
        ValueHeadStepScorer(prm_folder(tmp_path_factory, "skywork_headless"))
