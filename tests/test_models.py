"""Model and tokenizer sources that cannot be found fail at once, naming the setting (issue 11
item 5: a missing local path used to go to the hub and wait there, 51 s offline)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stepwise_lit.errors import SettingError
from stepwise_lit.data.sources import check_pretrained_source
from stepwise_lit.models.loading import TinyModelConfig, load_causal_lm
from stepwise_lit.module import StepwiseDPOModule
from stepwise_lit.data.tokenizer import load_tokenizer

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
