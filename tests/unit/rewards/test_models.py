"""ClassifierStepScorer, OutcomeRewardModel and CombinedRewardModel on tiny local models."""

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)

from stepwise_lit.data.tokenizer import load_tokenizer
from stepwise_lit.errors import SettingError
from stepwise_lit.rewards import (
    ArithmeticStepVerifier,
    ClassifierStepScorer,
    CombinedRewardModel,
    OutcomeRewardModel,
)

PROMPTS = ["What is 2 + 3?", [{"role": "user", "content": "What is 4 * 5, then minus 1?"}]]
STEPS = [["2 + 3 = 5\n", "A: 5"], ["4 * 5 = 21\n", "21 - 1 = 20\n", "A: 20"]]


def save_tiny(model_class, path, **config):
    """Saves a random tiny Llama with a head, and the byte tokenizer, to `path`."""
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, pad_token_id=tokenizer.pad_token_id, **config,
    )
    model_class(llama).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    return save_tiny(LlamaForTokenClassification, tmp_path_factory.mktemp("prm"), num_labels=2)


@pytest.fixture(scope="module")
def orm_dir(tmp_path_factory):
    return save_tiny(LlamaForSequenceClassification, tmp_path_factory.mktemp("orm"), num_labels=1)


def test_classifier_reads_p_good_at_each_steps_separator(prm_dir):
    scorer = ClassifierStepScorer(prm_dir, step_separator="\n\n", batch_size=1)
    scores = scorer.score_steps(PROMPTS, STEPS)
    tokenizer = scorer.tokenizer
    for prompt, steps, row_scores in zip(["What is 2 + 3?", "What is 4 * 5, then minus 1?"], STEPS, scores):
        # TRL PRMTrainer layout: bos + prompt + (stripped step + separator) per step, label on the separator's last token.
        ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
        positions = []
        for step in steps:
            ids += tokenizer.encode(step.strip() + "\n\n", add_special_tokens=False)
            positions.append(len(ids) - 1)
        with torch.no_grad():
            logits = scorer.model(input_ids=torch.tensor([ids])).logits[0]
        expected = 2 * logits[positions].softmax(-1)[:, 1] - 1
        assert row_scores == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.fixture(scope="module")
def headless_dir(tmp_path_factory):
    """A Llama backbone saved without any head."""
    return save_tiny(LlamaModel, tmp_path_factory.mktemp("headless"))


@pytest.mark.parametrize(("scorer", "head"), [(ClassifierStepScorer, "score.bias, score.weight"),
                                               (OutcomeRewardModel, "score.weight")])
def test_a_checkpoint_without_the_head_is_refused(headless_dir, scorer, head):
    """from_pretrained would initialise the head at random and the scores would be noise."""
    with pytest.raises(SettingError, match=rf"model_name_or_path: {scorer.__name__} cannot score with .*headless.*: "
                                           rf"the checkpoint has no weights for {head} "):
        scorer(headless_dir)


def test_classifier_batches_with_right_padding_like_single_rows(prm_dir):
    batched = ClassifierStepScorer(prm_dir, batch_size=8).score_steps(PROMPTS, STEPS)
    single = [ClassifierStepScorer(prm_dir).score_steps([p], [s])[0] for p, s in zip(PROMPTS, STEPS)]
    assert batched == [pytest.approx(row, abs=1e-5) for row in single]
    assert all(-1 <= score <= 1 for row in batched for score in row)


def test_classifier_rejects_a_good_label_the_model_does_not_have(prm_dir):
    with pytest.raises(ValueError, match="good_label"):
        ClassifierStepScorer(prm_dir, good_label=2)


@pytest.mark.parametrize("squash", ["tanh", "sigmoid"])
def test_outcome_model_scores_whole_responses(orm_dir, squash):
    scorer = OutcomeRewardModel(orm_dir, squash=squash, batch_size=1)
    responses = ["".join(steps) for steps in STEPS]
    outcomes = scorer.score_outcomes(PROMPTS, responses)
    for prompt, response, outcome in zip(PROMPTS, responses, outcomes):
        with torch.no_grad():
            reward = scorer.model(input_ids=torch.tensor([scorer.encode(prompt, response)])).logits[0, 0]
        expected = torch.tanh(reward) if squash == "tanh" else 2 * torch.sigmoid(reward) - 1
        assert outcome == pytest.approx(expected.item(), abs=1e-5)
    batched = OutcomeRewardModel(orm_dir, squash=squash, batch_size=4).score_outcomes(PROMPTS, responses)
    assert batched == pytest.approx(outcomes, abs=1e-5)
    assert scorer.score_steps(PROMPTS, STEPS) == [[pytest.approx(o, abs=1e-6)] * len(s) for o, s in zip(outcomes, STEPS)]


def test_outcome_model_uses_the_chat_template(orm_dir):
    scorer = OutcomeRewardModel(orm_dir)
    text = scorer.tokenizer.decode(scorer.encode("What is 2 + 3?", "It is 5."))
    assert text == "<s><|user|>\nWhat is 2 + 3?\n<|assistant|>\nIt is 5.\n"


def test_outcome_model_needs_one_output(prm_dir, orm_dir):
    with pytest.raises(ValueError, match="one output"):
        OutcomeRewardModel(prm_dir)
    with pytest.raises(ValueError, match="squash"):
        OutcomeRewardModel(orm_dir, squash="relu")


def test_combined_mixes_process_and_outcome_scores(orm_dir):
    process, outcome = ArithmeticStepVerifier(), OutcomeRewardModel(orm_dir)
    combined = CombinedRewardModel(process, outcome, process_weight=3.0, outcome_weight=1.0)
    scores = combined.score_steps(PROMPTS, STEPS)
    step_scores = process.score_steps(PROMPTS, STEPS)
    assert step_scores == [[1.0, 1.0], [-1.0, 1.0, 1.0]]
    outcomes = outcome.score_outcomes(PROMPTS, ["".join(s) for s in STEPS])
    for row, row_steps, r in zip(scores, step_scores, outcomes):
        assert row == pytest.approx([0.75 * g + 0.25 * r for g in row_steps], abs=1e-6)


def test_combined_rejects_bad_weights(orm_dir):
    with pytest.raises(ValueError, match="not both 0"):
        CombinedRewardModel(ArithmeticStepVerifier(), OutcomeRewardModel(orm_dir), process_weight=0.0, outcome_weight=0.0)


def test_score_steps_catches_a_scorer_that_returns_bad_scores():
    class Broken(ArithmeticStepVerifier):
        def _score_steps(self, prompts, steps, reference_solutions):
            return [[2.0] * len(row) for row in steps] if prompts[0] == "high" else [[0.0] for _ in steps]

    with pytest.raises(RuntimeError, match="outside"):
        Broken().score_steps(["high"], [["a"]])
    with pytest.raises(RuntimeError, match="2 steps but 1 scores"):
        Broken().score_steps(["q"], [["a", "b"]])
