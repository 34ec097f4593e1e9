"""`model.lean_logps`: the lean path engages only on architectures whose logits it computes
exactly (the allow-list, each shown equal to the model's own logits here), and is checked
against the model's own logits on the first batch each model serves.

`model.attention` (the models' attention implementation) and `model.lean_logps: auto`."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from stepwise_lit.cli import main
from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.data.tokenizer import load_tokenizer
from stepwise_lit.errors import SettingError
from stepwise_lit.logprobs.forward import step_logps
from stepwise_lit.logprobs.lean import (
    LEAN_ARCHITECTURES,
    LEAN_AUTO_MIN_ROWS,
    LeanLogps,
    lean_logps_gap,
    use_lean_logps,
)
from stepwise_lit.models.loading import TinyModelConfig
from stepwise_lit.module import StepwiseDPOModule
from tests.helpers.entry import run_entry, write_config
from tests.helpers.step_logps import pair_batches, per_sequence_step_logps

SIZES = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
TINY_CONFIGS = {
    "llama": SIZES,
    "mistral": SIZES,
    "mixtral": {**SIZES, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": SIZES,
    "qwen2_moe": {**SIZES, **MOE, "shared_expert_intermediate_size": 32},
    "qwen3": {**SIZES, "head_dim": 16},
    "qwen3_moe": {**SIZES, **MOE, "head_dim": 16},
    "gemma": {**SIZES, "head_dim": 16},
    "phi3": SIZES,
    "gpt2": {"vocab_size": 300, "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 512},
}
"""A tiny random-weight config of every architecture on the allow-list."""


def granite_folder(tmp_path, vocab_size: int = 49_155):
    """A random-weight GraniteForCausalLM (granite-3.0-2b's head rows and `logits_scaling`,
    hidden 32, one layer) saved with the byte-level tokenizer beside it."""
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                           logits_scaling=8.0, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path / "granite"
    GraniteForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_granite_default_settings_give_the_models_own_log_probs(tmp_path):
    """GraniteForCausalLM divides its logits by `logits_scaling`, which a head applied to the
    hidden states by hand misses. With the default settings (`lean_logps: auto`, a head of
    granite-3.0-2b's 49,155 rows, above the auto threshold) the per-step log-probs, packed and
    unpacked, equal each sequence's own forward within 1e-4 + 1e-6 relative (fp32, per-step sums
    of ~20 token log-probs of about -10.8 each)."""
    folder = granite_folder(tmp_path)
    module = StepwiseDPOModule(model_name_or_path=str(folder))
    module.configure_model()
    unpacked, packed = pair_batches(tmp_path, str(folder))
    num_steps = unpacked["step_mask"].shape[1]
    expected = per_sequence_step_logps(module.policy, unpacked, num_steps).float()
    with torch.no_grad():
        for batch in (unpacked, packed):
            actual = step_logps(module.policy, batch, num_steps, module.lean)
            gap = (actual - expected)[unpacked["step_mask"]].abs().max()
            torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-6, msg=f"greatest gap {gap:.4g} nats")


def test_every_allowed_architecture_has_a_tiny_config_here():
    """The allow-list grows only with a test below."""
    assert set(TINY_CONFIGS) == LEAN_ARCHITECTURES


@pytest.mark.parametrize("model_type", sorted(LEAN_ARCHITECTURES))
def test_the_lean_path_equals_the_models_own_logits(model_type, tmp_path):
    """On each allowed architecture the start-time check passes (greatest token gap within its
    tolerance, about 1e-4 nats in fp32), the lean path is taken, and its per-step log-probs,
    packed and unpacked, equal those of the model's own logits within 1e-5 + 1e-6 relative."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(None)
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type], tie_word_embeddings=False,
                                  pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # a head of ordinary scale: the init's logits are all near 0
        model.get_output_embeddings().weight.normal_(0, 1)
    unpacked, packed = pair_batches(tmp_path, None)
    num_steps = unpacked["step_mask"].shape[1]
    gap, tolerance = lean_logps_gap(model, unpacked["input_ids"][:1])
    assert gap <= tolerance < 2e-4
    lean = LeanLogps(forced=True)
    with torch.no_grad():
        for batch in (unpacked, packed):
            own = step_logps(model, batch, num_steps)
            assert (own[unpacked["step_mask"]] < -1).all()
            torch.testing.assert_close(step_logps(model, batch, num_steps, lean), own, atol=1e-5, rtol=1e-6)
    assert lean.serves(model, unpacked["input_ids"]) is True


@pytest.mark.parametrize("model_type, settings", [
    ("granite", {"logits_scaling": 8.0}), ("cohere", {"logit_scale": 0.0625}), ("gemma2", {"head_dim": 16}),
])
def test_the_start_time_check_catches_the_architectures_left_out(model_type, settings, tmp_path):
    """Put on the lean path by hand, Granite (logits / 8), Cohere (logits x 1/16) and Gemma 2
    (softcapping at 30) miss their own logits by whole nats, over 1,000 times the tolerance
    (seed 0, a unit-scale head: 22, 24 and 3.0 nats)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SIZES, **settings, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 1)
    unpacked, _ = pair_batches(tmp_path, None)
    gap, tolerance = lean_logps_gap(model, unpacked["input_ids"][:1])
    assert gap > 1000 * tolerance, (gap, tolerance)


class ScaledLogitsLlama(LlamaForCausalLM):
    """A Llama whose forward divides its logits by 8 after the head, as Granite's does: on the
    allow-list by its model_type, so only the start-time check can catch it."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits / 8.0
        return output


def test_the_start_time_check_catches_a_transformation_the_allow_list_misses(tmp_path, caplog):
    """auto: the model falls back to its own logits, with a warning naming the gap; true: a
    SettingError naming model.lean_logps."""
    torch.manual_seed(0)
    model = ScaledLogitsLlama(LlamaConfig(**SIZES, tie_word_embeddings=False)).eval()
    unpacked, _ = pair_batches(tmp_path, None)
    num_steps = unpacked["step_mask"].shape[1]
    gap, tolerance = lean_logps_gap(model, unpacked["input_ids"][:1])
    assert gap > 100 * tolerance
    with torch.no_grad():
        own = step_logps(model, unpacked, num_steps)
        with caplog.at_level(logging.WARNING, logger="stepwise_lit"):
            fallback = step_logps(model, unpacked, num_steps, LeanLogps(forced=False))
    assert torch.equal(fallback, own)
    assert "model.lean_logps: auto: ScaledLogitsLlama's lean log-probs differ from its own logits'" in caplog.text
    with pytest.raises(SettingError, match="model.lean_logps: ScaledLogitsLlama's lean log-probs differ"):
        step_logps(model, unpacked, num_steps, LeanLogps(forced=True))


def test_architectures_off_the_list_are_refused():
    """Granite, Gemma 2 (softcapping) and Phi (a head bias): auto stays on full logits, true fails
    naming the setting; FSDP is refused for every architecture."""
    for model_type, sizes in [("granite", SIZES), ("gemma2", {**SIZES, "head_dim": 16}), ("phi", SIZES)]:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**sizes, "vocab_size": 32_000}))
        assert use_lean_logps("auto", model, sharded=False) is None
        with pytest.raises(SettingError, match=f"model.lean_logps: .*model_type '{model_type}'"):
            use_lean_logps(True, model, sharded=False)
    llama = LlamaForCausalLM(LlamaConfig(**{**SIZES, "vocab_size": 32_000}))
    assert isinstance(use_lean_logps("auto", llama, sharded=False), LeanLogps)
    assert use_lean_logps("auto", llama, sharded=True) is None
    with pytest.raises(SettingError, match="model.lean_logps: not supported with FSDP"):
        use_lean_logps(True, llama, sharded=True)


def test_train_py_refuses_forced_lean_logps_on_granite(tmp_path, capsys):
    """The user's way: `train.py fit` from a Granite folder with `model.lean_logps: true` stops
    at start with exit 2 and one message naming the setting (no traceback)."""
    folder = granite_folder(tmp_path, vocab_size=300)
    config = write_config(tmp_path / "fit", {"model": {"tiny_model": None, "model_name_or_path": str(folder),
                                                       "lean_logps": True}}, tmp_path / "cache")
    outcome = run_entry(main, ["fit", "--config", str(config)], capsys)
    assert outcome.code == 2
    assert "model.lean_logps: GraniteForCausalLM (model_type 'granite') is not among" in outcome.err
    assert "Traceback" not in outcome.err


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
