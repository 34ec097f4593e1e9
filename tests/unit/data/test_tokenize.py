"""Step-aware tokenization: step ids, round trips, truncation, the drop/error policy."""

import json
import logging
import math

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

from stepwise_lit.data.chat import PromptFormat
from stepwise_lit.data.formats import DataFormatError, to_canonical
from stepwise_lit.data.readers import read_records
from stepwise_lit.data.synthetic import generate_pairs
from stepwise_lit.data.tokenize import (
    RowDoesNotFit,
    TokenizeSettings,
    canonical_dataset,
    first_divergence,
    step_ids_from_offsets,
    tokenize_dataset,
    tokenize_row,
)
from stepwise_lit.data.tokenizer import load_tokenizer
from tests.helpers.paths import SHARED_DATA

GSM8K = SHARED_DATA / "gsm8k"
needs_gsm8k = pytest.mark.skipif(not GSM8K.is_dir(), reason=f"GSM8K data not found at {GSM8K}")
SIDES = ("chosen", "rejected")


@pytest.fixture(scope="module")
def byte_tokenizer():
    return load_tokenizer()


def small_row(**changes) -> dict:
    row = {
        "prompt": "What is 2 + 3 + 4?",  # 18 bytes
        "chosen_steps": ["Step 1: 2 + 3 = 5\n", "Step 2: 5 + 4 = 9\n"],  # 18 bytes each
        "rejected_steps": ["Step 1: 2 + 3 = 5\n", "Step 2: 5 + 4 = 8\n"],
        "chosen_step_scores": [1.0, 1.0],
        "rejected_step_scores": [1.0, -1.0],
        "chosen_score": None,
        "rejected_score": None,
        "id": "r0",
        "reference_solution": None,
    }
    row.update(changes)
    return row


def assert_steps_match_tokens(token_row: dict, tokenizer) -> None:
    """Each step's tokens decode to the step's text; the response decodes to the joined steps; one EOS at the end."""
    for side in SIDES:
        ids, step_ids, steps = token_row[f"{side}_input_ids"], token_row[f"{side}_step_ids"], token_row[f"{side}_steps"]
        assert len(ids) == len(step_ids)
        assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
        assert step_ids[-1] == len(steps)
        response = [(token, step) for token, step in zip(ids[:-1], step_ids[:-1]) if step > 0]
        assert tokenizer.decode([token for token, _ in response]) == "".join(steps)
        for number, text in enumerate(steps, start=1):
            assert tokenizer.decode([token for token, step in response if step == number]) == text
        first_response = step_ids.index(1)
        assert all(step == 0 for step in step_ids[:first_response])
        assert step_ids[first_response:] == sorted(step_ids[first_response:])


# ---------------------------------------------------------------- the byte tokenizer


def test_byte_tokenizer_row_layout(byte_tokenizer):
    token_row = tokenize_row(small_row(), byte_tokenizer, TokenizeSettings())
    prompt = [1] + [byte + 3 for byte in b"What is 2 + 3 + 4?"]  # <s> then bytes
    chosen_response = [byte + 3 for byte in b"Step 1: 2 + 3 = 5\nStep 2: 5 + 4 = 9\n"]
    assert token_row["chosen_input_ids"] == prompt + chosen_response + [2]
    assert token_row["chosen_step_ids"] == [0] * 19 + [1] * 18 + [2] * 18 + [2]
    assert token_row["rejected_step_scores"] == [1.0, -1.0]
    assert math.isnan(token_row["chosen_score"])
    assert token_row["first_divergence"] == 1
    assert json.loads(token_row["prompt_json"]) == "What is 2 + 3 + 4?"
    assert token_row["truncated"] is False


def test_byte_tokenizer_step_ids_agree_with_step_texts(byte_tokenizer):
    for row in generate_pairs(20, seed=5):
        assert_steps_match_tokens(tokenize_row(row, byte_tokenizer, TokenizeSettings()), byte_tokenizer)


def test_missing_scores_become_nan(byte_tokenizer):
    token_row = tokenize_row(small_row(rejected_step_scores=None, rejected_score=0.5), byte_tokenizer, TokenizeSettings())
    assert len(token_row["rejected_step_scores"]) == 2 and all(map(math.isnan, token_row["rejected_step_scores"]))
    assert token_row["rejected_score"] == 0.5


def test_chat_template_prompt_has_one_bos(byte_tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 3 + 4?"}]
    token_row = tokenize_row(small_row(prompt=messages), byte_tokenizer, TokenizeSettings())
    prompt_length = token_row["chosen_step_ids"].index(1)
    prompt_ids = token_row["chosen_input_ids"][:prompt_length]
    assert byte_tokenizer.decode(prompt_ids) == "<s><|user|>\nWhat is 2 + 3 + 4?\n<|assistant|>\n"
    assert prompt_ids.count(1) == 1 and prompt_ids[0] == 1
    assert json.loads(token_row["prompt_json"]) == messages


def test_step_wise_prompt_template_wraps_string_prompts(byte_tokenizer):
    settings = TokenizeSettings(prompt_format=PromptFormat(step_wise_prompt_template="Q: {prompt}\nAnswer in steps.\n"))
    token_row = tokenize_row(small_row(), byte_tokenizer, settings)
    prompt_length = token_row["chosen_step_ids"].index(1)
    decoded = byte_tokenizer.decode(token_row["chosen_input_ids"][:prompt_length], skip_special_tokens=True)
    assert decoded == "Q: What is 2 + 3 + 4?\nAnswer in steps.\n"
    assert json.loads(token_row["prompt_json"]) == "What is 2 + 3 + 4?"


# ---------------------------------------------------------------- a BPE tokenizer trained here


@pytest.fixture(scope="module")
def gsm8k_bpe_tokenizer():
    if not GSM8K.is_dir():
        pytest.skip(f"GSM8K data not found at {GSM8K}")
    texts = [record["question"] + "\n" + record["answer"] for record in read_records(GSM8K / "test.jsonl")[:400]]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@needs_gsm8k
def test_bpe_step_ids_agree_with_step_texts_on_gsm8k(gsm8k_bpe_tokenizer):
    with (GSM8K / "example_model_solutions.jsonl").open() as handle:
        records = [json.loads(next(handle)) for _ in range(40)]
    rows = to_canonical(records, "gsm8k", "example_model_solutions.jsonl", require_scores=False)
    for row in rows:
        token_row = tokenize_row(row, gsm8k_bpe_tokenizer, TokenizeSettings())
        assert_steps_match_tokens(token_row, gsm8k_bpe_tokenizer)
        # BPE merges: fewer response tokens (EOS aside) than response bytes
        response_tokens = sum(step > 0 for step in token_row["chosen_step_ids"]) - 1
        assert response_tokens < len("".join(row["chosen_steps"]).encode())


def test_token_crossing_a_step_boundary_belongs_to_the_step_of_its_first_character():
    vocab = {"<pad>": 0, "</s>": 1, "x": 2, "a": 3, "b": 4, "y": 5, "ab": 6}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    row = small_row(prompt="x", chosen_steps=["xa", "by"], rejected_steps=["y"], chosen_step_scores=None,
                    rejected_step_scores=None)
    token_row = tokenize_row(row, tokenizer, TokenizeSettings())
    # prompt x | response tokens x, ab, y (+ </s>); "ab" starts in step 1
    assert token_row["chosen_input_ids"] == [2, 2, 6, 5, 1]
    assert token_row["chosen_step_ids"] == [0, 1, 1, 2, 2]


def test_step_ids_from_offsets_clamps_and_never_decreases():
    # steps of 3 and 2 characters; a token starting at the end (an empty span) goes to the last step
    assert step_ids_from_offsets([0, 2, 3, 4, 5], [3, 2]) == [1, 1, 2, 2, 2]
    assert step_ids_from_offsets([0, 3, 1], [3, 2]) == [1, 2, 2]


# ---------------------------------------------------------------- a slow tokenizer (per-step fallback)


class SlowByteTokenizer(PreTrainedTokenizer):
    """A slow (pure Python) byte tokenizer: ids 0-2 special, byte b -> b + 3."""

    SPECIAL = ("<pad>", "<s>", "</s>")

    @property
    def vocab_size(self):
        return 259

    def get_vocab(self):
        return {token: self._convert_token_to_id(token) for token in self.SPECIAL} | {
            f"<0x{byte:02X}>": byte + 3 for byte in range(256)
        }

    def _tokenize(self, text):
        return [f"<0x{byte:02X}>" for byte in text.encode()]

    def _convert_token_to_id(self, token):
        return self.SPECIAL.index(token) if token in self.SPECIAL else int(token[3:5], 16) + 3

    def _convert_id_to_token(self, index):
        return self.SPECIAL[index] if index < 3 else f"<0x{index - 3:02X}>"

    def convert_tokens_to_string(self, tokens):
        return bytes(int(token[3:5], 16) for token in tokens if token not in self.SPECIAL).decode()


def test_slow_tokenizer_fallback_tokenizes_step_by_step(byte_tokenizer):
    slow = SlowByteTokenizer(pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    assert not slow.is_fast
    rows = generate_pairs(10, seed=11)
    for row in rows:
        slow_row = tokenize_row(row, slow, TokenizeSettings())
        assert_steps_match_tokens(slow_row, slow)
        fast_row = tokenize_row(row, byte_tokenizer, TokenizeSettings())
        assert slow_row["chosen_input_ids"] == fast_row["chosen_input_ids"]
        assert slow_row["rejected_step_ids"] == fast_row["rejected_step_ids"]


# ---------------------------------------------------------------- truncation


def test_full_response_fits_exactly(byte_tokenizer):
    # 19 prompt tokens + 36 response tokens + EOS = 56
    token_row = tokenize_row(small_row(), byte_tokenizer, TokenizeSettings(max_length=56))
    assert len(token_row["chosen_input_ids"]) == 56 and token_row["truncated"] is False


def test_truncation_keeps_whole_steps_and_drops_eos(byte_tokenizer):
    row = small_row(rejected_steps=["Step 1: 2 + 3 = 6\n", "Step 2: 6 + 4 = 10\n"], rejected_step_scores=[-1.0, -1.0])
    token_row = tokenize_row(row, byte_tokenizer, TokenizeSettings(max_length=55))  # EOS of step 2 does not fit
    for side in SIDES:
        assert token_row[f"{side}_step_ids"] == [0] * 19 + [1] * 18
        assert len(token_row[f"{side}_steps"]) == 1 and len(token_row[f"{side}_step_scores"]) == 1
        assert 2 not in token_row[f"{side}_input_ids"]
    assert token_row["rejected_step_scores"] == [-1.0]
    assert byte_tokenizer.decode(token_row["chosen_input_ids"][19:]) == "Step 1: 2 + 3 = 5\n"
    assert token_row["truncated"] is True


def test_max_num_steps_keeps_the_first_steps(byte_tokenizer):
    row = small_row(rejected_steps=["Step 1: 2 + 3 = 6\n", "Step 2: 6 + 4 = 10\n"])
    token_row = tokenize_row(row, byte_tokenizer, TokenizeSettings(max_num_steps=1))
    assert token_row["chosen_step_ids"] == [0] * 19 + [1] * 18
    assert token_row["chosen_steps"] == ["Step 1: 2 + 3 = 5\n"]


def test_prompt_is_cut_from_the_left(byte_tokenizer):
    token_row = tokenize_row(small_row(), byte_tokenizer, TokenizeSettings(max_prompt_length=10))
    assert byte_tokenizer.decode(token_row["chosen_input_ids"][:10]) == "What is 2 + 3 + 4?"[-10:]
    assert token_row["chosen_step_ids"][:11] == [0] * 10 + [1]
    assert token_row["prompt_cut"] is True and token_row["truncated"] is False  # no response step was lost


def test_row_whose_first_step_does_not_fit(byte_tokenizer):
    with pytest.raises(RowDoesNotFit, match="not even the first chosen step fits"):
        tokenize_row(small_row(), byte_tokenizer, TokenizeSettings(max_length=36))


def test_row_identical_after_truncation(byte_tokenizer):
    with pytest.raises(RowDoesNotFit, match="chosen and rejected are identical after truncation"):
        tokenize_row(small_row(), byte_tokenizer, TokenizeSettings(max_length=55))


def test_dataset_drop_policy_counts_dropped_rows(byte_tokenizer, caplog):
    long_row = small_row(chosen_steps=["Step 1: " + "9" * 60 + "\n"], chosen_step_scores=[1.0])
    dataset = canonical_dataset([small_row(), long_row, small_row(id="r2", prompt=[{"role": "user", "content": "q"}])])
    with caplog.at_level(logging.INFO, logger="stepwise_lit.data.tokenize"):
        # fits: 19 + 36 + 1 = 56 and (chat prompt) 25 + 36 + 1 = 62; the long row needs 19 + 69 for its first step
        tokenized = tokenize_dataset(dataset, byte_tokenizer, TokenizeSettings(max_length=70), "train.jsonl")
    assert list(tokenized["id"]) == ["r0", "r2"]
    assert "train.jsonl: dropped 1 of 3 rows (not even the first chosen step fits max_length after the prompt)" in caplog.text
    assert "drop_reason" not in tokenized.column_names and "truncated" not in tokenized.column_names


def test_dataset_error_policy_names_the_row(byte_tokenizer):
    dataset = canonical_dataset([small_row(), small_row(id="r1")])
    with pytest.raises(DataFormatError) as error:
        tokenize_dataset(dataset, byte_tokenizer, TokenizeSettings(max_length=55), "train.jsonl", truncation="error")
    assert str(error.value) == (
        "train.jsonl row 1: chosen and rejected are identical after truncation; "
        "raise max_length or set data.truncation to 'drop'"
    )


def test_first_divergence():
    assert first_divergence(["a", "b", "c"], ["a", "x", "c"]) == 1
    assert first_divergence(["a"], ["b"]) == 0
    assert first_divergence(["a", "b"], ["a", "b", "c"]) == 2
    assert first_divergence(["a", "b"], ["a", "b"]) is None


def test_a_cut_prompt_is_no_truncation_error(tmp_path, byte_tokenizer, caplog):
    """`max_prompt_length` asks for the prompt to be cut, so `truncation: error` does not refuse the
    row for it; the cut is counted in the log."""
    dataset = canonical_dataset([small_row()])
    with caplog.at_level("INFO", logger="stepwise_lit.data.tokenize"):
        rows = tokenize_dataset(dataset, byte_tokenizer, TokenizeSettings(max_prompt_length=10), "rows.jsonl", truncation="error")
    assert len(rows) == 1
    assert "cut 1 of 1 prompts from the left to max_prompt_length" in caplog.text
