"""Decoding: the KV cache, left padding, seeded sampling, the budgets (the incremental text check
against decoding everything after every token) and the end-of-sequence ids, on tiny local Llamas."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stepwise_lit.data.chat import PromptFormat
from stepwise_lit.data.tokenizer import BYTE_TOKEN_OFFSET, load_tokenizer
from stepwise_lit.errors import SettingError
from stepwise_lit.models.generate import (
    GenerationSettings,
    TextBudget,
    TextStops,
    TransformersGenerator,
    completion_end,
    cut_completion,
    decoded_increment,
    eos_token_ids,
    generator_class,
    new_token_count,
)

PROMPT = "Ana has 12 coins. She finds 5 more. How many coins does Ana have?"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def byte_id(character: str) -> int:
    return ord(character) + BYTE_TOKEN_OFFSET


@pytest.fixture(scope="module")
def bigram_llama(tokenizer) -> LlamaForCausalLM:
    """A Llama whose next token is a fixed function of the current one, with certainty.

    Attention and MLP outputs are zeroed, so the last hidden state is the current
    token's embedding. Chain tokens get orthogonal one-hot embeddings and the LM head
    maps each to its successor with logit 10·sqrt(32) (all others 0):
    ``S -> t -> e -> p -> \\n -> S`` loops ("tep\\nStep\\n..."), ``x -> y -> EOS``.
    """
    model = tiny_llama(tokenizer)
    successors = {"S": "t", "t": "e", "e": "p", "p": "\n", "\n": "S", "x": "y"}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        chain = [*successors, "y"]
        for position, character in enumerate(chain):
            model.model.embed_tokens.weight[byte_id(character)] = torch.nn.functional.one_hot(
                torch.tensor(position), 32
            ).float()
        for current, successor in [*successors.items(), ("y", None)]:
            target = tokenizer.eos_token_id if successor is None else byte_id(successor)
            model.lm_head.weight[target, chain.index(current)] = 10.0
    return model


def greedy_without_cache(model, tokenizer, prompt: str | list[int], max_new_tokens: int) -> str:
    """Argmax decoding that runs the model on the whole sequence for every token.

    A text prompt is tokenized with BOS; a list of ids is used as it is.
    """
    ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt
    generated = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + generated]), use_cache=False).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
    return tokenizer.decode(generated, skip_special_tokens=True)


def test_greedy_with_kv_cache_equals_decoding_without_cache(tokenizer):
    model = tiny_llama(tokenizer).train()
    generator = TransformersGenerator(model, tokenizer, progress=False)
    prompts = [PROMPT, "A bus leaves with 30 people."]
    completions = generator.generate(prompts, GenerationSettings(max_new_tokens=24, batch_size=1))
    assert completions == [[greedy_without_cache(model, tokenizer, prompt, 24)] for prompt in prompts]
    assert model.training, "the model's train mode is given back"


def test_left_padding_does_not_change_a_greedy_continuation(tokenizer):
    model = tiny_llama(tokenizer, seed=1)
    generator = TransformersGenerator(model, tokenizer, progress=False)
    settings = GenerationSettings(max_new_tokens=16, batch_size=2)
    padding_side = tokenizer.padding_side
    alone = generator.generate(["Ben has 3 pens."], settings)
    batched = generator.generate(["Ben has 3 pens.", PROMPT * 3], settings)
    assert batched[0] == alone[0]
    assert alone[0][0] == greedy_without_cache(model, tokenizer, "Ben has 3 pens.", 16)
    assert tokenizer.padding_side == padding_side


def test_prompts_are_templated_and_cut_as_in_training(tokenizer, caplog):
    """Template "Q: {prompt}\nA:" around the prompt, then its last 10 tokens (no BOS left)."""
    model = tiny_llama(tokenizer, seed=2)
    generator = TransformersGenerator(
        model, tokenizer, PromptFormat("Q: {prompt}\nA:"), max_prompt_length=10, progress=False
    )
    with caplog.at_level("INFO", logger="stepwise_lit"):
        completions = generator.generate([PROMPT, "1+1"], GenerationSettings(max_new_tokens=12, batch_size=2))
    kept = tokenizer(f"Q: {PROMPT}\nA:", add_special_tokens=False)["input_ids"][-10:]
    short = tokenizer("Q: 1+1\nA:")["input_ids"]
    assert len(short) == 10, "the short prompt fits exactly, BOS included"
    assert completions == [
        [greedy_without_cache(model, tokenizer, kept, 12)],
        [greedy_without_cache(model, tokenizer, short, 12)],
    ]
    assert "1 of 2 prompts cut from the left to 10 tokens" in caplog.text


def test_sampling_is_reproducible_per_seed(tokenizer):
    generator = TransformersGenerator(tiny_llama(tokenizer), tokenizer, progress=False)
    settings = GenerationSettings(max_new_tokens=12, do_sample=True, num_samples=3, seed=7)
    first = generator.generate([PROMPT, "Ben has 3 pens."], settings)
    again = generator.generate([PROMPT, "Ben has 3 pens."], settings)
    other_seed = generator.generate([PROMPT, "Ben has 3 pens."], GenerationSettings(**{**vars(settings), "seed": 8}))
    assert first == again
    assert [len(samples) for samples in first] == [3, 3]
    assert len(set(first[0])) == 3, "three different samples at temperature 1 over 259 tokens"
    assert first != other_seed


def test_samples_come_back_grouped_by_prompt_in_order(tokenizer, bigram_llama):
    generator = TransformersGenerator(bigram_llama, tokenizer, progress=False)
    settings = GenerationSettings(max_new_tokens=3, do_sample=True, num_samples=3, batch_size=2)
    assert generator.generate(["S", "x", "\n"], settings) == [["tep"] * 3, ["y"] * 3, ["Ste"] * 3]


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ({"max_new_tokens": 7}, ["tep\nSte", "y"]),
        ({"max_new_tokens": 50, "max_steps": 2}, ["tep\nStep\n", "y"]),
        ({"max_new_tokens": 50, "max_steps": 1, "step_end": "p"}, ["tep", "y"]),
        ({"max_new_tokens": 50, "stop_strings": ["\nSt", "ep\n"]}, ["tep\n", "y"]),
    ],
)
def test_budgets_stop_where_said(tokenizer, bigram_llama, budget, expected):
    """From "S" the bigram model writes "tep\\nStep\\n..." forever; from "x" it writes "y" then EOS."""
    generator = TransformersGenerator(bigram_llama, tokenizer, progress=False)
    assert generator.generate(["S", "x"], GenerationSettings(batch_size=2, **budget)) == [[text] for text in expected]


def test_cut_completion_keeps_the_earliest_stop():
    settings = GenerationSettings(stop_strings=["Step 3"], max_steps=2)
    assert cut_completion("Step 1: a\nStep 2: b\nStep 3: c\n", settings) == "Step 1: a\nStep 2: b\n"
    assert cut_completion("Step 1: a\nStep 3", settings) == "Step 1: a\nStep 3"
    assert cut_completion("Step 1: a", settings) == "Step 1: a"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_samples": 4}, "generation.num_samples: must be at least 1, and 1 with greedy"),
        ({"do_sample": True, "temperature": 0.0}, "generation.temperature: must be above 0"),
        ({"max_new_tokens": 0}, "generation.max_new_tokens: must be at least 1"),
        ({"stop_strings": [""]}, "generation.stop_strings: must not contain an empty string"),
    ],
)
def test_bad_settings_name_the_setting(settings, message):
    with pytest.raises(SettingError, match=message):
        GenerationSettings(**settings)


# ------------------------------------------------------------------ end-of-sequence ids


def test_generation_stops_on_every_eos_id_of_the_models_generation_config(tokenizer, bigram_llama):
    """The bigram model writes "tep\nStep..." from "S"; with the byte "p" listed as a second EOS
    in its generation_config (as Llama-3.x lists <|eot_id|> beside <|end_of_text|>) it stops after
    "tep" (the EOS token is kept: "p" is no special token), not at the token budget."""
    model = copy.deepcopy(bigram_llama)
    settings = GenerationSettings(max_new_tokens=10, batch_size=2)
    assert TransformersGenerator(model, tokenizer, progress=False).generate(["S", "x"], settings) == [
        ["tep\nStep\nS"], ["y"]]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, byte_id("p")]
    assert TransformersGenerator(model, tokenizer, progress=False).generate(["S", "x"], settings) == [["tep"], ["y"]]


@pytest.mark.parametrize(("listed", "expected"), [(None, [2]), (2, [2]), (7, [7, 2]), ([9, 2, 7], [9, 2, 7])])
def test_eos_ids_are_the_models_list_and_the_tokenizers_id_once_each(tokenizer, bigram_llama, listed, expected):
    model = copy.deepcopy(bigram_llama)
    model.generation_config.eos_token_id = listed
    assert tokenizer.eos_token_id == 2
    assert eos_token_ids(model, tokenizer) == expected


# ------------------------------------------------------ the incremental text budget


BUDGETS = [
    GenerationSettings(stop_strings=["ab", "Step 3"], max_steps=None),
    GenerationSettings(max_steps=3),
    GenerationSettings(max_steps=2, step_end="\n\n"),  # overlapping ends: "\n\n\n" holds two
    GenerationSettings(stop_strings=["bab", "é!"], max_steps=4, step_end="ba"),
    GenerationSettings(stop_strings=["b a", "1: a"]),  # spaces: the word tokenizer's leading "▁"
]


@pytest.mark.parametrize("settings", BUDGETS, ids=["stops", "steps", "double-newline", "both", "spaces"])
def test_text_stops_fed_piece_by_piece_agree_with_completion_end_on_every_prefix(settings):
    """200 random texts over a small alphabet (so stops and step ends occur, straddle pieces and
    overlap), cut into random pieces (empty ones included): after every piece, `TextStops` says a
    budget is reached exactly when `completion_end` of the whole text so far finds a stop."""
    rng = random.Random(0)
    reached_somewhere = 0
    for _ in range(200):
        text = "".join(rng.choice(["a", "b", "\n", "é", "!", "Step 3", " "]) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 12)))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        stops, so_far = TextStops(settings), ""
        for piece in pieces:
            so_far += piece
            assert stops.feed(piece) == (completion_end(so_far, settings) is not None), (so_far, pieces)
        reached_somewhere += stops.reached
    assert 10 < reached_somewhere < 190, "both outcomes occur"


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-like word tokenizer ("▁" marks a space; decoding drops the text's leading
    space), for the decoding window's context."""
    words = ["<pad>", "</s>", "\u2581Step", "\u25811:", "\u25812:", "\n", "\u2581a", "b", "\u2581", "\u2581The",
             "\u2581answer", "\u2581is", "\u25817."]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


def full_decode_done(tokenizer, generated: list[list[int]], settings: GenerationSettings) -> list[bool]:
    """The simple check: decode every row's whole completion and look for a stop."""
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [completion_end(text, settings) is not None for text in texts]


@pytest.mark.parametrize("kind", ["bytes", "metaspace"])
def test_text_budget_decoding_only_new_tokens_stops_where_the_full_decode_check_does(tokenizer, kind):
    """Random token streams (byte-level: UTF-8 characters split over tokens and stray bytes that
    decode to U+FFFD; word-level with SentencePiece spaces; both with special tokens), 8 rows
    of up to 60 tokens after a 3-token prompt: at every step `TextBudget`'s done rows equal the
    full-decode check's, and the increments join to the full decoding of each row."""
    rng = random.Random(1)
    if kind == "bytes":
        vocab = tokenizer
        pool = [byte_id(c) for c in "ab\n!S3 "] + [BYTE_TOKEN_OFFSET + b for b in "é".encode() + bytes([0x80])]
        pool += [tokenizer.eos_token_id, tokenizer.pad_token_id]
    else:
        vocab = metaspace_tokenizer()
        pool = list(range(len(vocab)))
    stops_seen = 0
    for settings in BUDGETS:
        for _ in range(5):
            rows = [[rng.choice(pool) for _ in range(60)] for _ in range(8)]
            budget = TextBudget(vocab, prompt_length=3, settings=settings)
            prompt = torch.full((8, 3), 7)
            stopped = [False] * 8  # a row once done stays done, as in generate's unfinished_sequences
            for length in range(1, 61):
                input_ids = torch.cat([prompt, torch.tensor([row[:length] for row in rows])], dim=1)
                expected = full_decode_done(vocab, [row[:length] for row in rows], settings)
                stopped = [before or now for before, now in zip(stopped, expected)]
                assert budget(input_ids, None).tolist() == stopped, (settings, length)
            stops_seen += sum(stopped)
    assert 20 < stops_seen < 160, "rows stop and rows run on"
    ids = rows[0]
    pieces, prefix_offset, read_offset = [], 0, 0
    for length in range(1, len(ids) + 1):
        piece, prefix_offset, read_offset = decoded_increment(vocab, ids[:length], prefix_offset, read_offset)
        pieces.append(piece)
    full = vocab.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == full[: len("".join(pieces))] and len(full) - len("".join(pieces)) <= 1


class CountingTokenizer:
    """A tokenizer proxy that counts the token ids it is asked to decode."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, rows, **kwargs) -> list[str]:
        self.decoded += sum(len(row) for row in rows)
        return self.tokenizer.batch_decode(rows, **kwargs)


def test_text_budget_decodes_a_bounded_window_per_token(tokenizer):
    """400 generated tokens, no stop: the budget decodes at most 4 token ids per row and step
    (the window of the last increments), 3,200 for 2 rows, where decoding each row's whole
    completion after every token decodes 2 x (1 + ... + 400) = 160,400."""
    counting = CountingTokenizer(tokenizer)
    budget = TextBudget(counting, prompt_length=2, settings=GenerationSettings(max_steps=3))
    generated = torch.tensor([[byte_id("a")] * 400, [byte_id("b")] * 400])
    for length in range(1, 401):
        assert not budget(torch.cat([torch.ones(2, 2, dtype=torch.long), generated[:, :length]], dim=1), None).any()
    assert counting.decoded <= 4 * 2 * 400


def test_new_token_count_stops_at_the_first_eos_or_the_trailing_padding():
    """eos 2, pad 0: [5 6 2 0 0] -> 3 (EOS included); [5 0 6 0 0] -> 3 (a pad inside a row is a
    token, the trailing run is padding); [5 6 7 8 9] -> 5; [0 0 0 0 0] -> 0. With pad == eos
    (2), [5 6 2 2 2] -> 3. Without a pad id every row without EOS counts whole."""
    generated = torch.tensor([[5, 6, 2, 0, 0], [5, 0, 6, 0, 0], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0]])
    assert new_token_count(generated, [2], 0) == 3 + 3 + 5 + 0
    assert new_token_count(torch.tensor([[5, 6, 2, 2, 2]]), [2], 2) == 3
    assert new_token_count(generated, [2], None) == 3 + 5 + 5 + 5


def test_the_transformers_backend_counts_the_tokens_it_decodes(tokenizer, bigram_llama):
    """The bigram model from "x" decodes "y" then EOS: 2 new tokens per prompt."""
    generator = TransformersGenerator(bigram_llama, tokenizer, PromptFormat(), progress=False)
    generator.generate(["x", "x", "x"], GenerationSettings(max_new_tokens=10))
    assert generator.tokens_generated == 6


def test_generator_setting_names_a_backend_or_an_import_path():
    assert generator_class("transformers", "online.generator") is TransformersGenerator
    assert generator_class("stepwise_lit.models.generate.TransformersGenerator", "x") is TransformersGenerator
    with pytest.raises(SettingError, match="evaluation.generator: cannot import module 'nowhere'"):
        generator_class("nowhere.Backend", "evaluation.generator")
