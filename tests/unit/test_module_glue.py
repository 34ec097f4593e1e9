"""The module as glue: the models come from `stepwise_lit.models.building` and the reference from
`stepwise_lit.logprobs.modes`; one `refreeze_reference()` serves the SFT warm-up and the online
refresh; the objective is called with its parameters named."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import lightning as L
import pytest
import torch

import stepwise_lit.module as module_file
from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.data.tokenizer import load_tokenizer
from stepwise_lit.logprobs.forward import step_logps
from stepwise_lit.logprobs.modes import build_reference
from stepwise_lit.logprobs.reference import AdapterReference, FrozenCopyReference, NoReference
from stepwise_lit.models.building import build_base_model, build_policy
from stepwise_lit.models.loading import LoraSettings, TinyModelConfig
from stepwise_lit.module import StepwiseDPOModule
from stepwise_lit.objective.stepwise import stepwise_objective
from stepwise_lit.online.training import OnlineRounds
from stepwise_lit.rewards import ArithmeticStepVerifier

TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def small_datamodule(tmp_path) -> StepwiseDataModule:
    return StepwiseDataModule(path="synthetic", synthetic_train_size=6, synthetic_val_size=2, batch_size=3,
                              max_length=256, cache_dir=str(tmp_path / "cache"))


def first_batch(tmp_path) -> dict:
    datamodule = small_datamodule(tmp_path)
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def test_build_base_model_sets_the_attention_and_the_tiny_shape():
    tokenizer = load_tokenizer(None)
    model = build_base_model(None, tokenizer, TINY, attention="eager")
    assert model.config._attn_implementation == "eager"
    assert build_base_model(None, tokenizer, TINY).config._attn_implementation == "sdpa"
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert not any(module.training for module in model.modules() if isinstance(module, torch.nn.Dropout))


def test_build_policy_trains_only_the_adapters_and_checkpoints_gradients():
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    policy = build_policy(build_base_model(None, tokenizer, TINY), LORA, gradient_checkpointing=True)
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert policy.is_gradient_checkpointing
    plain = build_policy(build_base_model(None, tokenizer, TINY), None, gradient_checkpointing=False)
    assert all(p.requires_grad for p in plain.parameters()) and not plain.is_gradient_checkpointing


@pytest.mark.parametrize(("mode", "kind"), [("copy", FrozenCopyReference), ("adapter", AdapterReference),
                                            ("none", NoReference)])
def test_build_reference_gives_the_modes_reference(mode, kind):
    tokenizer = load_tokenizer(None)
    policy = build_policy(build_base_model(None, tokenizer, TINY), LORA, gradient_checkpointing=False)
    frozen = build_base_model(None, tokenizer, TINY) if mode == "copy" else None
    reference = build_reference(mode, policy, frozen, None, tokenizer)
    assert type(reference) is kind
    assert reference.models() == ([frozen] if mode == "copy" else [])


def test_refreeze_reference_makes_the_reference_the_policy_with_adapters_merged(tmp_path):
    """After the adapters moved, the reference's step log-probs differ from the policy's; after
    `refreeze_reference()` they are the policy's (adapters merged), and the checkpoint keeps them."""
    batch = first_batch(tmp_path)
    torch.manual_seed(0)
    module = StepwiseDPOModule(tiny_model=TINY, lora=LORA)
    module.configure_model()
    with torch.no_grad():
        for name, parameter in module.policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    num_steps = batch["step_mask"].shape[1]
    with torch.no_grad():
        policy_logps = step_logps(module.policy.eval(), batch, num_steps)
    assert not torch.allclose(module.reference.step_logps(batch, num_steps), policy_logps, atol=1e-3)
    module.refreeze_reference()
    torch.testing.assert_close(module.reference.step_logps(batch, num_steps), policy_logps, atol=1e-5, rtol=1e-5)
    assert "warmup_reference_state_dict" in module.reference.state_dict()


class CountingModule(StepwiseDPOModule):
    """Records the global step of every `refreeze_reference()` call."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.refrozen_at: list[int] = []

    def refreeze_reference(self) -> None:
        self.refrozen_at.append(self.global_step)
        super().refreeze_reference()


def test_the_sft_warmup_refreezes_through_refreeze_reference_once(tmp_path):
    torch.manual_seed(0)
    module = CountingModule(tiny_model=TINY, sft_warmup_steps=1,
                            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, small_datamodule(tmp_path))
    assert module.refrozen_at == [1]
    assert module.reference.from_warmup


def test_the_online_refresh_calls_refreeze_reference_on_its_rounds():
    """`reference_refresh_rounds: 2`: the refresh at the start of round 2 (not 1, and once)."""
    rounds = OnlineRounds(enabled=True, verifier=ArithmeticStepVerifier(), reference_refresh_rounds=2)
    calls: list[int] = []
    for round_index in (1, 2, 2):
        rounds.data_round = round_index
        pl_module = SimpleNamespace(refreeze_reference=lambda index=round_index: calls.append(index),
                                    log=lambda *args, **kwargs: None)
        rounds.on_train_epoch_start(SimpleNamespace(current_epoch=rounds.start_epoch + round_index), pl_module)
    assert calls == [2]


def test_the_objective_is_called_with_named_arguments(tmp_path, monkeypatch):
    """Every argument by name (an eleventh positional one could shift unseen); the values reach it."""
    seen = []

    def recording(*args, **kwargs):
        seen.append((args, kwargs))
        return stepwise_objective(*args, **kwargs)

    monkeypatch.setattr(module_file, "stepwise_objective", recording)
    torch.manual_seed(0)
    module = StepwiseDPOModule(tiny_model=TINY, step_reward_per_token=True)
    module.configure_model()
    batch = first_batch(tmp_path)
    out = module.objective(batch, batch["step_scores"])
    (args, kwargs), = seen
    assert args == ()
    assert set(kwargs) == set(inspect.signature(stepwise_objective).parameters)
    assert kwargs["step_token_counts"] is not None and torch.isfinite(out.loss)
