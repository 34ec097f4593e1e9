"""StepwiseDPOModule: policy and reference step log-probs, verifier rewards, step + outcome DPO losses."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from stepwise_lit.errors import SettingError
from stepwise_lit.distributed import (
    broadcast_module,
    decoder_layers,
    full_state_dict,
    fully_shard_causal_lm,
    is_sharded,
    load_whole_state_dict,
    reshard_frozen,
    whole_state_dict,
)
from stepwise_lit.faults import CheckpointOnSignal, gather_rng_states, set_rng_state
from stepwise_lit.data.packing import CHOSEN_REST, packed_attention_mask
from stepwise_lit.logps import next_token_targets, target_step_logps
from stepwise_lit.losses import (
    AGGREGATION_STRATEGIES,
    OUTCOME_LOSS_TYPES,
    STEP_LOSS_TYPES,
    aggregate_rewards,
    outcome_loss,
    step_loss,
)
from stepwise_lit.metrics import PreferenceMetrics
from stepwise_lit.models import LoraSettings, TinyModelConfig, apply_lora, frozen_copy, load_causal_lm
from stepwise_lit.precompute import PrecomputedReference
from stepwise_lit.rewards.base import StepScorer
from stepwise_lit.tokenizer import load_tokenizer

log = logging.getLogger("stepwise_lit")

ReferenceMode = Literal["copy", "adapter", "precomputed", "none"]


STEP_ACCURACY_METRICS = ("accuracy", "auroc")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LEAN_CHUNK_ELEMENTS = 2**25
"""`lean_logps`: LM-head outputs per chunk (positions x vocabulary): 128 MiB in fp32."""


class StepwiseDPOModule(L.LightningModule):
    """Stepwise DPO: step-level and outcome-level preference losses from verifier step scores.

    Args:
        model_name_or_path: Policy weights (hub id or local folder). None builds the embedded
            tiny Llama-architecture model from `tiny_model` (nothing downloaded).
        tokenizer_name_or_path: Tokenizer; None uses `model_name_or_path`, or the embedded
            byte-level tokenizer when that is None too. The CLI passes it on to the data module.
        tiny_model: Shape of the embedded model (used only when `model_name_or_path` is None).
        trust_remote_code: Allow code from the model repository. Off unless you set it.
        dtype: Weight dtype at load ("float32", "bfloat16", "float16"); None keeps the
            checkpoint's. Mixed precision is the trainer's `precision` setting.
        reference: Where reference log-probs come from: "copy" (a frozen model), "adapter"
            (the policy with LoRA adapters disabled, no second copy), "precomputed" (batches
            carry `reference_step_logps`), or "none" (reference-free: log-ratios are log-probs).
        ref_model_name_or_path: Reference weights for `reference: copy`; None copies the policy's
            initial weights.
        lora: LoRA settings; None trains every weight.
        step_beta: β_s, the scale of the implicit step reward h_t = β_s ρ_t. Must be > 0.
        outcome_beta: β_o, the scale of the outcome margin z = β_o (ρ(y_c) − ρ(y_r)). Must be > 0.
        outcome_loss_type: One of "sigmoid", "soft_label", "margin", "distill", "ipo".
        step_loss_type: One of "reward_weighted", "step_bce", "first_divergence".
        aggregation_strategy: How step scores become an outcome reward: "sum", "mean",
            "weighted_sum", "min", "max", "last", "product", "discounted".
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
        sft_warmup_steps: Optimizer steps of supervised fine-tuning on the chosen responses
            (per-token NLL alone, no reference forward) before the preference losses start;
            then the reference (`reference: copy`) is re-frozen from the policy, as in the usual
            SFT → DPO recipe. Meant for a randomly initialised policy (the embedded default):
            against a random reference, gains on a response's template text would swamp the
            step rewards. The re-frozen reference goes into checkpoints, since it cannot be
            rebuilt from its source.
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
            positions a chunk at a time (`stepwise_lit.logps.step_logps_from_hidden`): no
            `[2B, L, V]` logits tensor exists, which matters for large vocabularies (at 128k,
            under a third of the plain way's peak; see BENCHMARKS.md). For LM heads without
            bias, softcapping or logit scaling (Llama, Mistral, Qwen2...); not under FSDP.
        nonfinite_loss: On a NaN/inf loss, "error" stops with a message; "skip" skips the
            optimizer step and counts it (logged as `train/nonfinite_steps`).
        export_dir: Where `export_hf` writes at the end of fit; None: `<default_root_dir>/export`.
        export_on_fit_end: Export the policy when `fit` finishes.
        optimizer: Optimizer factory, applied to the policy's trainable parameters only.
        scheduler: Optional LR scheduler factory (stepped every optimizer step).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        tokenizer_name_or_path: str | None = None,
        tiny_model: TinyModelConfig | None = None,
        trust_remote_code: bool = False,
        dtype: str | None = None,
        reference: ReferenceMode = "copy",
        ref_model_name_or_path: str | None = None,
        lora: LoraSettings | None = None,
        step_beta: float = 0.1,
        outcome_beta: float = 0.1,
        outcome_loss_type: str = "soft_label",
        step_loss_type: str = "reward_weighted",
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
        sft_warmup_steps: int = 0,
        evaluate_step_accuracy: bool = True,
        step_accuracy_metric: str = "accuracy",
        reward_model: StepScorer | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        lean_logps: bool = False,
        nonfinite_loss: Literal["error", "skip"] = "error",
        export_dir: str | None = None,
        export_on_fit_end: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["reward_model", "optimizer", "scheduler"])
        self.tiny_model = tiny_model or TinyModelConfig()
        _check_settings(self.hparams)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tokenizer = load_tokenizer(tokenizer_name_or_path or model_name_or_path, trust_remote_code)
        # Models are built in `configure_model`, so sharded strategies can wrap them there.
        self.policy: torch.nn.Module | None = None
        # Kept outside the registered submodules: never in `parameters()`, the optimizer,
        # DDP's reducer or a checkpoint's state dict.
        self.__dict__["reference_model"] = None
        self.__dict__["reward_model"] = reward_model
        if reward_model is not None:
            reward_model.eval().requires_grad_(False)
        self.train_metrics = PreferenceMetrics(step_metrics=evaluate_step_accuracy)
        self.val_metrics = PreferenceMetrics(step_metrics=evaluate_step_accuracy)
        self.nonfinite_steps = 0
        self._skip_optimizer_step = False  # set by a non-finite loss under nonfinite_loss: skip
        self._reference_from_warmup = False  # the reference was re-frozen after the SFT warm-up
        self._reference_replicated = False  # DDP: rank 0's reference copied to every rank
        self.reference_fingerprint: str | None = None  # reference: precomputed (kept in checkpoints)

    # ------------------------------------------------------------------ models
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        dtype = _DTYPES[hp.dtype] if hp.dtype else None
        base = load_causal_lm(hp.model_name_or_path, self.tokenizer, self.tiny_model, hp.trust_remote_code, dtype)
        if hp.reference == "copy":
            if hp.ref_model_name_or_path is None:
                reference = frozen_copy(base)
            else:
                reference = frozen_copy(
                    load_causal_lm(hp.ref_model_name_or_path, self.tokenizer, self.tiny_model, hp.trust_remote_code, dtype)
                )
            self.__dict__["reference_model"] = reference
        policy = apply_lora(base, hp.lora) if hp.lora is not None else base
        if hp.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hp.lora is not None:
                policy.enable_input_require_grads()
        self.policy = policy
        fsdp1 = self._trainer is not None and isinstance(self._trainer.strategy, FSDPStrategy)
        if hp.lean_logps:
            _check_lean_head(base, sharded=self.device_mesh is not None or fsdp1)
        if self.device_mesh is not None:
            self._fully_shard_models()
        if hp.compile:
            if fsdp1:
                raise SettingError("model.compile: not supported with FSDPStrategy (FSDP1); use ModelParallelStrategy (FSDP2)")
            for model in (self.policy, self.reference_model):
                for layer in decoder_layers(model) if model is not None else ():
                    layer.compile(dynamic=True)

    def _fully_shard_models(self) -> None:
        """FSDP2 (`ModelParallelStrategy`): shards the decoder layers of the policy and of the
        reference over the data-parallel mesh, each model its own root."""
        if self.device_mesh["tensor_parallel"].size() > 1:
            raise SettingError(
                "trainer.strategy: this module shards with FSDP2 over data parallelism only; set "
                "tensor_parallel_size: 1 and data_parallel_size to the number of processes (see configs/fsdp.yaml)"
            )
        for model in (self.policy, self.reference_model):
            if model is not None:
                fully_shard_causal_lm(model, self.device_mesh["data_parallel"])

    def setup(self, stage: str) -> None:
        self.configure_model()

    def _place_frozen_models(self) -> None:
        """Moves the unregistered reference and reward models to the policy's device.

        Under FSDP1 the reference is first wrapped with the strategy's settings (auto-wrap
        policy included), a root of its own; under DDP rank 0's reference is copied to every
        rank once, as DDP does for the policy (ranks seeded differently build different
        embedded models).
        """
        strategy = self.trainer.strategy
        reference = self.reference_model
        if isinstance(strategy, FSDPStrategy) and reference is not None and not is_sharded(reference):
            from torch.distributed.fsdp.wrap import wrap

            with strategy.model_sharded_context():
                self.__dict__["reference_model"] = wrap(reference)
        for frozen in (self.reference_model, self.reward_model):
            if frozen is not None:
                frozen.to(self.device)
        if isinstance(strategy, DDPStrategy) and reference is not None and not self._reference_replicated:
            broadcast_module(reference)
            self._reference_replicated = True

    def on_fit_start(self) -> None:
        self._place_frozen_models()

    def on_validation_start(self) -> None:
        self._place_frozen_models()

    def on_test_start(self) -> None:
        self._place_frozen_models()

    def on_predict_start(self) -> None:
        self._place_frozen_models()

    def configure_callbacks(self) -> list[L.Callback]:
        """A checkpoint on SIGTERM or SIGINT (see `stepwise_lit.faults.CheckpointOnSignal`) and, with
        `reference: precomputed`, the reference pass and lookup (`stepwise_lit.precompute`)."""
        callbacks = [CheckpointOnSignal()]
        if self.hparams.reference == "precomputed":  # fills batch["reference_step_logps"]
            callbacks.append(PrecomputedReference())
        return callbacks

    def configure_optimizers(self):
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(trainable)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --------------------------------------------------------------- log-probs
    def _step_logps(self, model: torch.nn.Module, batch: dict, num_steps: int) -> torch.Tensor:
        """Per-step log-probs ``[2B, S]`` (chosen rows, then rejected) of an unpacked or a
        packed batch (``data.pack_pairs``), from one forward pass of ``model``."""
        if "segment_ids" in batch:  # one row per pair, [prefix | chosen rest | rejected rest]
            inputs = {
                "input_ids": batch["input_ids"],
                "position_ids": batch["position_ids"],
                "attention_mask": _packed_mask_for(model, batch),  # [B, 1, L, L]
            }
            target_ids, target_step_ids = batch["target_ids"], batch["target_step_ids"]  # [B, L, 2]
        else:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            target_ids, target_step_ids = next_token_targets(batch["input_ids"], batch["step_ids"])  # [2B, L, 1]
        if self.hparams.lean_logps:  # the decoder's hidden states, then the LM head in chunks
            hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
            weight = model.get_output_embeddings().weight
            chunk_size = max(1, LEAN_CHUNK_ELEMENTS // weight.shape[0])
            logps = target_step_logps(hidden, target_ids, target_step_ids, num_steps, weight, chunk_size)
        else:
            logits = model(**inputs, use_cache=False).logits
            logps = target_step_logps(logits, target_ids, target_step_ids, num_steps)
        return logps.transpose(0, 1).reshape(-1, num_steps)  # [N, K, S] -> [K·N, S]

    @torch.no_grad()
    def _reference_step_logps(self, batch: dict, num_steps: int) -> torch.Tensor:
        mode = self.hparams.reference
        if mode == "copy":
            reference_logps = self._step_logps(self.reference_model, batch, num_steps)
            reshard_frozen(self.reference_model)
            return reference_logps
        if mode == "adapter":
            with self.policy.disable_adapter():
                return self._step_logps(self.policy, batch, num_steps)
        if mode == "precomputed":
            if "reference_step_logps" not in batch:
                raise RuntimeError(
                    "reference: precomputed, but the batch carries no 'reference_step_logps'; "
                    "run the reference pass first (see README, 'Precomputed reference')."
                )
            return batch["reference_step_logps"][:, :num_steps].float()
        return torch.zeros(batch["step_mask"].shape[0], num_steps, device=self.device)

    # ----------------------------------------------------------------- rewards
    def _fill_missing_scores(self, batch: dict) -> None:
        """Scores, with the reward model, the rows whose step scores are missing."""
        missing = (~batch["has_step_scores"]).nonzero().flatten().tolist()
        if not missing:
            return
        if self.reward_model is None:
            raise RuntimeError(
                f"{len(missing)} rows in this batch have no step scores and no reward_model is set: "
                "score the data first (python -m stepwise_lit.score) or set model.reward_model."
            )
        num_pairs = len(batch["prompts"])
        scores = self.reward_model.score_steps(
            [batch["prompts"][row % num_pairs] for row in missing],
            [batch["steps"][row] for row in missing],
            [batch["reference_solutions"][row % num_pairs] for row in missing],
        )
        for row, row_scores in zip(missing, scores):
            batch["step_scores"][row, : len(row_scores)] = torch.tensor(row_scores, dtype=batch["step_scores"].dtype)
        batch["has_step_scores"][missing] = True

    def _outcome_rewards(self, batch: dict) -> torch.Tensor:
        """Verifier outcome rewards R = A(g), mixed with outcome scores where rows carry them. [2B]"""
        hp = self.hparams
        rewards = aggregate_rewards(
            batch["step_scores"], batch["step_mask"], hp.aggregation_strategy, hp.step_weights, hp.discount_gamma
        )
        mixed = (1 - hp.outcome_score_weight) * rewards + hp.outcome_score_weight * batch["outcome_scores"]
        return torch.where(batch["has_outcome_scores"], mixed, rewards)

    # ------------------------------------------------------------------ losses
    def _shared_step(self, batch: dict) -> dict[str, torch.Tensor]:
        hp = self.hparams
        self._fill_missing_scores(batch)
        num_pairs = batch["first_divergence"].shape[0]
        num_steps = batch["step_mask"].shape[1]
        # The reference first: its buffers come and go before the policy's activations pile up
        # (bench model: lower peak RSS and faster steps than the other order, see BENCHMARKS.md).
        reference_step_logps = self._reference_step_logps(batch, num_steps)  # [2B, S]
        policy_step_logps = self._step_logps(self.policy, batch, num_steps)  # [2B, S]
        step_logratios = (policy_step_logps - reference_step_logps) * batch["step_mask"]  # ρ_t, [2B, S]
        logratios = step_logratios.sum(-1)  # ρ(y), [2B]
        rewards = self._outcome_rewards(batch)  # R, [2B]
        chosen, rejected = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
        scores, mask = batch["step_scores"], batch["step_mask"]

        outcome_losses = outcome_loss(
            logratios[chosen], logratios[rejected], rewards[chosen], rewards[rejected],
            beta=hp.outcome_beta, loss_type=hp.outcome_loss_type, tau=hp.soft_label_tau, gamma=hp.margin_gamma,
        )
        step_losses = step_loss(
            step_logratios[chosen], step_logratios[rejected], scores[chosen], scores[rejected],
            mask[chosen], mask[rejected], beta=hp.step_beta, loss_type=hp.step_loss_type,
            alpha=hp.step_reward_scale, divergence=batch["first_divergence"],
        )
        weights = batch.get("pair_weights")  # [B]; 0 for rows that only pad a distributed evaluation shard
        step_loss_mean, outcome_loss_mean = _pair_mean(step_losses, weights), _pair_mean(outcome_losses, weights)
        loss = hp.step_loss_weight * step_loss_mean + hp.outcome_loss_weight * outcome_loss_mean
        sft_loss = _sft_loss(policy_step_logps[chosen].sum(-1), _chosen_token_counts(batch), weights)
        if hp.sft_weight:
            loss = loss + hp.sft_weight * sft_loss
        return {
            "loss": loss,
            "step_loss": step_loss_mean.detach(),
            "outcome_loss": outcome_loss_mean.detach(),
            "sft_loss": sft_loss.detach(),
            "policy_step_logps": policy_step_logps.detach(),
            "step_logratios": step_logratios.detach(),
            "logratios": logratios.detach(),
            "rewards": rewards,
        }

    def _metric_inputs(self, batch: dict, out: dict) -> dict[str, torch.Tensor | int | None]:
        """The `PreferenceMetrics.update` arguments of a batch: implicit and verifier rewards,
        per response and per step, step scores and masks, and the per-pair weights."""
        hp = self.hparams
        return dict(
            rewards=hp.outcome_beta * out["logratios"],  # [2B]
            step_rewards=hp.step_beta * out["step_logratios"],  # h_t, [2B, S]
            step_scores=batch["step_scores"],
            step_mask=batch["step_mask"],
            verifier_rewards=out["rewards"],
            logps=out["policy_step_logps"].sum(-1),
            num_pairs=batch["first_divergence"].shape[0],
            weight=batch.get("pair_weights"),
        )

    def _in_sft_warmup(self) -> bool:
        return self.global_step < self.hparams.sft_warmup_steps

    def _sft_warmup_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per-token NLL of the chosen responses alone (no reference forward)."""
        chosen_logps = self._step_logps(self.policy, _chosen_side(batch), batch["step_mask"].shape[1]).sum(-1)  # [B]
        return {"loss": _sft_loss(chosen_logps, _chosen_token_counts(batch), None)}

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """At the end of the SFT warm-up, re-freezes the reference from the policy (once)."""
        warmup = self.hparams.sft_warmup_steps
        if warmup and self.global_step == warmup and not self._reference_from_warmup:
            self.reference_model.load_state_dict(self.policy.state_dict())
            self._reference_from_warmup = True
            log.info("SFT warm-up done after %d steps: the reference is now a frozen copy of the policy", warmup)

    def training_step(self, batch: dict, batch_idx: int):
        if self._in_sft_warmup():
            out = self._sft_warmup_step(batch)
            if not self._finite_on_every_rank(out["loss"]):
                return self._nonfinite_step(out["loss"], batch_idx)
            self.log("train/sft_loss", out["loss"].detach(), batch_size=batch["first_divergence"].shape[0])
            return out["loss"]
        out = self._shared_step(batch)
        if not self._finite_on_every_rank(out["loss"]):
            return self._nonfinite_step(out["loss"], batch_idx)
        batch_size = batch["first_divergence"].shape[0]
        self.log_dict(
            {f"train/{k}": out[k] for k in ("loss", "step_loss", "outcome_loss", "sft_loss")},
            prog_bar=False, batch_size=batch_size,
        )
        self.log("train_loss", out["loss"].detach(), prog_bar=True, logger=False, batch_size=batch_size)
        self.train_metrics.update(**self._metric_inputs(batch, out))
        return out["loss"]

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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = gather_rng_states()
        checkpoint["nonfinite_steps"] = self.nonfinite_steps
        checkpoint["reference_fingerprint"] = self.reference_fingerprint
        if self._reference_from_warmup:
            checkpoint["warmup_reference_state_dict"] = whole_state_dict(self.reference_model)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restores the skipped-step count and, with as many ranks as saved it, each rank's RNG."""
        self.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)
        self.reference_fingerprint = checkpoint.get("reference_fingerprint")
        if "warmup_reference_state_dict" in checkpoint:
            load_whole_state_dict(self.reference_model, checkpoint["warmup_reference_state_dict"])
            self._reference_from_warmup = True
        states = checkpoint.get("rng_states", [])
        if len(states) == self.trainer.world_size:
            set_rng_state(states[self.global_rank])
        elif states:
            log.warning(
                "the checkpoint holds the RNG states of %d ranks and this run has %d: RNG not restored",
                len(states), self.trainer.world_size,
            )

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor | None]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor | None]:
        return self._eval_step(batch, "test")

    def _eval_step(self, batch: dict, stage: str) -> dict[str, torch.Tensor | None]:
        """Logs the losses and updates the metrics; returns the metric inputs (callbacks such
        as `stepwise_lit.reports.StepRewardReport` get them as `outputs`)."""
        out = self._shared_step(batch)
        # Weighted by the rows that count: Lightning sums value x batch_size and batch_size over
        # the epoch and across ranks, so the logged value is the mean over every real row.
        weights = batch.get("pair_weights")
        batch_size = batch["first_divergence"].shape[0] if weights is None else float(weights.sum())
        self.log_dict(
            {f"{stage}/{k}": out[k] for k in ("loss", "step_loss", "outcome_loss", "sft_loss")},
            batch_size=batch_size, sync_dist=True,
        )
        inputs = self._metric_inputs(batch, out)
        self.val_metrics.update(**inputs)
        return inputs

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """Implicit rewards per pair and per step: `chosen_rewards`/`rejected_rewards` [B] and
        `chosen_step_rewards`/`rejected_step_rewards` [B, S] (zero past a response's steps)."""
        num_pairs = batch["first_divergence"].shape[0]
        num_steps = batch["step_mask"].shape[1]
        reference_step_logps = self._reference_step_logps(batch, num_steps)
        step_logratios = self._step_logps(self.policy, batch, num_steps) - reference_step_logps
        step_logratios = step_logratios * batch["step_mask"]  # ρ_t, zero past a response's steps, [2B, S]
        rewards = self.hparams.outcome_beta * step_logratios.sum(-1)  # [2B]
        step_rewards = self.hparams.step_beta * step_logratios  # h_t, [2B, S]
        return {
            "chosen_rewards": rewards[:num_pairs],
            "rejected_rewards": rewards[num_pairs:],
            "chosen_step_rewards": step_rewards[:num_pairs],
            "rejected_step_rewards": step_rewards[num_pairs:],
        }

    # ----------------------------------------------------------------- metrics
    def _log_epoch_metrics(self, metrics: PreferenceMetrics, stage: str) -> None:
        values = metrics.compute()
        scalars = {f"{stage}/{k}": v for k, v in values.items() if v.numel() == 1}
        if not self.hparams.evaluate_step_accuracy:
            scalars = {k: v for k, v in scalars.items() if "step_" not in k.split("/")[1]}
        else:
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

    # ------------------------------------------------------------------ export
    def on_fit_end(self) -> None:
        if self.hparams.export_on_fit_end:
            self.export_hf(self.hparams.export_dir or os.path.join(self.trainer.default_root_dir, "export"))

    def stepwise_config(self) -> dict:
        """The stepwise settings of this run (module and, when attached, data module)."""
        config = {k: v for k, v in self.hparams.items() if k not in ("tiny_model", "lora")}
        config["tiny_model"] = asdict(self.tiny_model)
        config["lora"] = asdict(self.hparams.lora) if self.hparams.lora is not None else None
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            config["data"] = dict(datamodule.hparams)
        return config

    def export_hf(self, directory: str | os.PathLike) -> Path:
        """Writes a Hugging Face folder: weights (safetensors), tokenizer, `stepwise_config.json`
        and `stepwise_config.pt`. Written to a temporary folder and renamed into place, so an
        interrupted export never leaves a folder that looks complete. Rank 0 writes.

        With LoRA, the adapter goes to `adapter/` and, when `lora.merge_on_export`, merged full
        weights go to the root (loadable with `AutoModelForCausalLM.from_pretrained`).
        """
        target = Path(directory)
        state_dict = self._full_policy_state_dict()
        if self._trainer is not None and not self.trainer.is_global_zero:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            self._write_export(staging, state_dict)
            if target.exists():
                retired = target.with_name(f".{target.name}.old-{os.getpid()}")
                target.rename(retired)
                staging.rename(target)
                shutil.rmtree(retired)
            else:
                staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        log.info("exported the policy to %s", target)
        return target

    def _full_policy_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The policy's full weights gathered on rank 0 when FSDP shards them (a collective: every
        rank calls it); None when every rank holds them whole."""
        if not is_sharded(self.policy):
            return None
        return full_state_dict(self.trainer.strategy.model, prefix="policy.")

    def _write_export(self, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        lora = self.hparams.lora
        if lora is None:
            self.policy.save_pretrained(folder, state_dict=state_dict)
        else:
            self.policy.save_pretrained(folder / "adapter", state_dict=state_dict)
            if lora.merge_on_export:
                self._whole_policy_copy(state_dict).merge_and_unload().save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        config = self.stepwise_config()
        (folder / "stepwise_config.json").write_text(json.dumps(config, indent=2, default=str))
        torch.save(json.loads(json.dumps(config, default=str)), folder / "stepwise_config.pt")

    def _whole_policy_copy(self, state_dict: dict[str, torch.Tensor] | None) -> torch.nn.Module:
        """An unsharded copy of the policy: a deep copy, or, when FSDP shards it, the policy
        rebuilt from its settings and loaded with the gathered `state_dict`."""
        if state_dict is None:
            return copy.deepcopy(self.policy)
        hp = self.hparams
        dtype = _DTYPES[hp.dtype] if hp.dtype else None
        base = load_causal_lm(hp.model_name_or_path, self.tokenizer, self.tiny_model, hp.trust_remote_code, dtype)
        policy = apply_lora(base, hp.lora)
        policy.load_state_dict(state_dict)
        return policy


def _pair_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over pairs, weighted by the batch's `pair_weights` when it has them (0 when all are 0)."""
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp(min=torch.finfo(values.dtype).tiny)


def _sft_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-token NLL of the chosen responses: −Σ log p / Σ tokens over (weighted) pairs.

    Args:
        chosen_logps: ``[B]`` sequence log-probs of the chosen responses.
        chosen_tokens: ``[B]`` their numbers of response tokens.
        weights: ``[B]`` pair weights, or None.
    """
    return -_pair_mean(chosen_logps, weights) / _pair_mean(chosen_tokens.float(), weights).clamp(min=1)


def _chosen_token_counts(batch: dict) -> torch.Tensor:
    """Response tokens of each chosen side, ``[B]``, in an unpacked or a packed batch."""
    if "segment_ids" in batch:
        return (batch["target_step_ids"][..., 0] > 0).sum(-1)
    num_pairs = batch["first_divergence"].shape[0]
    return (batch["step_ids"][:num_pairs, 1:] > 0).sum(-1)


def _chosen_side(batch: dict) -> dict[str, torch.Tensor]:
    """The token tensors of the chosen responses alone. Packed, the chosen side is each row's
    first ``c_end`` positions (prefix + chosen rest), so the rows are cut to the longest of those."""
    if "segment_ids" in batch:
        width = int((batch["segment_ids"] <= CHOSEN_REST).sum(-1).max())
        chosen = {key: batch[key][:, :width] for key in ("input_ids", "position_ids", "segment_ids")}
        chosen.update({key: batch[key][:, :width, :1] for key in ("target_ids", "target_step_ids")})
        return chosen
    num_pairs = batch["first_divergence"].shape[0]
    return {key: batch[key][:num_pairs] for key in ("input_ids", "attention_mask", "step_ids")}


def _packed_mask_for(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The 4D mask of a packed batch in the form `model`'s attention takes; fails, naming
    `data.pack_pairs`, for attention that takes no 4D mask or a sliding window the rows exceed."""
    config = model.config
    attention = config._attn_implementation
    if attention not in ("sdpa", "eager"):
        raise SettingError(
            f"data.pack_pairs: packed rows need a 4D attention mask, which {attention!r} attention does not "
            "take (sdpa and eager do); set data.pack_pairs: false"
        )
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is not None and int(batch["position_ids"].max()) >= window:
        raise SettingError(
            f"data.pack_pairs: a response is longer than the model's sliding window ({window} tokens), which "
            "the packed mask does not apply; set data.pack_pairs: false"
        )
    dtype = None if attention == "sdpa" else next(model.parameters()).dtype
    return packed_attention_mask(batch["segment_ids"], dtype)


def _check_lean_head(model: torch.nn.Module, sharded: bool) -> None:
    """`lean_logps` applies the LM-head weight itself: fail on heads it would get wrong, and under
    FSDP (the root's weights are gathered only inside the model's own forward)."""
    config = model.config
    if sharded:
        raise SettingError("model.lean_logps: not supported with FSDP strategies; set it to false")
    if model.get_output_embeddings().bias is not None or getattr(config, "final_logit_softcapping", None) or (
        getattr(config, "logit_scale", None) not in (None, 1.0)
    ):
        raise SettingError(
            f"model.lean_logps: {type(model).__name__}'s LM head has a bias, logit softcapping or logit "
            "scaling, which the lean path does not apply; set it to false"
        )


def _check_settings(hp) -> None:
    """Fails at start-up, naming the setting, on values the losses cannot use."""

    def bad(setting: str, problem: str) -> SettingError:
        return SettingError(f"model.{setting}: {problem}")

    choices = {
        "outcome_loss_type": OUTCOME_LOSS_TYPES,
        "step_loss_type": STEP_LOSS_TYPES,
        "aggregation_strategy": AGGREGATION_STRATEGIES,
        "step_accuracy_metric": STEP_ACCURACY_METRICS,
        "reference": ("copy", "adapter", "precomputed", "none"),
        "nonfinite_loss": ("error", "skip"),
    }
    for setting, valid in choices.items():
        if hp[setting] not in valid:
            raise bad(setting, f"unknown value {hp[setting]!r}; choose one of {', '.join(valid)}")
    for setting in ("step_beta", "outcome_beta", "soft_label_tau"):
        if not (math.isfinite(hp[setting]) and hp[setting] > 0):
            raise bad(setting, f"must be a finite number > 0, got {hp[setting]}")
    for setting in ("step_reward_scale", "outcome_score_weight"):
        if not 0.0 <= hp[setting] <= 1.0:
            raise bad(setting, f"must lie in [0, 1], got {hp[setting]}")
    for setting in ("step_loss_weight", "outcome_loss_weight", "sft_weight"):
        if not (math.isfinite(hp[setting]) and hp[setting] >= 0):
            raise bad(setting, f"must be a finite number >= 0, got {hp[setting]}")
    if hp.step_loss_weight + hp.outcome_loss_weight + hp.sft_weight == 0:
        raise bad("step_loss_weight", "step_loss_weight, outcome_loss_weight and sft_weight are all 0: nothing to train")
    if hp.step_weights is not None:
        if len(hp.step_weights) == 0 or not all(math.isfinite(w) for w in hp.step_weights):
            raise bad("step_weights", f"must be a non-empty list of finite numbers, got {hp.step_weights}")
        if hp.aggregation_strategy != "weighted_sum":
            raise bad("step_weights", f"is only used by aggregation_strategy: weighted_sum, not {hp.aggregation_strategy!r}")
    if not 0.0 < hp.discount_gamma <= 1.0:
        raise bad("discount_gamma", f"must lie in (0, 1], got {hp.discount_gamma}")
    if hp.sft_warmup_steps < 0:
        raise bad("sft_warmup_steps", f"must be >= 0, got {hp.sft_warmup_steps}")
    if hp.sft_warmup_steps and hp.reference != "copy":
        raise bad("sft_warmup_steps", f"needs reference: copy (the reference is re-frozen from the policy), not {hp.reference!r}")
    if hp.reference == "adapter" and hp.lora is None:
        raise bad("reference", "'adapter' needs LoRA (set model.lora): the reference is the policy with adapters disabled")
    if hp.dtype is not None and hp.dtype not in _DTYPES:
        raise bad("dtype", f"unknown dtype {hp.dtype!r}; choose one of {', '.join(_DTYPES)}")
