"""GenerativeStepScorer: exact P(Yes) arithmetic, batching, GenRM-CoT and start-up errors."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stepwise_lit.data.tokenizer import load_tokenizer
from stepwise_lit.rewards.genrm import GenerativeStepScorer

ANSWER_TOKENS = ["Yes", " Yes", "No", " No"]
HIDDEN = 8
# Next-token logits of the answer tokens after a sequence ending in each character.
TABLE = {
    "a": {"Yes": 2.0, " Yes": 0.5, "No": -1.0, " No": 0.25},
    "b": {"Yes": -3.0, " Yes": -2.0, "No": 1.5, " No": 1.0},
    "c": {"Yes": 0.0, " Yes": 0.0, "No": 0.0, " No": 0.0},
}
OTHER_LOGIT = 7.0  # every other vocabulary entry: must cancel out of P(Yes) / (P(Yes) + P(No))


def expected_score(character: str) -> float:
    """2 p - 1 with p = (e^Yes + e^ Yes) / (e^Yes + e^ Yes + e^No + e^ No), by hand."""
    row = TABLE[character]
    yes = math.exp(row["Yes"]) + math.exp(row[" Yes"])
    no = math.exp(row["No"]) + math.exp(row[" No"])
    return 2 * yes / (yes + no) - 1


def build_table_model(tokenizer) -> LlamaForCausalLM:
    """A Llama whose next-token logits depend only on the last input token, through TABLE.

    Attention and MLP outputs are zeroed, so the final hidden state is RMSNorm of the
    last token's embedding; character i of TABLE embeds to a multiple of unit vector
    i, which the final norm (weight 1/sqrt(d)) maps to exactly that unit vector, and
    column i of the LM head holds TABLE's row.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        rms_norm_eps=1e-12,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(HIDDEN**-0.5)
        model.lm_head.weight.fill_(OTHER_LOGIT)
        for i, (character, row) in enumerate(TABLE.items()):
            (token_id,) = tokenizer.encode(character, add_special_tokens=False)
            model.model.embed_tokens.weight[token_id] = 0.0
            model.model.embed_tokens.weight[token_id, i] = 3.0
            for token, logit in row.items():
                model.lm_head.weight[tokenizer.convert_tokens_to_ids(token), i] = logit
    return model


@pytest.fixture(scope="module")
def table_model_dir(tmp_path_factory):
    tokenizer = load_tokenizer(None)
    tokenizer.add_tokens(ANSWER_TOKENS)
    path = tmp_path_factory.mktemp("table_genrm")
    build_table_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_scorer():
    return GenerativeStepScorer("embedded", batch_size=3)


def test_p_yes_matches_the_hand_built_logit_table(table_model_dir):
    scorer = GenerativeStepScorer(table_model_dir, template="Check: {problem} {previous_steps} {step}", use_chat_template=False, batch_size=2)
    prompts = ["What?", "A much longer problem statement, so the rows need padding?"]
    steps = [["first a", "\nthen b", "\nand c"], ["only b"]]
    scores = scorer.score_steps(prompts, steps)
    expected = [[expected_score("a"), expected_score("b"), expected_score("c")], [expected_score("b")]]
    assert [len(row) for row in scores] == [3, 1]
    for got_row, want_row in zip(scores, expected):
        assert got_row == pytest.approx(want_row, abs=1e-5)
    assert expected_score("c") == 0.0  # all four logits equal: P(Yes) = 1/2


def test_cot_averages_verdicts_read_after_the_verdict_prompt(table_model_dir):
    # Every verdict sequence ends with the verdict prompt's last character, so each of
    # the K verdicts (and their mean) is TABLE["a"], whatever the sampled rationales are.
    scorer = GenerativeStepScorer(
        table_model_dir, template="{step}", use_chat_template=False, num_rationales=3,
        verdict_prompt="\nverdict a", max_new_tokens=5, batch_size=4,
    )
    torch.manual_seed(0)
    scores = scorer.score_steps(["p", "q"], [["x", "yy"], ["z"]])
    assert scores == [[pytest.approx(expected_score("a"), abs=1e-5)] * 2, [pytest.approx(expected_score("a"), abs=1e-5)]]


def test_sample_rationales_gives_k_continuations_per_query(table_model_dir):
    scorer = GenerativeStepScorer(table_model_dir, template="{step}", use_chat_template=False, num_rationales=2, max_new_tokens=4, batch_size=2)
    rationales = scorer.sample_rationales([[1, 70, 71], [1, 72], [1, 73, 74, 75]])
    assert [len(r) for r in rationales] == [2, 2, 2]
    assert all(len(tokens) <= 4 for r in rationales for tokens in r)


def test_batched_left_padded_scores_equal_one_query_at_a_time(tiny_scorer):
    prompts = ["What is 2 + 3?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 4 * 5?"}]]
    steps = [["2 + 3 = 5\n", "A: 5"], ["4 * 5 = 20\n", "so 20\n", "A: 20"]]
    batched = tiny_scorer.score_steps(prompts, steps)
    queries = [tiny_scorer.query_ids(p, s, k) for p, s in zip(prompts, steps) for k in range(len(s))]
    single = [2 * tiny_scorer.yes_probabilities([query])[0] - 1 for query in queries]
    assert [score for row in batched for score in row] == pytest.approx(single, abs=1e-5)
    assert all(-1 <= score <= 1 for row in batched for score in row)


def test_query_uses_the_chat_template_and_shows_problem_previous_steps_and_step(tiny_scorer):
    text = tiny_scorer.tokenizer.decode(tiny_scorer.query_ids("What is 2 + 3?", ["First 2.\n", "Then 5."], 1))
    assert text.startswith("<s><|user|>\n") and text.endswith("<|assistant|>\n")
    assert "What is 2 + 3?" in text and "Previous steps:\nFirst 2." in text and "Next step:\nThen 5." in text
    first = tiny_scorer.tokenizer.decode(tiny_scorer.query_ids("Q", ["Only step"], 0))
    assert "Previous steps:\n(none)" in first


def test_scorer_stays_in_eval_mode_and_records_no_gradients(tiny_scorer):
    tiny_scorer.train()
    assert not tiny_scorer.training and not tiny_scorer.model.training
    assert not any(p.requires_grad for p in tiny_scorer.parameters())


@pytest.mark.parametrize(
    ("template", "message"),
    [("Is {problem} right?", "no {step} field"), ("{step} {answer}", "unknown fields"), ("{step} {", "does not parse")],
)
def test_bad_template_is_a_start_up_error(template, message):
    with pytest.raises(ValueError, match=message):
        GenerativeStepScorer("embedded", template=template)


def test_missing_model_path_is_a_start_up_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        GenerativeStepScorer(str(tmp_path / "nowhere"))


def test_tokenizer_without_single_yes_no_tokens_is_a_start_up_error(tmp_path):
    tokenizer = load_tokenizer(None)  # bytes only: "Yes" is three tokens
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no single token for 'Yes'"):
        GenerativeStepScorer(str(tmp_path))


def test_score_steps_checks_its_arguments(tiny_scorer):
    with pytest.raises(ValueError, match="2 prompts but 1 step lists"):
        tiny_scorer.score_steps(["a", "b"], [["x"]])
    with pytest.raises(ValueError, match="response 0 has no steps"):
        tiny_scorer.score_steps(["a"], [[]])
    assert tiny_scorer.score_steps([], []) == []


def test_a_scoring_config_without_model_name_or_path_fails(capsys):
    """Leaving the verifier model out is an error naming the setting, not a run with the random
    demo verifier (that one is asked for by name: `model_name_or_path: embedded`)."""
    from stepwise_lit.score import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--scorer", "stepwise_lit.rewards.GenerativeStepScorer", "--input", "a", "--output", "b"])
    assert "required: model_name_or_path" in capsys.readouterr().err
