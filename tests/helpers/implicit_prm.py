"""Tiny implicit-PRM pieces: random tiny Llamas saved as Hugging Face folders, prompt ids, and
log p(tokens | prefix) from one unpadded forward (the slow path the scorers are checked against)."""

from __future__ import annotations

import torch

from stepwise_lit.data.tokenizer import load_tokenizer
from stepwise_lit.models.loading import TinyModelConfig, build_tiny_model

SHAPE = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def save_tiny(folder, seed: int):
    """A random tiny Llama and the byte tokenizer saved as a Hugging Face folder."""
    tokenizer = load_tokenizer(None)
    torch.manual_seed(seed)
    build_tiny_model(tokenizer, SHAPE).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def prompt_ids(tokenizer, prompt) -> list[int]:
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) if isinstance(
        prompt, list) else prompt
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if ids[:1] == [tokenizer.bos_token_id] else [tokenizer.bos_token_id, *ids]


def logp_of(model, prefix: list[int], tokens: list[int]) -> float:
    """log p(tokens | prefix) from one unpadded forward pass."""
    ids = torch.tensor([prefix + tokens])
    logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return float(sum(logps[len(prefix) - 1 + i, token] for i, token in enumerate(tokens)))
