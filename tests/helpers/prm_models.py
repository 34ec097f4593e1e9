"""Tiny random-weight stand-ins of the published process reward models, saved as Hugging Face
folders (the real architecture, hidden size 32, one layer, the head laid out as the checkpoint's;
the byte tokenizer with the tag tokens and a chat template of the model's family), and the
hand-written readouts of the model cards' recipes that the scorers are checked against.

`prm_folder(tmp_path_factory, kind)` builds each kind once per test session."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2Model,
)

from stepwise_lit.data.tokenizer import build_byte_tokenizer
from stepwise_lit.rewards.heads import Qwen2ProcessRewardModel, Qwen2ValueHeadModel

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1, "initializer_range": 0.3}
"""Big enough initial weights that the random models' step probabilities spread over (0, 1)."""

PROMPTS = ["What is 2 + 3?", [{"role": "user", "content": "What is 4 * 5, then minus 1?"}]]
QUESTIONS = ["What is 2 + 3?", "What is 4 * 5, then minus 1?"]
STEPS = [["2 + 3 = 5\n", "A: 5"], ["Step 1: 4 * 5 = 21\n", "Step 2: 21 - 1 = 20\n", "The answer is: 20"]]
"""Two responses (a string prompt and a chat prompt) the unit tests score."""

BUILT: dict[str, str] = {}


def tokenizer_for(kind: str):
    """The byte tokenizer with the kind's tag tokens and chat template."""
    if kind == "math_shepherd":
        tokenizer = build_byte_tokenizer()
        tokenizer.add_tokens(["ки"])
    elif kind == "rlhflow":
        tokenizer = build_byte_tokenizer(LLAMA3_TEMPLATE)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    else:
        tokenizer = build_byte_tokenizer(CHATML_TEMPLATE)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<extra_0>"]})
    return tokenizer


def build(kind: str, tokenizer) -> torch.nn.Module:
    """A random model of the kind's architecture (seed 0)."""
    torch.manual_seed(0)
    common = {**SHAPE, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if kind == "math_shepherd":
        return MistralForCausalLM(MistralConfig(**common))
    if kind == "rlhflow":
        return LlamaForCausalLM(LlamaConfig(**common))
    config = Qwen2Config(**common, num_labels=2)
    return {"qwen_prm": Qwen2ProcessRewardModel, "skywork": Qwen2ValueHeadModel}.get(kind, Qwen2Model)(config)


def prm_folder(tmp_path_factory, kind: str) -> str:
    """The kind's stand-in saved to a folder (built once per session): "*_headless" is the Qwen2
    backbone alone, a checkpoint without the head."""
    if kind not in BUILT:
        folder = tmp_path_factory.mktemp(kind)
        tokenizer = tokenizer_for(kind.removesuffix("_headless"))
        build(kind, tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        BUILT[kind] = str(folder)
    return BUILT[kind]


def math_shepherd_readout(model, tokenizer, question: str, steps: list[str]) -> list[float]:
    """The math-shepherd model card: ``f"{question} {output}"``, every step ending in " ки",
    P(+) / (P(+) + P(-)) at each ки token; mapped to 2p - 1."""
    candidate_tokens = [tokenizer.encode("+", add_special_tokens=False)[0], tokenizer.encode("-", add_special_tokens=False)[0]]
    step_tag_id = tokenizer.encode("ки")[-1]
    output = "\n".join(f"{step.strip()} ки" for step in steps)
    input_id = torch.tensor([tokenizer.encode(f"{question} {output}")])
    with torch.no_grad():
        scores = model(input_id).logits[:, :, candidate_tokens].softmax(dim=-1)[:, :, 0]
    return (2 * scores[input_id == step_tag_id] - 1).tolist()


def rlhflow_readout(model, tokenizer, question: str, steps: list[str]) -> list[float]:
    """The RLHFlow card: the conversation grown one step at a time, each step a user turn answered
    by "+", p(+) from the softmax over "+"/"-" at position -3 (the token before the "+")."""
    candidate_tokens = [tokenizer.encode("+")[-1], tokenizer.encode("-")[-1]]
    conversation, scores = [], []
    for k, step in enumerate(steps):
        text = question + " " + step.strip() if k == 0 else step.strip()
        conversation += [{"content": text, "role": "user"}, {"content": "+", "role": "assistant"}]
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
        input_ids = torch.tensor([tokenizer(rendered, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids).logits[:, -3, candidate_tokens]
        scores.append(2 * logits.softmax(dim=-1)[0, 0].item() - 1)
    return scores


def head_weights(folder: str) -> dict[str, torch.Tensor]:
    """The saved checkpoint's tensors, by key."""
    return load_file(f"{folder}/model.safetensors")


def qwen_prm_readout(folder: str, tokenizer, question: str, steps: list[str]) -> list[float]:
    """The Qwen2.5-Math-PRM card: system/user/assistant with "<extra_0>" after every step, the
    2-class softmax at each "<extra_0>", index 1. The head is applied by hand from the checkpoint's
    ``score.0`` / ``score.2`` tensors on a plain Qwen2Model's hidden states."""
    messages = [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": "<extra_0>".join(step.strip() for step in steps) + "<extra_0>"},
    ]
    input_ids = torch.tensor([tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False))])
    weights = head_weights(folder)
    with torch.no_grad():
        hidden = Qwen2Model.from_pretrained(folder).eval()(input_ids=input_ids).last_hidden_state[0]
        inner = torch.relu(hidden @ weights["score.0.weight"].T + weights["score.0.bias"])
        logits = inner @ weights["score.2.weight"].T + weights["score.2.bias"]
    step_sep_id = tokenizer.convert_tokens_to_ids("<extra_0>")
    positive = logits.softmax(-1)[input_ids[0] == step_sep_id][:, 1]
    return (2 * positive - 1).tolist()


def skywork_readout(folder: str, tokenizer, question: str, steps: list[str]) -> list[float]:
    """Skywork's ``prepare_input``: bos + problem + "\\n", then each step's ids and the "\\n" id,
    a reward flag on that last id; sigmoid of ``v_head.summary`` (applied by hand from the
    checkpoint's tensors) on a plain Qwen2Model's last hidden state at the flags."""
    prompt_ids = tokenizer.encode(tokenizer.bos_token + question + "\n", add_special_tokens=False)
    step_token_id = tokenizer.encode("\n", add_special_tokens=False)[-1]
    input_ids, reward_flags = list(prompt_ids), [0] * len(prompt_ids)
    for step in steps:
        step_ids = tokenizer.encode(step.strip(), add_special_tokens=False) + [step_token_id]
        input_ids += step_ids
        reward_flags += [0] * (len(step_ids) - 1) + [1]
    weights = head_weights(folder)
    with torch.no_grad():
        hidden = Qwen2Model.from_pretrained(folder).eval()(input_ids=torch.tensor([input_ids])).last_hidden_state[0]
        values = hidden @ weights["v_head.summary.weight"][0] + weights["v_head.summary.bias"][0]
    flags = torch.tensor(reward_flags) == 1
    return (2 * torch.sigmoid(values[flags]) - 1).tolist()


def assert_matches_readout(scorer, readout) -> None:
    """The scorer's scores of `PROMPTS` / `STEPS` equal ``readout(question, steps)`` (the hand
    readout) to 1e-6, one per step, and the random model's scores are not all about 0 (so a wrong
    position or class would show)."""
    scores = scorer.score_steps(PROMPTS, STEPS)
    expected = [readout(question, steps) for question, steps in zip(QUESTIONS, STEPS)]
    assert [len(row) for row in expected] == [len(steps) for steps in STEPS]
    assert scores == [pytest.approx(row, abs=1e-6) for row in expected]
    assert max(abs(score) for row in scores for score in row) > 0.05
