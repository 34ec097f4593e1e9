"""StepwiseDPOModule: losses at initialisation, gradients, frozen reference, one-pass step log-probs.

Memory-lean paths of StepwiseDPOModule: `lean_logps` gives the plain path's losses and
gradients (which models it serves: tests/unit/logprobs/test_lean.py); gradients are freed right
after the optimizer step."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from stepwise_lit.data.batch import chosen, rejected
from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.errors import SettingError
from stepwise_lit.logprobs.forward import step_logps, step_token_counts
from stepwise_lit.models.export import export_policy
from stepwise_lit.models.loading import LoraSettings, TinyModelConfig
from stepwise_lit.module import StepwiseDPOModule
from stepwise_lit.objective.losses import step_loss
from stepwise_lit.objective.stepwise import Objective

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def make_batch(pack_pairs: bool) -> dict:
    datamodule = StepwiseDataModule(
        path="synthetic", synthetic_train_size=6, synthetic_val_size=2, batch_size=3, max_length=256, pack_pairs=pack_pairs
    )
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


@pytest.fixture(scope="module", params=[False, True], ids=["unpacked", "packed"])
def batch(request) -> dict:
    return make_batch(request.param)


@pytest.fixture(scope="module")
def unpacked_batch() -> dict:
    return make_batch(pack_pairs=False)


def make_module(**settings) -> StepwiseDPOModule:
    torch.manual_seed(0)
    module = StepwiseDPOModule(tiny_model=TINY, **settings)
    module.configure_model()
    return module


def clone(batch: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_objective(module: StepwiseDPOModule, batch: dict) -> Objective:
    """The losses of a batch as the training step computes them (missing scores filled)."""
    return module.objective(batch, module.missing_scores(batch))


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"outcome_loss_type": "sigmoid", "step_loss_type": "step_bce"},
        {"outcome_loss_type": "sigmoid", "step_loss_type": "first_divergence"},
    ],
)
def test_total_loss_is_log2_when_policy_equals_reference(batch, settings):
    """At initialisation the policy is the reference, so every ρ_t = 0: z = 0, h_t = 0, u = 0 and
    each of these losses is −log σ(0) = log 2 (soft_label: −p log ½ − (1−p) log ½ = log 2; step_bce:
    BCE(½, y) = log 2 for any y). The total 0.5·log 2 + 0.5·log 2 is log 2."""
    module = make_module(**settings)
    out = run_objective(module, clone(batch))
    torch.testing.assert_close(out.loss, torch.tensor(math.log(2.0)))
    torch.testing.assert_close(out.step_logratios, torch.zeros_like(out.step_logratios))


def test_margin_loss_at_policy_equals_reference_is_the_offset_alone(batch):
    """`margin` is −log σ(z − γδ); at z = 0 it is −log σ(−γδ), log 2 only where δ = R_c − R_r = 0
    (DESIGN 5 lists it among the log-2 losses, which holds only for equal rewards). With
    first_divergence at h = 0 giving log 2: total = 0.5·log 2 + 0.5·mean(−log σ(−γδ))."""
    module = make_module(outcome_loss_type="margin", step_loss_type="first_divergence", margin_gamma=2.0)
    out = run_objective(module, clone(batch))
    num_pairs = batch["first_divergence"].shape[0]
    delta = out.verifier_rewards[:num_pairs] - out.verifier_rewards[num_pairs:]
    assert delta.abs().min() > 0
    expected = 0.5 * math.log(2.0) + 0.5 * -torch.nn.functional.logsigmoid(-2.0 * delta).mean()
    torch.testing.assert_close(out.loss, expected)


def test_per_token_setting_gives_the_step_loss_each_steps_logratio_over_its_tokens(batch):
    """`step_reward_per_token`: the module's step loss is `step_loss` of ρ_t / n_t, with ρ_t from the
    default module (the same weights, moved off the reference) and n_t counted from the batch; the
    outcome loss and the returned ρ_t are the default module's."""
    outs = []
    for per_token in (False, True):
        module = make_module(step_reward_per_token=per_token)
        with torch.no_grad():
            for parameter in module.policy.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
        outs.append(run_objective(module, clone(batch)))
    plain, per_token = outs
    assert plain.step_logratios.abs().max() > 0.01
    per_token_logratios = plain.step_logratios / step_token_counts(batch, plain.step_logratios.shape[1]).clamp(min=1)
    scores, mask = batch["step_scores"], batch["step_mask"]
    expected = step_loss(
        chosen(per_token_logratios), rejected(per_token_logratios), chosen(scores), rejected(scores), chosen(mask),
        rejected(mask), beta=0.1, alpha=0.5,
    ).mean()
    torch.testing.assert_close(per_token.step_loss, expected)
    assert not torch.isclose(per_token.step_loss, plain.step_loss)
    torch.testing.assert_close(per_token.step_logratios, plain.step_logratios)
    torch.testing.assert_close(per_token.outcome_loss, plain.outcome_loss)


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])])
def test_gradients_reach_only_the_policy_and_reference_is_unchanged(batch, lora):
    """One optimizer step changes the policy's trainable weights, leaves the reference bit-identical,
    and the optimizer holds the policy's trainable parameters only."""
    module = make_module(lora=lora, reference="adapter" if lora else "copy")
    optimizer = module.configure_optimizers()
    if lora is None:
        reference_before = {k: v.clone() for k, v in module.reference.model.state_dict().items()}
    else:
        base_before = {k: v.clone() for k, v in module.policy.named_parameters() if not v.requires_grad}
    trainable_before = {k: v.clone() for k, v in module.policy.named_parameters() if v.requires_grad}

    loss = run_objective(module, clone(batch)).loss
    loss.backward()
    optimizer.step()

    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.policy.parameters() if p.requires_grad}
    assert all(p.grad is not None for p in module.policy.parameters() if p.requires_grad)
    changed = [k for k, v in module.policy.named_parameters() if v.requires_grad and not torch.equal(v, trainable_before[k])]
    assert changed, "no trainable policy weight moved"
    if lora is None:
        assert all(p.grad is None for p in module.reference.model.parameters())
        for name, value in module.reference.model.state_dict().items():
            assert torch.equal(value, reference_before[name]), name
        assert not any(k.startswith("reference") for k in module.state_dict())
    else:
        for name, value in module.policy.named_parameters():
            if not value.requires_grad:
                assert torch.equal(value, base_before[name]), name


def test_one_pass_step_logps_equal_per_prefix_forwards(batch, unpacked_batch):
    """Step t's log-prob from one forward (of the unpacked or the packed batch) equals
    log p(prefix through step t) − log p(prefix through step t−1), each from a separate forward
    of the policy on that prefix alone."""
    module = make_module()
    num_steps = batch["step_mask"].shape[1]
    with torch.no_grad():
        one_pass = step_logps(module.policy, batch, num_steps)
        for row in range(unpacked_batch["input_ids"].shape[0]):
            length = int(unpacked_batch["attention_mask"][row].sum())
            ids, step_ids = unpacked_batch["input_ids"][row, :length], unpacked_batch["step_ids"][row, :length]
            previous = 0.0
            for step in range(1, int(step_ids.max()) + 1):
                end = int((step_ids <= step).nonzero().max()) + 1  # tokens through step `step`
                logits = module.policy(input_ids=ids[None, :end]).logits[0].float()
                token_logps = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:end, None]).squeeze(-1)
                response_logp = token_logps[(step_ids[1:end] > 0)].sum()
                torch.testing.assert_close(one_pass[row, step - 1], response_logp - previous, atol=1e-4, rtol=1e-4)
                previous = response_logp


def test_swapping_chosen_and_rejected_negates_the_margin(unpacked_batch):
    """Swapping the halves of the batch swaps ρ(y_c) and ρ(y_r), so the reward margin changes sign."""
    batch = unpacked_batch
    module = make_module(reference="none")
    out = run_objective(module, clone(batch))
    num_pairs = batch["first_divergence"].shape[0]
    swapped = clone(batch)
    for key in ("input_ids", "attention_mask", "step_ids", "step_scores", "step_mask", "has_step_scores",
                "outcome_scores", "has_outcome_scores"):
        swapped[key] = torch.cat([batch[key][num_pairs:], batch[key][:num_pairs]])
    swapped["steps"] = batch["steps"][num_pairs:] + batch["steps"][:num_pairs]
    out_swapped = run_objective(module, swapped)
    margin = out.logratios[:num_pairs] - out.logratios[num_pairs:]
    margin_swapped = out_swapped.logratios[:num_pairs] - out_swapped.logratios[num_pairs:]
    assert margin.abs().min() > 0
    torch.testing.assert_close(margin_swapped, -margin, atol=1e-5, rtol=1e-5)


def test_missing_scores_without_reward_model_is_an_error(batch):
    module = make_module()
    broken = clone(batch)
    broken["has_step_scores"][0] = False
    with pytest.raises(RuntimeError, match="no step scores and no reward_model"):
        run_objective(module, broken)


@pytest.mark.parametrize(
    "settings, setting_named",
    [
        ({"outcome_loss_type": "hinge"}, "model.outcome_loss_type"),
        ({"step_loss_type": "nope"}, "model.step_loss_type"),
        ({"aggregation_strategy": "median"}, "model.aggregation_strategy"),
        ({"step_beta": 0.0}, "model.step_beta"),
        ({"outcome_beta": -1.0}, "model.outcome_beta"),
        ({"step_weights": [1.0, 2.0]}, "model.step_weights"),
        ({"aggregation_strategy": "weighted_sum", "step_weights": []}, "model.step_weights"),
        ({"step_reward_scale": 1.5}, "model.step_reward_scale"),
        ({"step_loss_weight": 0.0, "outcome_loss_weight": 0.0}, "model.step_loss_weight"),
        ({"reference": "adapter"}, "model.reference"),
        ({"aggregation_strategy": "weighted_sum"}, "model.step_weights"),
        ({"reference": "frozen"}, "model.reference"),
        ({"dtype": "fp32"}, "model.dtype"),
        ({"nonfinite_loss": "ignore"}, "model.nonfinite_loss"),
        ({"step_accuracy_metric": "f1"}, "model.step_accuracy_metric"),
    ],
)
def test_bad_settings_fail_at_start_up_naming_the_setting(settings, setting_named):
    with pytest.raises(SettingError, match=setting_named):
        StepwiseDPOModule(tiny_model=TINY, **settings)


def test_reward_model_fills_missing_step_scores_online(batch):
    """Rows marked as unscored get their step scores from the reward model: the synthetic
    rejected steps from the slip on are false equations, so the rule verifier gives them −1,
    exactly the labels the generator wrote."""
    from stepwise_lit.rewards.rules import ArithmeticStepVerifier

    torch.manual_seed(0)
    module = StepwiseDPOModule(tiny_model=TINY, reward_model=ArithmeticStepVerifier())
    module.configure_model()
    unscored = clone(batch)
    num_pairs = batch["first_divergence"].shape[0]
    unscored["has_step_scores"][num_pairs:] = False
    unscored["step_scores"][num_pairs:] = 0.0
    before = clone(unscored)
    filled = module.missing_scores(unscored)
    torch.testing.assert_close(filled, batch["step_scores"])
    for key, value in before.items():  # the batch itself is not changed
        assert torch.equal(unscored[key], value) if isinstance(value, torch.Tensor) else unscored[key] == value, key
    assert not any(k.startswith("reward") for k in module.state_dict())
    scorer = module.missing_scores.scorer
    assert all(id(p) not in {id(q) for q in module.parameters()} for p in scorer.parameters())
    with torch.no_grad():
        inputs = module.validation_step(unscored, 0)  # the metrics see the scores the reward model gave
    torch.testing.assert_close(inputs["step_scores"], batch["step_scores"])


def test_lora_export_merges_weights_that_reload_and_keeps_the_adapter(batch, tmp_path):
    """With LoRA, the root of the export holds merged weights whose logits equal the trained
    policy's (adapters on), and `adapter/` holds the adapter; the training model stays unmerged."""
    from transformers import AutoModelForCausalLM

    module = make_module(lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), reference="adapter")
    optimizer = module.configure_optimizers()
    run_objective(module, clone(batch)).loss.backward()
    optimizer.step()
    export = export_policy(module, tmp_path / "export")
    assert (export / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(export)
    ids = batch["input_ids"][:2, :40]
    with torch.no_grad():
        expected = module.policy(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        with module.policy.disable_adapter():
            assert not torch.allclose(module.policy(input_ids=ids).logits, expected, atol=1e-4)


def test_sft_warmup_trains_nll_alone_then_refreezes_the_reference(tmp_path):
    """With sft_warmup_steps=2: the first two steps are NLL only (the reference is untouched),
    then the reference becomes a copy of the policy, so every log-ratio starts again at 0, and a
    checkpoint carries that reference (it cannot be rebuilt from its source)."""
    import lightning as L

    datamodule = StepwiseDataModule(
        path="synthetic", synthetic_train_size=12, synthetic_val_size=0, batch_size=3, max_length=256,
        cache_dir=str(tmp_path / "cache"),
    )
    torch.manual_seed(0)
    module = StepwiseDPOModule(tiny_model=TINY, sft_warmup_steps=2)
    module.configure_model()
    initial_reference = {k: v.clone() for k, v in module.reference.model.state_dict().items()}
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule)
    for name, value in module.reference.model.state_dict().items():
        assert torch.equal(value, initial_reference[name]), "the warm-up changed the reference"

    batch = next(iter(datamodule.train_dataloader()))
    module.on_train_batch_start(batch, 0)  # global_step == 2: the warm-up is over
    out = run_objective(module, clone(batch))
    torch.testing.assert_close(out.step_logratios, torch.zeros_like(out.step_logratios))
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    saved = torch.load(tmp_path / "after.ckpt", weights_only=True)["warmup_reference_state_dict"]
    for name, value in module.policy.state_dict().items():
        assert torch.equal(saved[name], value)


def test_sft_warmup_needs_a_copied_reference():
    with pytest.raises(SettingError, match="model.sft_warmup_steps"):
        StepwiseDPOModule(tiny_model=TINY, sft_warmup_steps=5, reference="none")


def test_predict_gives_the_training_paths_implicit_rewards(batch):
    """predict_step's pair rewards are β_o ρ(y) and its step rewards β_s ρ_t, as in the loss path."""
    module = make_module(reference="none")
    num_pairs = batch["first_divergence"].shape[0]
    with torch.no_grad():
        predicted = module.predict_step(clone(batch), 0)
        out = run_objective(module, clone(batch))
    torch.testing.assert_close(predicted["chosen_rewards"], 0.1 * out.logratios[:num_pairs])
    torch.testing.assert_close(predicted["rejected_rewards"], 0.1 * out.logratios[num_pairs:])
    torch.testing.assert_close(predicted["chosen_step_rewards"], 0.1 * out.step_logratios[:num_pairs])
    torch.testing.assert_close(predicted["rejected_step_rewards"], 0.1 * out.step_logratios[num_pairs:])


def test_compiled_layers_give_the_same_loss_and_gradients(batch):
    """model.compile compiles each decoder layer (dynamic shapes) of the policy and the reference:
    the loss and the policy gradients equal the uncompiled module's, and a second batch length
    runs without error on the same compiled graphs."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        module = make_module(compile=compiled)
        loss = run_objective(module, clone(batch)).loss
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in module.policy.named_parameters()}))
    (loss, grads), (compiled_loss, compiled_grads) = results
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    shorter = {k: v[..., :-8] if k in ("input_ids", "attention_mask", "step_ids", "position_ids", "segment_ids", "slot_ids") else v
               for k, v in clone(batch).items()}
    if "target_ids" in shorter:
        shorter["target_ids"], shorter["target_step_ids"] = batch["target_ids"][:, :-8], batch["target_step_ids"][:, :-8]
    with torch.no_grad():
        assert torch.isfinite(run_objective(module, shorter).loss)


def test_frozen_reference_is_moved_and_converted_but_never_registered():
    """The reference model is held outside the registered submodules: not in `parameters()` (so
    not in the optimizer or DDP's reducer), not in the state dict, yet `.to(dtype)` (what
    Lightning's bf16-true conversion calls) converts it with the policy."""
    module = make_module()
    reference = module.reference.model
    assert {id(p) for p in reference.parameters()}.isdisjoint(id(p) for p in module.parameters())
    assert not any(k.startswith("reference") for k in module.state_dict())
    module.to(torch.float64)
    assert {p.dtype for p in reference.parameters()} == {torch.float64}
    assert {p.dtype for p in module.policy.parameters()} == {torch.float64}


def test_lora_sft_warmup_refreezes_the_reference_with_the_adapter_merged(unpacked_batch, tmp_path):
    """LoRA + reference: copy + sft_warmup_steps: at the end of the warm-up the reference becomes
    the policy with its (trained) adapters merged, so its step log-probs equal the policy's."""
    import lightning as L

    datamodule = StepwiseDataModule(
        path="synthetic", synthetic_train_size=6, synthetic_val_size=0, batch_size=3, max_length=256,
        cache_dir=str(tmp_path / "cache"),
    )
    torch.manual_seed(0)
    lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    module = StepwiseDPOModule(tiny_model=TINY, lora=lora, sft_warmup_steps=1,
                               optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule)  # step 1: SFT; step 2: the reference is re-frozen, then DPO
    assert module.reference.from_warmup
    module.on_train_batch_start(unpacked_batch, 0)  # already re-frozen: no second re-freeze
    module.reference.refreeze_from(module.policy)  # the policy as it is now, adapters merged
    num_steps = unpacked_batch["step_mask"].shape[1]
    with torch.no_grad():
        expected = step_logps(module.policy.eval(), unpacked_batch, num_steps)
    torch.testing.assert_close(module.reference.step_logps(unpacked_batch, num_steps), expected, atol=1e-5, rtol=1e-5)
    adapters = [p for name, p in module.policy.named_parameters() if "lora_B" in name]
    assert any(p.abs().sum() > 0 for p in adapters), "the adapters never trained: the test would prove nothing"


def test_max_length_above_the_models_positions_fails_at_setup(tmp_path):
    """data.max_length above the model's max_position_embeddings stops before training, naming both."""
    import lightning as L

    datamodule = StepwiseDataModule(path="synthetic", synthetic_train_size=4, synthetic_val_size=0, batch_size=2,
                                    max_length=2048, cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    with pytest.raises(SettingError, match=r"data.max_length: 2048 .*model.tiny_model.max_position_embeddings \(1024\)"):
        trainer.fit(StepwiseDPOModule(tiny_model=TINY), datamodule)


def test_validation_sft_loss_is_per_token_over_the_split_however_batched(tmp_path):
    """`val/sft_loss` is −Σ log p / Σ tokens over the whole split (chosen responses), so batches of 1
    and of 4 pairs log the same value; a mean of per-batch ratios would weight short batches up
    (and differ between one process and DDP shards)."""
    import lightning as L

    values = []
    for batch_size in (1, 4):
        datamodule = StepwiseDataModule(path="synthetic", synthetic_train_size=4, synthetic_val_size=8,
                                        eval_batch_size=batch_size, max_length=256, cache_dir=str(tmp_path / "cache"))
        module = make_module()
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, default_root_dir=str(tmp_path))
        trainer.validate(module, datamodule, verbose=False)
        values.append(trainer.callback_metrics["val/sft_loss"])
    torch.testing.assert_close(values[0], values[1], atol=1e-6, rtol=1e-6)


TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def datamodule() -> StepwiseDataModule:
    datamodule = StepwiseDataModule(path="synthetic", synthetic_train_size=6, synthetic_val_size=2, batch_size=3,
                                    max_length=256)
    datamodule.setup("fit")
    return datamodule


def loss_and_grads(batch: dict, **settings) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and trainable gradients of one batch's objective, the policy nudged off the reference."""
    torch.manual_seed(0)
    module = StepwiseDPOModule(tiny_model=TINY, **settings)
    module.configure_model()
    with torch.no_grad():
        for parameter in module.policy.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn_like(parameter))
    out = module.objective(batch, batch["step_scores"])
    out.loss.backward()
    return out.loss.detach(), [p.grad for p in module.policy.parameters() if p.requires_grad]


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4)], ids=["full", "lora"])
def test_lean_logps_give_the_plain_losses_and_gradients(datamodule, lora):
    batch = next(iter(datamodule.train_dataloader()))
    plain_loss, plain_grads = loss_and_grads(batch, lora=lora)
    lean_loss, lean_grads = loss_and_grads(batch, lora=lora, lean_logps=True)
    assert plain_loss.item() != pytest.approx(0.6931, abs=1e-4)  # the policy really differs from the reference
    torch.testing.assert_close(lean_loss, plain_loss, rtol=0, atol=1e-6)
    for lean, plain in zip(lean_grads, plain_grads, strict=True):
        torch.testing.assert_close(lean, plain, rtol=1e-4, atol=1e-6)


class GradientProbe(L.Callback):
    """Whether any policy gradient is still held when a training step has ended."""

    def __init__(self) -> None:
        self.held = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.held.append(any(p.grad is not None for p in pl_module.policy.parameters()))


def test_gradients_are_freed_after_the_optimizer_step(datamodule, tmp_path):
    probe = GradientProbe()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=[probe])
    trainer.fit(StepwiseDPOModule(tiny_model=TINY), datamodule=datamodule)
    assert probe.held == [False, False]
