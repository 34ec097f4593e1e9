"""The models of a run, built from its settings: the base causal LM and the policy on top of it
(LoRA adapters, gradient checkpointing). The reference built from them is chosen in
`stepwise_lit.logprobs.modes`."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stepwise_lit.models.loading import DTYPES, DtypeName, LoraSettings, TinyModelConfig, apply_lora, load_causal_lm


def build_base_model(
    name_or_path: str | None,
    tokenizer: PreTrainedTokenizerBase,
    tiny_model: TinyModelConfig,
    trust_remote_code: bool = False,
    dtype: DtypeName | None = None,
    attention: str | None = None,
    setting: str = "model.model_name_or_path",
) -> PreTrainedModel:
    """A causal LM from `name_or_path` (None: the embedded tiny model of shape `tiny_model`), its
    weights in `dtype` (None: the checkpoint's) and its attention implementation `attention`
    (None: the model's own), dropout off (`stepwise_lit.models.loading.load_causal_lm`).

    Raises:
        SettingError: naming `setting`, when the model cannot be found or loaded.
    """
    model = load_causal_lm(name_or_path, tokenizer, tiny_model, trust_remote_code, DTYPES[dtype] if dtype else None, setting)
    if attention is not None:
        model.set_attn_implementation(attention)
    return model


def build_policy(base: PreTrainedModel, lora: LoraSettings | None, gradient_checkpointing: bool) -> torch.nn.Module:
    """The policy: `base` wrapped in LoRA adapters (when `lora` is set; only they train), with
    gradient checkpointing (non-reentrant; under LoRA the input embeddings require gradients, so
    the frozen embedding still passes them to the adapters)."""
    policy = apply_lora(base, lora) if lora is not None else base
    if gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None:
            policy.enable_input_require_grads()
    return policy
