"""`model.attention` (the models' attention implementation) and `model.lean_logps: auto`."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.errors import SettingError
from stepwise_lit.logprobs.lean import LEAN_AUTO_MIN_ROWS, LeanLogps, use_lean_logps
from stepwise_lit.models.loading import TinyModelConfig
from stepwise_lit.module import StepwiseDPOModule

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def head_model(rows: int, model_type: str = "llama") -> SimpleNamespace:
    """A stand-in with an LM head of `rows` rows and a `model_type` (all `use_lean_logps` reads)."""
    head = torch.nn.Linear(4, rows, bias=False)
    return SimpleNamespace(config=SimpleNamespace(model_type=model_type), get_output_embeddings=lambda: head)


def test_lean_auto_is_on_for_large_heads_of_allowed_architectures_only():
    """auto: on at LEAN_AUTO_MIN_ROWS rows, off one row below, off for an architecture off the
    allow-list and under FSDP (never an error); true keeps refusing what the lean path gets wrong."""
    assert isinstance(use_lean_logps("auto", head_model(LEAN_AUTO_MIN_ROWS), sharded=False), LeanLogps)
    assert use_lean_logps("auto", head_model(LEAN_AUTO_MIN_ROWS - 1), sharded=False) is None
    assert use_lean_logps("auto", head_model(LEAN_AUTO_MIN_ROWS, "granite"), sharded=False) is None
    assert use_lean_logps("auto", head_model(LEAN_AUTO_MIN_ROWS), sharded=True) is None
    assert use_lean_logps(False, head_model(LEAN_AUTO_MIN_ROWS), sharded=False) is None
    assert use_lean_logps(True, head_model(8), sharded=False).forced is True
    with pytest.raises(SettingError, match="model.lean_logps: .*model_type 'granite'"):
        use_lean_logps(True, head_model(8, "granite"), sharded=False)


def test_lean_auto_is_the_default_and_keeps_the_tiny_model_on_the_plain_path():
    """The default is auto; the byte tokenizer's 259-row head is far below the threshold."""
    module = StepwiseDPOModule(tiny_model=TINY)
    module.configure_model()
    assert module.hparams.lean_logps == "auto"
    assert module.lean is None


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_attention_setting_reaches_policy_and_reference(attention):
    module = StepwiseDPOModule(tiny_model=TINY, attention=attention)
    module.configure_model()
    assert module.policy.config._attn_implementation == attention
    assert module.reference.model.config._attn_implementation == attention


def test_attention_setting_is_checked():
    with pytest.raises(SettingError, match="model.attention: unknown value 'flash'"):
        StepwiseDPOModule(tiny_model=TINY, attention="flash")


def test_flex_attention_training_on_cpu_fails_naming_the_setting(tmp_path):
    """torch has no FlexAttention backward on the CPU: refused at setup, before any step."""
    module = StepwiseDPOModule(tiny_model=TINY, attention="flex_attention")
    datamodule = StepwiseDataModule(path="synthetic", synthetic_train_size=4, synthetic_val_size=0, batch_size=2,
                                    cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(SettingError, match="model.attention: flex_attention cannot train on the CPU"):
        trainer.fit(module, datamodule=datamodule)
