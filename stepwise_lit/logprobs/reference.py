"""The reference: where the per-step reference log-probs of a batch come from.

Every mode answers `step_logps(batch, num_steps)` (float ``[2B, S]``, no gradients):

- `FrozenCopyReference` (``reference: copy``): a frozen model; its FSDP1 wrap and DDP
  broadcast (`place`), its FSDP2 reshard after each use, and its re-freeze after the SFT
  warm-up (`refreeze_from`, kept in checkpoints: it cannot be rebuilt from its source).
- `AdapterReference` (``adapter``): the policy with its LoRA adapters disabled.
- `PrecomputedReference` (``precomputed``, in `stepwise_lit.logprobs.precomputed`): a reference
  pass inside the run writes a cache, then batches are looked up by their ``row_index``.
- `NoReference` (``none``): zeros (reference-free: log-ratios are log-probs).

A reference is a plain object, not a `torch.nn.Module`: the frozen model it holds is never
registered with the LightningModule, so it is never in `parameters()`, the optimizer, DDP's
reducer or a checkpoint's state dict. The LightningModule passes every device move and dtype
conversion (`_apply`, which `.to()` and Lightning's `bf16-true` conversion call) on to
`models()`.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from stepwise_lit.data.batch import PairBatch
from stepwise_lit.logprobs.forward import step_logps
from stepwise_lit.logprobs.lean import LeanLogps
from stepwise_lit.models.distributed import (
    broadcast_module,
    is_sharded,
    load_whole_state_dict,
    reshard_frozen,
    whole_state_dict,
)


class Reference:
    """Per-step reference log-probs of a batch; the base is the interface, with no-op hooks."""

    def step_logps(self, batch: PairBatch, num_steps: int) -> torch.Tensor:
        """Float ``[2B, S]`` reference log-probs of the batch's responses (chosen, then rejected)."""
        raise NotImplementedError

    def models(self) -> list[torch.nn.Module]:
        """The models this reference holds outside the LightningModule's registry."""
        return []

    def place(self, trainer: L.Trainer, device: torch.device) -> None:
        """Called at the start of fit, validate, test and predict, after the strategy's setup."""

    def begin_batch(self, trainer: L.Trainer, split: str) -> None:
        """Called before each batch of `split` ("train" or "val") reaches the step."""

    def state_dict(self) -> dict:
        """Entries for the checkpoint (top level, beside the LightningModule's)."""
        return {}

    def load_state_dict(self, checkpoint: dict) -> None:
        """Restores what `state_dict` saved."""


class NoReference(Reference):
    """``reference: none``: zeros, so log-ratios are the policy's log-probs."""

    def step_logps(self, batch: PairBatch, num_steps: int) -> torch.Tensor:
        return torch.zeros(batch["step_mask"].shape[0], num_steps, device=batch["step_mask"].device)


class AdapterReference(Reference):
    """``reference: adapter``: the (PEFT) policy with its adapters disabled; no second copy.

    Args:
        policy: The PEFT policy.
        lean: The run's lean path (`stepwise_lit.logprobs.forward.step_logps`).
    """

    def __init__(self, policy: torch.nn.Module, lean: LeanLogps | None = None) -> None:
        self.policy = policy
        self.lean = lean

    @torch.no_grad()
    def step_logps(self, batch: PairBatch, num_steps: int) -> torch.Tensor:
        with self.policy.disable_adapter():
            return step_logps(self.policy, batch, num_steps, self.lean)


class FrozenCopyReference(Reference):
    """``reference: copy``: a frozen model (eval mode, no gradients).

    Args:
        model: The frozen model (see `stepwise_lit.models.loading.frozen_copy`).
        lean: The run's lean path (`stepwise_lit.logprobs.forward.step_logps`).
    """

    def __init__(self, model: torch.nn.Module, lean: LeanLogps | None = None) -> None:
        self.model = model
        self.lean = lean
        self.from_warmup = False  # re-frozen from the policy after the SFT warm-up
        self.replicated = False  # DDP: rank 0's weights copied to every rank

    @torch.no_grad()
    def step_logps(self, batch: PairBatch, num_steps: int) -> torch.Tensor:
        values = step_logps(self.model, batch, num_steps, self.lean)
        reshard_frozen(self.model)
        return values

    def models(self) -> list[torch.nn.Module]:
        return [self.model]

    def place(self, trainer: L.Trainer, device: torch.device) -> None:
        """Under FSDP1 wraps the model with the strategy's settings (auto-wrap policy included),
        a root of its own; under DDP copies rank 0's weights to every rank once, as DDP does for
        the policy (ranks seeded differently build different embedded models)."""
        strategy = trainer.strategy
        if isinstance(strategy, FSDPStrategy) and not is_sharded(self.model):
            from torch.distributed.fsdp.wrap import wrap

            with strategy.model_sharded_context():
                self.model = wrap(self.model)
        self.model.to(device)
        if isinstance(strategy, DDPStrategy) and not self.replicated:
            broadcast_module(self.model)
            self.replicated = True

    @torch.no_grad()
    def refreeze_from(self, policy: torch.nn.Module) -> None:
        """Makes the reference a frozen copy of the policy's current weights; a PEFT policy's
        adapters are merged into a copy of it first (the reference is a plain model)."""
        if hasattr(policy, "merge_and_unload"):
            state = _merged_copy(policy).state_dict()
        else:
            state = policy.state_dict()
        self.model.load_state_dict(state)
        self.from_warmup = True

    def state_dict(self) -> dict:
        return {"warmup_reference_state_dict": whole_state_dict(self.model)} if self.from_warmup else {}

    def load_state_dict(self, checkpoint: dict) -> None:
        if "warmup_reference_state_dict" in checkpoint:
            load_whole_state_dict(self.model, checkpoint["warmup_reference_state_dict"])
            self.from_warmup = True


def _merged_copy(policy: torch.nn.Module) -> torch.nn.Module:
    """A plain model with the PEFT policy's adapters merged into a deep copy of its base weights."""
    return copy.deepcopy(policy).merge_and_unload()
