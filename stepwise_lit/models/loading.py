"""Building the policy and reference models: Hugging Face causal LMs, the embedded tiny model, LoRA."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from stepwise_lit.data.sources import check_pretrained_source
from stepwise_lit.errors import SettingError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Weight dtype names the settings take."""
DtypeName = Literal["float32", "bfloat16", "float16"]
TINY_MODEL_RNG_KEY = "tiny_model_rng_state"
"""A LoRA checkpoint's entry for the CPU RNG state the embedded tiny model was initialised from: the
checkpoint leaves the frozen base out, and this state rebuilds it (`load_causal_lm(rng_state=...)`)."""


@dataclass
class TinyModelConfig:
    """Shape of the embedded Llama-architecture model, built from a config when no
    `model_name_or_path` is given (nothing is downloaded).

    Attributes:
        hidden_size: Width of the residual stream.
        num_layers: Number of decoder layers.
        num_heads: Attention heads (also key/value heads).
        intermediate_size: Width of the MLP.
        max_position_embeddings: Longest sequence the rotary embedding is set up for.
    """

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 1024


@dataclass
class LoraSettings:
    """LoRA adapters on the policy (through `peft`).

    Attributes:
        r: Rank of the update matrices.
        alpha: Scaling numerator (`lora_alpha`); the update is scaled by alpha / r.
        dropout: Dropout on the adapter input (the base model's dropout is always off).
        target_modules: Module names to adapt, or "all-linear".
        merge_on_export: Export merged full weights at the folder's root (loadable with
            `AutoModelForCausalLM`) and the adapter under `adapter/`; otherwise only the adapter.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")
    merge_on_export: bool = True


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, shape: TinyModelConfig) -> LlamaForCausalLM:
    """A randomly initialised Llama-architecture causal LM sized for `tokenizer`.

    Args:
        tokenizer: Gives the vocabulary size and the pad / bos / eos ids.
        shape: Widths and depth.

    Returns:
        The model, in fp32, with dropout off.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def load_causal_lm(
    model_name_or_path: str | None,
    tokenizer: PreTrainedTokenizerBase,
    tiny: TinyModelConfig,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    setting: str = "model.model_name_or_path",
    rng_state: torch.Tensor | None = None,
) -> PreTrainedModel:
    """Loads a Hugging Face causal LM, or builds the embedded tiny model when no path is given.

    Dropout is switched off in either case: DPO compares log-probs of the same model
    under two weight settings, and dropout noise would enter the log-ratios.

    Args:
        model_name_or_path: Hub id or local folder; None builds the tiny model.
        tokenizer: The run's tokenizer (for the tiny model's vocabulary and special ids).
        tiny: Shape of the tiny model.
        trust_remote_code: Passed to `from_pretrained`; off unless the user sets it.
        dtype: Weight dtype for `from_pretrained` (None: the checkpoint's own).
        setting: The setting `model_name_or_path` came from, as YAML names it (for errors).
        rng_state: For the tiny model: the CPU RNG state (`torch.get_rng_state()`) to initialise it
            from, leaving the global RNG as it was; None initialises it from the global RNG.

    Raises:
        SettingError: naming `setting`, when the model cannot be found or loaded (`check_pretrained_source`).
    """
    if model_name_or_path is None:
        with torch.random.fork_rng(devices=[], enabled=rng_state is not None):
            if rng_state is not None:
                torch.set_rng_state(rng_state)
            model = build_tiny_model(tokenizer, tiny)
    else:
        check_pretrained_source(setting, model_name_or_path, "config.json")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_name_or_path, trust_remote_code=trust_remote_code, dtype="auto" if dtype is None else dtype
            )  # "auto": the checkpoint's dtype (transformers 4.x reads a missing dtype as float32)
        except (OSError, ValueError) as error:  # missing files; a folder without a model config
            raise SettingError(f"{setting}: cannot load a model from {model_name_or_path!r}: {error}") from error
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    return model


DROPOUT_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                   torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def is_train_noise_setting(name: str, value: object) -> bool:
    """Whether an attribute sets noise that only train mode adds: a number (not a bool) named
    ``*dropout*`` or ``*pdrop`` (`attention_dropout`, `hidden_dropout_prob`, `resid_pdrop`,
    `classifier_dropout`...) or ``*jitter*`` (Mixtral's `router_jitter_noise`)."""
    named = "dropout" in name or name.endswith("pdrop") or "jitter" in name
    return named and isinstance(value, (int, float)) and not isinstance(value, bool)


def disable_dropout(model: torch.nn.Module) -> None:
    """Sets every dropout probability (and router jitter) of `model` to zero, so train mode (in
    which Hugging Face layers run gradient checkpointing) computes what eval mode does: every
    dropout module's `p`, every such setting of the config (and of its text config), and every
    one a module copied from the config when it was built, which Hugging Face layers read at
    call time (``dropout=0.0 if not self.training else self.attention_dropout``)."""
    config = getattr(model, "config", None)
    settings = [] if config is None else [config, config.get_text_config()]
    for holder in [*model.modules(), *settings]:
        if isinstance(holder, DROPOUT_MODULES):
            holder.p = 0.0
        for name in [name for name, value in vars(holder).items() if is_train_noise_setting(name, value)]:
            setattr(holder, name, 0.0)


def causal_lm_of(model: torch.nn.Module) -> PreTrainedModel:
    """The Hugging Face causal LM inside a PEFT model (or `model` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with `requires_grad` off: the reference model."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def frozen_state_keys(model: torch.nn.Module) -> set[str]:
    """The state-dict keys of `model`'s frozen parameters, a tied one under each of its names: under
    LoRA the base weights, which a checkpoint leaves out (its source rebuilds them)."""
    return {name for name, parameter in model.named_parameters(remove_duplicate=False) if not parameter.requires_grad}


def check_lora_settings(settings: LoraSettings) -> None:
    """Fails, naming the setting, on LoRA values peft would refuse with a traceback or that make no
    adapter: ``r >= 1``, ``alpha > 0``, ``0 <= dropout < 1``, at least one target module.

    Raises:
        SettingError: naming ``model.lora.<field>``.
    """
    if settings.r < 1:
        raise SettingError(f"model.lora.r: the adapter rank must be at least 1, got {settings.r}")
    if not settings.alpha > 0:
        raise SettingError(f"model.lora.alpha: must be > 0 (the update is scaled by alpha / r), got {settings.alpha}")
    if not 0 <= settings.dropout < 1:
        raise SettingError(f"model.lora.dropout: a probability in [0, 1), got {settings.dropout}")
    if not settings.target_modules:
        raise SettingError("model.lora.target_modules: empty; name module names (e.g. [q_proj, v_proj]) or \"all-linear\"")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last name parts of `model`'s linear layers (`nn.Linear`, and GPT-2's `Conv1D`),
    in model order: the names `target_modules` can take, e.g. ``["q_proj", ..., "lm_head"]``."""
    names = [name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"]
    return list(dict.fromkeys(names))


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> torch.nn.Module:
    """Wraps `model` in LoRA adapters; only the adapter weights stay trainable.

    Raises:
        SettingError: naming ``model.lora.<field>`` for a value out of range (`check_lora_settings`),
            or ``model.lora.target_modules`` when none of its names is a module of `model` (the
            message lists the model's linear modules).
    """
    from peft import LoraConfig, get_peft_model

    check_lora_settings(settings)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )
    linear = linear_module_names(model)  # before peft changes the model
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # the values above are checked: peft found no module to adapt
        raise SettingError(
            f"model.lora.target_modules: {settings.target_modules!r} matches no module of the model ({error}); "
            f"its linear modules are: {', '.join(linear)}"
        ) from error


# Checkpoints keep these in their hyper-parameters; allowing them lets `torch.load(..., weights_only=True)`
# read a checkpoint of this package without unpickling arbitrary classes.
torch.serialization.add_safe_globals([TinyModelConfig, LoraSettings])
