"""FSDP and multi-process model helpers: FSDP2 sharding of a causal LM, the FSDP1 wrap policy,
full state dicts for export and checkpoints, broadcasting a module from one rank, and which
rank shows progress bars.

The data order and evaluation padding are in `stepwise_lit.data.sampling`; the signal
checkpoint and the RNG state of checkpoints in `stepwise_lit.faults`.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face model (also under PEFT): the modules whose class
    is named in a `_no_split_modules` list, the blocks Hugging Face keeps whole when splitting."""
    names = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or ())}
    return [module for module in model.modules() if type(module).__name__ in names]


def fully_shard_causal_lm(model: torch.nn.Module, mesh) -> None:
    """FSDP2: shards each decoder layer as its own group, then the model as a root (embeddings,
    final norm and head). Each model sharded this way all-gathers and reshards on its own.

    Args:
        model: A Hugging Face causal LM, optionally wrapped by PEFT.
        mesh: The 1-D data-parallel device mesh to shard over.

    Raises:
        ValueError: When the model names no decoder layer class.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); cannot shard it")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def reshard_frozen(model: torch.nn.Module) -> None:
    """Frees the gathered weights of an FSDP2-sharded frozen model after its forward: FSDP2 keeps
    a root's weights (embeddings, head) gathered after forward for the backward that follows,
    and a frozen model has none. Nothing to do for other models."""
    if isinstance(model, FSDPModule):
        model.reshard()


class CausalLMWrapPolicy(ModuleWrapPolicy):
    """FSDP1 auto-wrap policy for any Hugging Face causal LM: each decoder layer (a transformers
    `GradientCheckpointingLayer`) and each `*ForCausalLM` model (a `GenerationMixin`) becomes its
    own FSDP unit, whatever the architecture. Give it to `FSDPStrategy(auto_wrap_policy=...)`.
    """

    def __init__(self) -> None:
        from transformers import GenerationMixin
        from transformers.modeling_layers import GradientCheckpointingLayer

        super().__init__({GradientCheckpointingLayer, GenerationMixin})


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether `module` holds FSDP1 or FSDP2 sharded parameters."""
    return any(isinstance(child, (FSDPModule, FullyShardedDataParallel)) for child in module.modules())


def full_state_dict(root: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full, unsharded CPU tensors of `root`'s state dict whose key starts with `prefix` (the
    prefix removed). A collective: call it on every rank; with sharded weights only rank 0's
    result is filled.

    Args:
        root: The module to read, e.g. the strategy's wrapped model.
        prefix: Keep only keys under this prefix, e.g. `"policy."`.
    """
    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def whole_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict, whole and on the CPU. When FSDP shards `model` it is gathered on
    rank 0 (a collective: every rank calls it; the others get an empty dict)."""
    if is_sharded(model):
        return full_state_dict(model)
    return {key: value.cpu() for key, value in model.state_dict().items()}


def load_whole_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads what `whole_state_dict` returned (on every rank), sharding it as `model` is."""
    if is_sharded(model):
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copies `src`'s parameters and buffers into every rank's `module` (a collective)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        torch.distributed.broadcast(tensor.data, src=src)


def shows_progress(trainer) -> bool:
    """Whether this process draws the progress bars of work inside a run (generation, the
    reference pass): rank zero, and only while the trainer's own progress bar is on
    (``trainer.enable_progress_bar``)."""
    return trainer.is_global_zero and trainer.progress_bar_callback is not None
