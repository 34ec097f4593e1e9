"""Decoding: the KV cache, left padding, seeded sampling and the budgets, on tiny local Llamas."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stepwise_lit.errors import SettingError
from stepwise_lit.generate import GenerationSettings, TransformersGenerator, cut_completion
from stepwise_lit.tokenizer import BYTE_TOKEN_OFFSET, load_tokenizer

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
    generator = TransformersGenerator(model, tokenizer, "Q: {prompt}\nA:", max_prompt_length=10, progress=False)
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
