"""Model and tokenizer sources that cannot be found fail at once, naming the setting (issue 11
item 5: a missing local path used to go to the hub and wait there, 51 s offline).

The policy trains in train mode, with dropout off: a model loaded from a folder (which
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

from stepwise_lit.cli import main
from stepwise_lit.data.tokenizer import load_tokenizer
from stepwise_lit.errors import SettingError
from stepwise_lit.models.loading import TinyModelConfig, load_causal_lm
from stepwise_lit.data.sources import check_pretrained_source
from stepwise_lit.module import StepwiseDPOModule
from tests.helpers.entry import run_entry, write_config

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model", "~/no-such-model"])
def test_a_path_that_does_not_exist_is_refused_without_the_hub(name):
    with pytest.raises(SettingError, match=r"^model\.model_name_or_path: no folder"):
        check_pretrained_source("model.model_name_or_path", name, "config.json")


def test_a_name_under_an_existing_folder_is_a_path(tmp_path, monkeypatch):
    """`models/tiny` where `models/` exists is a path, not a hub id."""
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingError, match="no folder 'models/tiny'"):
        check_pretrained_source("model.ref_model_name_or_path", "models/tiny", "config.json")


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_a_hub_id_outside_the_cache_is_refused(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    with pytest.raises(SettingError, match=r"^data\.tokenizer_name_or_path: .*neither a local folder nor in the"):
        check_pretrained_source("data.tokenizer_name_or_path", "no-such-org/no-such-model", "tokenizer_config.json")


def test_an_existing_folder_passes(tmp_path):
    check_pretrained_source("model.model_name_or_path", str(tmp_path), "config.json")


def test_the_module_names_the_setting_of_each_source(tmp_path):
    """The tokenizer (from model_name_or_path when no tokenizer is named), the policy and the
    reference each fail naming their own setting; a folder without a model fails loading."""
    with pytest.raises(SettingError, match=r"^model\.model_name_or_path: no folder"):
        StepwiseDPOModule(model_name_or_path="/no/such/model")
    with pytest.raises(SettingError, match=r"^model\.tokenizer_name_or_path: no folder"):
        StepwiseDPOModule(tokenizer_name_or_path="/no/such/tokenizer")
    module = StepwiseDPOModule(tiny_model=TINY, ref_model_name_or_path=str(tmp_path))
    with pytest.raises(SettingError, match=r"^model\.ref_model_name_or_path: cannot load a model"):
        module.configure_model()


def test_load_tokenizer_names_its_setting(tmp_path):
    with pytest.raises(SettingError, match=r"^data\.tokenizer_name_or_path: cannot load a tokenizer"):
        load_tokenizer(str(tmp_path), setting="data.tokenizer_name_or_path")


def test_a_folder_loads_in_its_own_dtype_when_none_is_set(tmp_path):
    """`dtype` unset means the checkpoint's dtype: a bfloat16 folder loads as bfloat16 (transformers
    4.x, given no dtype, would load float32)."""
    tokenizer = load_tokenizer(None)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    model = load_causal_lm(str(tmp_path), tokenizer, TinyModelConfig())
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    model = load_causal_lm(str(tmp_path), tokenizer, TinyModelConfig(), dtype=torch.float32)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


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
        counter = {"class_path": "tests.helpers.layer_calls.LayerCallCounter", "init_args": {"output": str(output)}}
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
