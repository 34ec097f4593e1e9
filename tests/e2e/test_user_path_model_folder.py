"""`train.py fit` from a Hugging Face model folder, as a user with a checkpoint on disk runs it:
`--model.model_name_or_path FOLDER` and nothing else about the model (the tokenizer is read from
the same folder). Small random-weight models of three architectures, saved with `save_pretrained`
beside the byte-level tokenizer; two optimizer steps each."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from stepwise_lit.cli import main
from stepwise_lit.data.tokenizer import load_tokenizer
from tests.helpers.entry import run_entry, write_config

SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 2, "max_position_embeddings": 512}


def build(architecture: str, vocab_size: int, ids: dict) -> torch.nn.Module:
    if architecture == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=512, **ids))
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[architecture]
    return model_class(config_class(vocab_size=vocab_size, tie_word_embeddings=False, **SIZES, **ids))


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
def test_fit_from_a_saved_model_folder(architecture, tmp_path, capsys):
    tokenizer = load_tokenizer(None)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    folder = tmp_path / architecture
    build(architecture, len(tokenizer), ids).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    before = load_file(folder / "model.safetensors")

    config = write_config(tmp_path / "fit", {"model": {"tiny_model": None, "model_name_or_path": str(folder)}}, tmp_path / "cache")
    outcome = run_entry(main, ["fit", "--config", str(config)], capsys)

    assert outcome.code == 0, outcome.err[-3000:]
    root = tmp_path / "fit" / "run"
    (hparams_file,) = (root / "csv").glob("version_*/hparams.yaml")
    hparams = yaml.safe_load(hparams_file.read_text())
    assert hparams["tokenizer_name_or_path"] == str(folder)  # one value, the model's and the data's
    export = root / "export"
    assert json.loads((export / "config.json").read_text())["model_type"] == architecture
    after = load_file(export / "model.safetensors")
    assert sorted(after) == sorted(before)
    assert any(not torch.equal(after[name], before[name]) for name in before), "the folder's weights did not train"
