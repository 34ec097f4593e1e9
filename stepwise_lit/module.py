"""StepwiseDPOModule: the Lightning hooks over forward (log-probs), reference and objective (losses)."""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import Literal, get_args

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy

from stepwise_lit.data.batch import PairBatch, chosen, num_pairs, num_steps, rejected
from stepwise_lit.data.tokenizer import load_tokenizer
from stepwise_lit.errors import SettingError
from stepwise_lit.evaluation.preference import PreferenceMetrics
from stepwise_lit.faults import CheckpointOnSignal, gather_rng_states, set_rng_state
from stepwise_lit.logprobs.forward import chosen_side, chosen_token_counts, step_logps, step_token_counts
from stepwise_lit.logprobs.lean import LeanLogps, use_lean_logps
from stepwise_lit.logprobs.modes import ReferenceMode, build_reference
from stepwise_lit.logprobs.reference import NoReference, Reference
from stepwise_lit.models.building import build_base_model, build_policy
from stepwise_lit.models.clipping import clip_unscaled_gradients
from stepwise_lit.models.distributed import decoder_layers, fully_shard_causal_lm, is_sharded
from stepwise_lit.models.loading import (
    TINY_MODEL_RNG_KEY,
    DtypeName,
    LoraSettings,
    TinyModelConfig,
    check_lora_settings,
    frozen_copy,
    frozen_state_keys,
)
from stepwise_lit.objective.losses import OutcomeLossType, StepLossType, resolve_aggregation
from stepwise_lit.objective.stepwise import (
    Objective,
    ObjectiveSettings,
    check_objective_settings,
    sft_loss,
    stepwise_objective,
)
from stepwise_lit.rewards.base import MissingStepScores, StepScorer

log = logging.getLogger("stepwise_lit")

POLICY_PREFIX = "policy."
"""The policy's keys in the module's state dict (and a checkpoint's ``state_dict``)."""

StepAccuracyMetric = Literal["accuracy", "auroc"]
NonfiniteLoss = Literal["error", "skip"]
AttentionName = Literal["sdpa", "eager", "flex_attention"]
CHOICES = {
    "outcome_loss_type": OutcomeLossType,
    "step_loss_type": StepLossType,
    "reference": ReferenceMode,
    "step_accuracy_metric": StepAccuracyMetric,
    "nonfinite_loss": NonfiniteLoss,
    "dtype": DtypeName,
    "attention": AttentionName,
}
"""Settings with a fixed set of values, checked when the module is built from Python (the CLI's
parser checks them before that)."""


class StepwiseDPOModule(L.LightningModule):
    """Stepwise DPO: step-level and outcome-level preference losses from verifier step scores.

    Args:
        model_name_or_path: Policy weights (hub id or local folder). None builds the embedded
            tiny Llama-architecture model from `tiny_model` (nothing downloaded).
        tokenizer_name_or_path: Tokenizer; None uses `model_name_or_path`, or the embedded
            byte-level tokenizer when that is None too. The CLI passes it on to the data module.
        tiny_model: Shape of the embedded model (used only when `model_name_or_path` is None).
        trust_remote_code: Allow code from the model repository. Off unless you set it.
        dtype: Weight dtype at load: "float32", "bfloat16" or "float16"; None keeps the
            checkpoint's. Mixed precision is the
            trainer's `precision` setting.
        reference: Where reference log-probs come from (`stepwise_lit.logprobs.reference`): "copy" (a
            frozen model), "adapter" (the policy with LoRA adapters disabled, no second copy),
            "precomputed" (a reference pass inside the run, cached on disk), or "none"
            (reference-free: log-ratios are log-probs).
        ref_model_name_or_path: Reference weights for `reference: copy` or `precomputed`; None:
            the policy's initial weights.
        lora: LoRA settings (checked at start, `stepwise_lit.models.loading.check_lora_settings`); checkpoints then
            hold only the adapter weights (see `on_save_checkpoint`). None trains every weight.
        step_beta: β_s, the scale of the implicit step reward h_t = β_s ρ_t. Must be > 0.
        outcome_beta: β_o, the scale of the outcome margin z = β_o (ρ(y_c) − ρ(y_r)). Must be > 0.
        outcome_loss_type: The outcome loss (`stepwise_lit.objective.losses.outcome_loss`).
        step_loss_type: The step loss (`stepwise_lit.objective.losses.step_loss`).
        aggregation_strategy: How step scores become an outcome reward: "sum", "mean",
            "weighted_sum" (needs `step_weights`), "min", "max", "last", "product", "discounted",
            or the import path of your own function (`mypackage.rewards.fraction_good`), called as
            `fn(scores [N, S] float32 with 0 on masked steps, mask [N, S] bool) -> [N]`; imported
            and checked at start.
        step_weights: Per-step weights for "weighted_sum" (a step past the list takes the last).
        discount_gamma: γ for "discounted".
        step_reward_scale: α in [0, 1] for "reward_weighted".
        soft_label_tau: τ > 0, temperature of the soft label p = σ(δ/τ).
        margin_gamma: γ of the "margin" (offset DPO) loss.
        outcome_score_weight: Where a row carries outcome scores (`chosen_score`/`rejected_score`),
            its reward is (1 − w)·A(step scores) + w·outcome score, w in [0, 1].
        step_loss_weight: Weight of the step loss in the total.
        outcome_loss_weight: Weight of the outcome loss in the total.
        sft_weight: Weight of the per-token NLL of the chosen response.
        step_reward_per_token: The step loss uses the per-token step reward h_t / n_t (β_s times
            the step's mean per-token log-ratio; n_t its tokens) instead of h_t, so a long step
            does not outweigh a short one; the outcome loss keeps the sequence log-ratio. h_t / n_t
            is about n_t times smaller than h_t: raise `step_beta` to match (the embedded task's steps
            average 24 tokens: β_s 2 gives h_t / n_t about the size β_s 0.1 gives h_t). Logged and reported
            step rewards stay h_t (`StepRewardReport(per_token=True)` localises with h_t / n_t).
        sft_warmup_steps: Optimizer steps of supervised fine-tuning on the chosen responses
            (per-token NLL alone, no reference forward) before the preference losses start;
            then the reference (`reference: copy`) is re-frozen from the policy (LoRA adapters
            merged into it), as in the usual SFT → DPO recipe. Meant for a randomly initialised
            policy (the embedded default): against a random reference, gains on a response's
            template text would swamp the step rewards. The re-frozen reference goes into
            checkpoints, since it cannot be rebuilt from its source.
        evaluate_step_accuracy: Compute step-level metrics (step accuracy, step AUROC).
        step_accuracy_metric: Which step metric is the headline `step_metric` in the progress bar:
            "accuracy" (sign of h_t agrees with the verifier's g_t) or "auroc".
        reward_model: A step scorer (see `stepwise_lit.rewards`) that fills step scores for rows
            that have none, under no_grad; kept out of the optimizer and the checkpoint.
        gradient_checkpointing: Recompute activations in backward to save memory.
        compile: Compile each decoder layer of the policy and the reference with
            `torch.compile(dynamic=True)` (one graph for every batch length; the first steps
            pay the compilation). Not with FSDP1 (`FSDPStrategy`), which wraps the layers later.
        lean_logps: Log-probs from the final hidden states, the LM head applied to completion
            positions a chunk at a time (`stepwise_lit.logprobs.lean`): no `[2B, L, V]` logits tensor
            exists, which matters for large vocabularies (at 128k, under a third of the plain
            way's peak; see docs/performance.md). Only for the architectures of
            `stepwise_lit.logprobs.lean.LEAN_ARCHITECTURES` (Llama, Mistral, Qwen2/3, Gemma, Phi-3,
            GPT-2...), not under FSDP, and checked against each model's own logits on its first
            batch. "auto" (the default): on for LM heads of at least 32,000 rows where it
            applies, off otherwise (the embedded tiny model's 259 rows: off), falling back to
            full logits (a warning) where the check fails; true: fails at start instead.
        attention: The models' attention implementation (transformers' ``attn_implementation``):
            "sdpa", "eager" or "flex_attention" (FlexAttention: packed rows get a block mask, so
            the kernel skips the blocks no query sees, e.g. the other pairs of a
            ``data.pack_budget`` row; it trains on CUDA only, torch has no FlexAttention backward
            on the CPU); None: the model's own choice (sdpa for the tiny model).
        nonfinite_loss: On a NaN/inf loss, "error" stops with a message; "skip" skips the
            optimizer step and counts it (logged as `train/nonfinite_steps`).
        optimizer: Optimizer factory, applied to the policy's trainable parameters only.
        scheduler: Optional LR scheduler factory (stepped every optimizer step).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        tokenizer_name_or_path: str | None = None,
        tiny_model: TinyModelConfig | None = None,
        trust_remote_code: bool = False,
        dtype: DtypeName | None = None,
        reference: ReferenceMode = "copy",
        ref_model_name_or_path: str | None = None,
        lora: LoraSettings | None = None,
        step_beta: float = 0.1,
        outcome_beta: float = 0.1,
        outcome_loss_type: OutcomeLossType = "soft_label",
        step_loss_type: StepLossType = "reward_weighted",
        aggregation_strategy: str = "mean",
        step_weights: list[float] | None = None,
        discount_gamma: float = 0.9,
        step_reward_scale: float = 0.5,
        soft_label_tau: float = 1.0,
        margin_gamma: float = 1.0,
        outcome_score_weight: float = 0.5,
        step_loss_weight: float = 0.5,
        outcome_loss_weight: float = 0.5,
        sft_weight: float = 0.0,
        step_reward_per_token: bool = False,
        sft_warmup_steps: int = 0,
        evaluate_step_accuracy: bool = True,
        step_accuracy_metric: StepAccuracyMetric = "accuracy",
        reward_model: StepScorer | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        lean_logps: bool | Literal["auto"] = "auto",
        attention: AttentionName | None = None,
        nonfinite_loss: NonfiniteLoss = "error",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        # Saved as the tokenizer actually used, the value the CLI links into the data module's
        # hparams: a logger merges both and refuses one key with two values.
        tokenizer_name_or_path = tokenizer_name_or_path or model_name_or_path
        self.save_hyperparameters(ignore=["reward_model", "optimizer", "scheduler"])
        # The typed settings themselves: under LightningCLI `hparams` holds the parsed config,
        # where dataclasses are plain dicts.
        self.tiny_model = tiny_model or TinyModelConfig()
        self.lora = lora
        check_module_settings(self.hparams)
        if lora is not None:
            check_lora_settings(lora)
        self.objective_settings = ObjectiveSettings(**{
            **{f.name: self.hparams[f.name] for f in fields(ObjectiveSettings)},
            "aggregation_strategy": resolve_aggregation(aggregation_strategy),
        })
        check_objective_settings(self.objective_settings)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tokenizer = load_tokenizer(
            tokenizer_name_or_path, trust_remote_code,
            setting="model.tokenizer_name_or_path" if tokenizer_name_or_path != model_name_or_path else "model.model_name_or_path",
        )
        # Models are built in `configure_model`, so sharded strategies can wrap them there.
        self.policy: torch.nn.Module | None = None
        self.base_rng_state: torch.Tensor | None = None  # the CPU RNG state the embedded model was built from
        self.reference: Reference = NoReference()  # the mode's reference once `configure_model` ran
        self.missing_scores = MissingStepScores(reward_model)
        self.train_metrics = PreferenceMetrics(step_metrics=evaluate_step_accuracy)
        self.val_metrics = PreferenceMetrics(step_metrics=evaluate_step_accuracy)
        self.nonfinite_steps = 0
        self.lean: LeanLogps | None = None  # the lean path of `lean_logps`, resolved in configure_model
        self._skip_optimizer_step = False  # set by a non-finite loss under nonfinite_loss: skip

    # ------------------------------------------------------------------ models
    def build_base_model(self, name_or_path: str | None, setting: str = "model.model_name_or_path") -> torch.nn.Module:
        """`stepwise_lit.models.building.build_base_model` with this module's tokenizer, `tiny_model`,
        `trust_remote_code`, `dtype` and `attention`; `setting` names `name_or_path` in errors."""
        hp = self.hparams
        return build_base_model(name_or_path, self.tokenizer, self.tiny_model, hp.trust_remote_code, hp.dtype,
                                hp.attention, setting)

    def configure_model(self) -> None:
        """Builds the policy and the reference of the settings (once; sharded strategies call it
        inside their wrapping context)."""
        if self.policy is not None:
            return
        hp = self.hparams
        self.base_rng_state = torch.get_rng_state() if hp.model_name_or_path is None else None
        base = self.build_base_model(hp.model_name_or_path)
        source = hp.ref_model_name_or_path
        load_reference = None if source is None else lambda: self.build_base_model(source, "model.ref_model_name_or_path")
        # `reference: copy` freezes its model before LoRA changes `base`: the policy before any training step.
        frozen = frozen_copy(base if load_reference is None else load_reference()) if hp.reference == "copy" else None
        self.policy = build_policy(base, self.lora, hp.gradient_checkpointing)
        fsdp1 = self._trainer is not None and isinstance(self._trainer.strategy, FSDPStrategy)
        self.lean = use_lean_logps(hp.lean_logps, base, sharded=self.device_mesh is not None or fsdp1)
        self.reference = build_reference(hp.reference, self.policy, frozen, self.lean, self.tokenizer,
                                         load_model=load_reference, source=source, dtype=hp.dtype)
        if self.device_mesh is not None:
            self._fully_shard_models()
        if hp.compile:
            if fsdp1:
                raise SettingError("model.compile: not supported with FSDPStrategy (FSDP1); use ModelParallelStrategy (FSDP2)")
            for model in [self.policy, *self.reference.models()]:
                for layer in decoder_layers(model):
                    layer.compile(dynamic=True)

    def refreeze_reference(self) -> None:
        """Makes the reference (`reference: copy`) a frozen copy of the policy as it is now, LoRA
        adapters merged: at the end of the SFT warm-up (`on_train_batch_start`) and at an online
        round's refresh (`stepwise_lit.online.training.OnlineRounds`). It goes into checkpoints."""
        self.reference.refreeze_from(self.policy)

    def _fully_shard_models(self) -> None:
        """FSDP2 (`ModelParallelStrategy`): shards the decoder layers of the policy and of the
        reference over the data-parallel mesh, each model its own root."""
        if self.device_mesh["tensor_parallel"].size() > 1:
            raise SettingError(
                "trainer.strategy: this module shards with FSDP2 over data parallelism only; set "
                "tensor_parallel_size: 1 and data_parallel_size to the number of processes (see configs/fsdp.yaml)"
            )
        for model in [self.policy, *self.reference.models()]:
            fully_shard_causal_lm(model, self.device_mesh["data_parallel"])

    def _apply(self, fn, recurse: bool = True):
        """Also converts the models held outside the registered submodules (the reference's and
        the reward model), so `.to(device)`, `.to(dtype)` and Lightning's `bf16-true` conversion
        reach them, while they stay out of `parameters()`, the optimizer and the state dict."""
        super()._apply(fn, recurse)
        for model in self.reference.models() + self.missing_scores.models():
            model._apply(fn, recurse)
        return self

    def setup(self, stage: str) -> None:
        self.configure_model()
        if stage == "fit" and self.hparams.attention == "flex_attention" and self.trainer.strategy.root_device.type == "cpu":
            raise SettingError(
                "model.attention: flex_attention cannot train on the CPU (torch has no FlexAttention backward "
                "there); use sdpa, or train on a CUDA device"
            )
        datamodule = self.trainer.datamodule
        max_length = datamodule.hparams.get("max_length") if datamodule is not None else None
        positions = getattr(self.policy.config, "max_position_embeddings", None)
        if max_length is not None and positions is not None and max_length > positions:
            source = "model.tiny_model.max_position_embeddings" if self.hparams.model_name_or_path is None else (
                "the max_position_embeddings of model.model_name_or_path")
            raise SettingError(f"data.max_length: {max_length} is above {source} ({positions}); lower data.max_length")

    def _place_frozen_models(self) -> None:
        self.reference.place(self.trainer, self.device)
        for model in self.missing_scores.models():
            model.to(self.device)

    def on_fit_start(self) -> None:
        """Places the frozen models, and puts the policy in train mode: `from_pretrained` returns
        a model in eval mode and Lightning keeps each module's mode (its evaluation loops switch
        to eval and back), so a loaded policy would otherwise train as at inference, where Hugging
        Face layers skip gradient checkpointing. Dropout stays off (`stepwise_lit.models.loading.disable_dropout`);
        the frozen models are not the module's children and stay in eval mode."""
        self._place_frozen_models()
        self.policy.train()

    def on_validation_start(self) -> None:
        self._place_frozen_models()

    def on_test_start(self) -> None:
        self._place_frozen_models()

    def on_predict_start(self) -> None:
        self._place_frozen_models()

    def configure_callbacks(self) -> list[L.Callback]:
        """A checkpoint on SIGTERM or SIGINT (see `stepwise_lit.faults.CheckpointOnSignal`)."""
        return [CheckpointOnSignal()]

    def configure_optimizers(self):
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(trainable)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except for a fused optimizer under mixed precision, which
        Lightning refuses: there `stepwise_lit.models.clipping.clip_unscaled_gradients` unscales
        (``16-mixed``) and clips, keeping the fused kernel."""
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and optimizer.defaults.get("fused"):
            clip_unscaled_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm or "norm", plugin.scaler)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------- steps
    def objective(self, batch: PairBatch, step_scores: torch.Tensor) -> Objective:
        """The losses and rewards of a batch, with `step_scores` ``[2B, S]`` as the verifier's."""
        # The reference first: its buffers come and go before the policy's activations pile up
        # (bench model: lower peak RSS and faster steps than the other order, see docs/performance.md).
        reference_step_logps = self.reference.step_logps(batch, num_steps(batch))  # [2B, S]
        policy_step_logps = step_logps(self.policy, batch, num_steps(batch), self.lean)  # [2B, S]
        per_token = self.objective_settings.step_reward_per_token
        return stepwise_objective(
            policy_step_logps=policy_step_logps,
            reference_step_logps=reference_step_logps,
            step_scores=step_scores,
            step_mask=batch["step_mask"],
            outcome_scores=batch["outcome_scores"],
            has_outcome_scores=batch["has_outcome_scores"],
            first_divergence=batch["first_divergence"],
            chosen_tokens=chosen_token_counts(batch),
            settings=self.objective_settings,
            pair_weights=batch.get("pair_weights"),
            step_token_counts=step_token_counts(batch, num_steps(batch)) if per_token else None,
        )

    def on_train_batch_start(self, batch: PairBatch, batch_idx: int) -> None:
        """At the end of the SFT warm-up, re-freezes the reference from the policy (once)."""
        warmup = self.hparams.sft_warmup_steps
        if warmup and self.global_step == warmup and not self.reference.from_warmup:
            self.refreeze_reference()
            log.info("SFT warm-up done after %d steps: the reference is now a frozen copy of the policy", warmup)
        self.reference.begin_batch(self.trainer, "train")

    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        if self.global_step < self.hparams.sft_warmup_steps:  # NLL of the chosen responses, no reference
            chosen_logps = step_logps(self.policy, chosen_side(batch), num_steps(batch), self.lean)
            loss = sft_loss(chosen_logps.sum(-1), chosen_token_counts(batch), None)
            if not self._finite_on_every_rank(loss):
                return self._nonfinite_step(loss, batch_idx)
            self.log("train/sft_loss", loss.detach(), batch_size=num_pairs(batch))
            return loss
        step_scores = self.missing_scores(batch)  # [2B, S], a reward model's where the batch has none
        out = self.objective(batch, step_scores)
        if not self._finite_on_every_rank(out.loss):
            return self._nonfinite_step(out.loss, batch_idx)
        self.log_dict(_losses(out, "train"), prog_bar=False, batch_size=num_pairs(batch))
        self.log("train_loss", out.loss.detach(), prog_bar=True, logger=False, batch_size=num_pairs(batch))
        self.train_metrics.update(**self._metric_inputs(batch, out, step_scores))
        return out.loss

    def on_validation_batch_start(self, batch: PairBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.reference.begin_batch(self.trainer, "val")

    def on_test_batch_start(self, batch: PairBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.reference.begin_batch(self.trainer, "val")

    def on_predict_batch_start(self, batch: PairBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.reference.begin_batch(self.trainer, "val")

    def validation_step(self, batch: PairBatch, batch_idx: int) -> dict:
        return self._eval_step(batch, "val")

    def test_step(self, batch: PairBatch, batch_idx: int) -> dict:
        return self._eval_step(batch, "test")

    def _eval_step(self, batch: PairBatch, stage: str) -> dict:
        """Logs the losses and updates the metrics; returns the metric inputs (callbacks such
        as `stepwise_lit.evaluation.report.StepRewardReport` get them as `outputs`)."""
        step_scores = self.missing_scores(batch)
        out = self.objective(batch, step_scores)
        # Lightning sums value x batch_size and batch_size over the epoch and across ranks. The
        # pair losses are weighted by the rows that count, so they log the mean over every real
        # pair; the per-token SFT loss by the (weighted) chosen tokens, so it logs −Σ log p / Σ
        # tokens over the split, the same however the pairs are batched or sharded.
        weights = batch.get("pair_weights")
        pairs = torch.ones(num_pairs(batch), device=self.device) if weights is None else weights
        losses = _losses(out, stage)
        sft_name = f"{stage}/sft_loss"
        self.log(sft_name, losses.pop(sft_name), batch_size=float((pairs * chosen_token_counts(batch)).sum()), sync_dist=True)
        self.log_dict(losses, batch_size=float(pairs.sum()), sync_dist=True)
        inputs = self._metric_inputs(batch, out, step_scores)
        self.val_metrics.update(**inputs)
        return inputs

    def predict_step(self, batch: PairBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Implicit rewards per pair and per step: `chosen_rewards`/`rejected_rewards` [B] and
        `chosen_step_rewards`/`rejected_step_rewards` [B, S] (zero past a response's steps).
        Missing step scores are not filled: they enter only the losses, which predict drops."""
        out = self.objective(batch, batch["step_scores"])
        return {
            "chosen_rewards": chosen(out.rewards),
            "rejected_rewards": rejected(out.rewards),
            "chosen_step_rewards": chosen(out.step_rewards),
            "rejected_step_rewards": rejected(out.step_rewards),
        }

    def _metric_inputs(self, batch: PairBatch, out: Objective, step_scores: torch.Tensor) -> dict:
        """The `PreferenceMetrics.update` arguments of a batch whose verifier step scores are
        `step_scores`: ``[2B, ...]`` tensors (chosen rows, then rejected), the pair count, the weights."""
        return dict(
            rewards=out.rewards,  # β_o ρ(y), [2B]
            step_rewards=out.step_rewards,  # h_t, [2B, S]
            step_scores=step_scores,
            step_mask=batch["step_mask"],
            verifier_rewards=out.verifier_rewards,
            logps=out.policy_logps,
            num_pairs=num_pairs(batch),
            weight=batch.get("pair_weights"),
        )

    # -------------------------------------------------------- non-finite loss
    def _finite_on_every_rank(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (agreed across ranks, so all take the same branch)."""
        finite = bool(torch.isfinite(loss))
        return self.trainer.strategy.reduce_boolean_decision(finite, all=True) if self._trainer is not None else finite

    def _nonfinite_step(self, loss: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Stops (`nonfinite_loss: error`) or marks the optimizer step to be skipped (`skip`).

        The loss still goes through backward on every rank, so DDP's and FSDP's gradient
        collectives stay in step; `on_before_optimizer_step` then drops the gradients, so the
        optimizer changes no weight and no state (the learning-rate schedule still advances).
        """
        if self.hparams.nonfinite_loss == "error":
            raise FloatingPointError(
                f"non-finite training loss at global step {self.global_step}, batch {batch_idx} "
                f"(this rank's loss: {loss.item()}). Lower the learning rate, check the data, or set "
                "model.nonfinite_loss: skip to skip such steps."
            )
        self._skip_optimizer_step = True
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Steps, then frees the gradients at once: Lightning zeroes them inside the next step's
        closure, after its forward, so they would sit through that forward (one copy of the
        trainable weights more at the memory peak)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._skip_optimizer_step:
            return
        self._skip_optimizer_step = False
        optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        log.warning("skipped step %d: non-finite loss (%d skipped so far)", self.global_step, self.nonfinite_steps)
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Adds each rank's RNG, the skipped-step count and the reference's entries. With LoRA the
        frozen base weights are left out of the state dict (unless FSDP shards the policy): like the
        reference, they are rebuilt from their source on load (`with_base_weights`); for the embedded
        model the checkpoint keeps the RNG state it was built from (docs/distributed.md, "What a checkpoint holds")."""
        checkpoint["rng_states"] = gather_rng_states()
        checkpoint["nonfinite_steps"] = self.nonfinite_steps
        checkpoint.update(self.reference.state_dict())
        if self.saves_adapter_only():
            base = self.base_state_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in base}
            if self.base_rng_state is not None:
                checkpoint[TINY_MODEL_RNG_KEY] = self.base_rng_state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Puts back the base weights a LoRA checkpoint left out, then restores the skipped-step
        count, the reference's entries and, with as many ranks as saved it, each rank's RNG."""
        if self.saves_adapter_only():
            checkpoint["state_dict"] = self.with_base_weights(checkpoint)
        self.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)
        self.reference.load_state_dict(checkpoint)
        states = checkpoint.get("rng_states", [])
        if len(states) == self.trainer.world_size:
            set_rng_state(states[self.global_rank])
        elif states:
            log.warning(
                "the checkpoint holds the RNG states of %d ranks and this run has %d: RNG not restored",
                len(states), self.trainer.world_size,
            )

    def saves_adapter_only(self) -> bool:
        """Whether checkpoints hold only the trainable weights: with LoRA, when no FSDP strategy shards
        the policy (those load their state dicts themselves, before `on_load_checkpoint`)."""
        return self.lora is not None and not is_sharded(self.policy)

    def base_state_keys(self) -> set[str]:
        """The state-dict keys (``policy.*``) of the policy's frozen weights: under LoRA its base."""
        return {POLICY_PREFIX + key for key in frozen_state_keys(self.policy)}

    def with_base_weights(self, checkpoint: dict) -> dict[str, torch.Tensor]:
        """The checkpoint's state dict completed with the frozen base weights it left out, rebuilt as
        at start: from `model_name_or_path`, or the embedded model from the RNG state it was first
        built from (when this run built it from another, e.g. another seed, the models are rebuilt
        from that state, the reference included). Weights the checkpoint holds win, so a checkpoint
        with its base (older ones) loads as before; Lightning then loads the result strictly.

        Raises:
            SettingError: naming ``ckpt_path`` when the checkpoint lacks a trainable weight.
        """
        state = checkpoint["state_dict"]
        built_from = checkpoint.get(TINY_MODEL_RNG_KEY)
        if built_from is not None and self.base_rng_state is not None and not torch.equal(built_from, self.base_rng_state):
            self.policy = None
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(built_from)
                self.configure_model()
        own, base = self.state_dict(), self.base_state_keys()
        missing = [key for key in own if key not in base and key not in state]
        if missing:
            raise SettingError(
                f"ckpt_path: {self.trainer.ckpt_path} lacks {len(missing)} trainable weights of this policy, e.g. "
                f"{missing[0]}; resume with the model.lora settings it was trained with"
            )
        return {**{key: own[key] for key in base}, **state}

    # ----------------------------------------------------------------- metrics
    def _log_epoch_metrics(self, metrics: PreferenceMetrics, stage: str) -> None:
        values = metrics.compute()
        scalars = {f"{stage}/{k}": v for k, v in values.items() if v.numel() == 1}
        if self.hparams.evaluate_step_accuracy:  # else the metrics compute no step keys
            headline = "step_accuracy" if self.hparams.step_accuracy_metric == "accuracy" else "step_auroc"
            if headline in values:
                scalars[f"{stage}/step_metric"] = values[headline]
        # Already global (torchmetrics syncs its states); sync_dist only averages equal values
        # and spares Lightning's per-metric warning under DDP.
        self.log_dict(scalars, prog_bar=False, sync_dist=True)
        self.log(f"{stage}_reward_acc", values["reward_accuracy"], prog_bar=True, logger=False, sync_dist=True)
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics(self.train_metrics, "train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics(self.val_metrics, "test")


def _losses(out: Objective, stage: str) -> dict[str, torch.Tensor]:
    """The loss values to log, by their logged names."""
    return {f"{stage}/loss": out.loss, f"{stage}/step_loss": out.step_loss, f"{stage}/outcome_loss": out.outcome_loss,
            f"{stage}/sft_loss": out.sft_loss}


def check_module_settings(hp) -> None:
    """Fails at start-up, naming the setting, on a choice outside its values (when built from
    Python; the CLI's parser checks them first) or a combination the module cannot run.

    Raises:
        SettingError: naming ``model.<setting>``.
    """
    for setting, choices in CHOICES.items():
        valid = get_args(choices)
        if hp[setting] not in valid and not (setting in ("dtype", "attention") and hp[setting] is None):
            raise SettingError(f"model.{setting}: unknown value {hp[setting]!r}; choose one of {', '.join(valid)}")
    if hp.sft_warmup_steps < 0:
        raise SettingError(f"model.sft_warmup_steps: must be >= 0, got {hp.sft_warmup_steps}")
    if hp.sft_warmup_steps and hp.reference != "copy":
        raise SettingError(f"model.sft_warmup_steps: needs reference: copy (the reference is re-frozen from the "
                           f"policy), not {hp.reference!r}")
    if hp.reference == "adapter" and hp.lora is None:
        raise SettingError("model.reference: 'adapter' needs LoRA (set model.lora): the reference is the policy "
                           "with adapters disabled")
