"""Small random-weight stand-ins of real architectures, built locally from their transformers configs
(hidden 32, one layer, two heads) with the byte-level tokenizer's vocabulary and special ids, and
saved with `save_pretrained` beside that tokenizer: a model folder as a user has one on disk."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from stepwise_lit.data.tokenizer import load_tokenizer

COMMON = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "max_position_embeddings": 512}
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**COMMON, "num_key_value_heads": 1, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**COMMON, "num_key_value_heads": 1, "tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**COMMON, "num_key_value_heads": 1, "head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**COMMON, "num_key_value_heads": 1}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",  # softcapping: attention logits at 50, final logits at 30
               {**COMMON, "num_key_value_heads": 1, "head_dim": 16, "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**COMMON, "num_key_value_heads": 1, "head_dim": 16}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",  # Conv1D layers, tied embeddings
             {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 512, "tie_word_embeddings": True}),
    "phi": ("PhiConfig", "PhiForCausalLM", COMMON),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**COMMON, "num_key_value_heads": 2}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**COMMON, "rotary_pct": 0.25}),
}
"""``model_type`` -> (config class, causal-LM class, config settings) in transformers."""


def build_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random-weight causal LM of `model_type` (a key of `ARCHITECTURES`), seeded, with the
    byte-level tokenizer's vocabulary size and pad/bos/eos ids; `overrides` replace config settings."""
    config_name, model_name, settings = ARCHITECTURES[model_type]
    tokenizer = load_tokenizer(None)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), **{**settings, **overrides}, **ids)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config)


def model_folder(folder: Path, model_type: str, seed: int = 0) -> Path:
    """`build_model` saved with `save_pretrained` into `folder`, the byte-level tokenizer beside it."""
    build_model(model_type, seed).save_pretrained(folder)
    load_tokenizer(None).save_pretrained(folder)
    return folder
