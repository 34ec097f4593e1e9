"""The policy trains in train mode, with dropout off: a model loaded from a folder (which
`from_pretrained` returns in eval mode) recomputes its layers under gradient checkpointing, and
dropout settings the attention layers read at call time are off too."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from entry import run_entry, write_config
from stepwise_lit.cli import main
from stepwise_lit.models.loading import TinyModelConfig, load_causal_lm
from stepwise_lit.data.tokenizer import load_tokenizer

SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 512}


def save_folder(tmp_path, architecture: str, dropout: float = 0.0):
    """A random-weight model of `architecture` saved with the byte-level tokenizer beside it;
    `dropout` goes to every dropout setting of its config (Mixtral: its router jitter)."""
    tokenizer = load_tokenizer(None)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    if architecture == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=512,
                            attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout, **ids)
        model = GPT2LMHeadModel(config)
    elif architecture == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), num_local_experts=4, num_experts_per_tok=2,
                                                 router_jitter_noise=dropout, **SIZES, **ids))
    else:
        config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                     "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[architecture]
        model = model_class(config_class(vocab_size=len(tokenizer), attention_dropout=dropout, **SIZES, **ids))
    folder = tmp_path / architecture
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_gradient_checkpointing_recomputes_the_layers_of_a_loaded_model(tmp_path, capsys):
    """`train.py fit` from a Qwen2 folder: the first decoder layer runs once per training step
    without checkpointing and twice with `model.gradient_checkpointing: true` (its forward again
    in backward); the policy trains in train mode, the frozen reference stays in eval mode."""
    folder = save_folder(tmp_path, "qwen2")
    seen = {}
    for checkpointing in (False, True):
        output = tmp_path / f"calls_{checkpointing}.json"
        counter = {"class_path": "layer_calls.LayerCallCounter", "init_args": {"output": str(output)}}
        config = write_config(tmp_path / f"fit_{checkpointing}", {
            "model": {"tiny_model": None, "model_name_or_path": str(folder), "gradient_checkpointing": checkpointing},
            "trainer": {"callbacks": [counter]},
        }, tmp_path / "cache")
        outcome = run_entry(main, ["fit", "--config", str(config)], capsys)
        assert outcome.code == 0, outcome.err[-3000:]
        seen[checkpointing] = json.loads(output.read_text())
    assert seen[False]["calls"] == [1, 1]
    assert seen[True]["calls"] == [2, 2]
    for record in seen.values():
        assert record["policy_training"] == [True, True]
        assert record["reference_training"] == [False, False]


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2", "mixtral"])
def test_train_mode_forwards_of_a_loaded_model_are_equal(architecture, tmp_path):
    """A folder whose config sets its dropout to 0.1 (Llama and Qwen2: `attention_dropout`, which
    their attention reads at call time; GPT-2: `attn_pdrop`, `resid_pdrop`, `embd_pdrop`; Mixtral:
    `router_jitter_noise`, which scales the router's input in train mode): loaded
    as the policy is, two train-mode forwards of the same batch give the eval-mode logits exactly,
    while the model as `from_pretrained` gives it is random in train mode."""
    folder = save_folder(tmp_path, architecture, dropout=0.1)
    tokenizer = load_tokenizer(None)
    input_ids = torch.randint(3, len(tokenizer), (2, 64), generator=torch.Generator().manual_seed(1))
    raw = AutoModelForCausalLM.from_pretrained(folder).train()
    assert not torch.equal(raw(input_ids).logits, raw(input_ids).logits)  # the noise does act
    model = load_causal_lm(str(folder), tokenizer, TinyModelConfig())
    with torch.no_grad():
        evaluated = model.eval()(input_ids).logits
        model.train()
        first, second = model(input_ids).logits, model(input_ids).logits
    assert torch.equal(first, second)
    assert torch.equal(first, evaluated)
