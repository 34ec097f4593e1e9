"""The reference modes (the `model.reference` setting) and the `Reference` each builds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from stepwise_lit.logprobs.lean import LeanLogps
from stepwise_lit.logprobs.precomputed import PrecomputedReference, reference_data
from stepwise_lit.logprobs.reference import AdapterReference, FrozenCopyReference, NoReference, Reference

ReferenceMode = Literal["copy", "adapter", "precomputed", "none"]


def build_reference(
    mode: ReferenceMode,
    policy: torch.nn.Module,
    frozen: torch.nn.Module | None,
    lean: LeanLogps | None,
    tokenizer: PreTrainedTokenizerBase,
    load_model: Callable[[], torch.nn.Module] | None = None,
    source: str | None = None,
    dtype: str | None = None,
) -> Reference:
    """The reference of `mode`.

    Args:
        mode: "copy" (`frozen`), "adapter" (`policy` with its LoRA adapters disabled), "precomputed"
            (a reference pass over the trainer's data module, cached) or "none" (zeros).
        policy: The policy (a PEFT model under LoRA).
        frozen: The frozen model of "copy" (`stepwise_lit.models.loading.frozen_copy`); None otherwise.
        lean: The run's lean path (`stepwise_lit.logprobs.forward.step_logps`).
        tokenizer: The run's tokenizer (part of the precomputed cache's key).
        load_model: For "precomputed": builds the reference model (``ref_model_name_or_path``);
            None: the policy's start is the reference.
        source: ``ref_model_name_or_path``, or None (part of the precomputed cache's key).
        dtype: The ``dtype`` setting (part of the precomputed cache's key).
    """
    if mode == "copy":
        return FrozenCopyReference(frozen, lean)
    if mode == "adapter":
        return AdapterReference(policy, lean)
    if mode == "precomputed":
        return PrecomputedReference(
            policy, tokenizer, lambda trainer: reference_data(trainer.datamodule),
            load_model=load_model, source=source, dtype=dtype, lean=lean,
        )
    return NoReference()
