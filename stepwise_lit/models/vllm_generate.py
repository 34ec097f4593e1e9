"""Decoding with vLLM (``generator: vllm``): one engine per process, fed the policy's current weights.

:class:`VLLMGenerator` is a :class:`~stepwise_lit.models.generate.Generator` built as the
transformers backend is (:class:`~stepwise_lit.models.generate.Backend`). Its engine, a ``vllm.LLM``, is
built at the first call from the policy's config and tokenizer (written to a temporary folder;
``load_format="dummy"``, so no weights are read from disk) and kept for the process: the online
rounds, the solve-rate evaluation and ``python -m stepwise_lit.evaluate`` all reuse it
(:func:`engine`). Before every call the policy's current weights go into it, LoRA merged
(:func:`merged_weights`, which leaves the policy as it was), through the worker's
``reload_weights`` (``LLM.collective_rpc("reload_weights", ...)``: ``collective_rpc`` is public,
the worker method it names is not part of vLLM's documented API), and its prefix cache is reset,
so no key/value entry of the old weights is reused.

Prompts are tokenized as training tokenizes them (:func:`~stepwise_lit.models.generate.prompt_ids`)
and given as token ids; completions are decoded from their token ids with the tokenizer, as the
transformers backend decodes them. The settings map to ``SamplingParams``: greedy is ``temperature=0``;
sampling keeps ``temperature`` and ``top_p`` (no top-k, no repetition penalty), ``n =
num_samples``, ``seed = generation.seed + prompt index`` (the same prompt draws the same samples
in any batch); ``max_tokens = max_new_tokens``; ``stop = stop_strings`` (kept in the output);
``stop_token_ids`` = the model's end-of-sequence ids. vLLM has no step budget, so ``max_steps`` is
applied to the text afterwards (:func:`~stepwise_lit.models.generate.cut_completion`).

The engine runs inside the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), as TRL's
colocate mode does; under DDP every rank builds its own engine over its share of the prompts
(``distributed_executor_backend="external_launcher"``). On a GPU the engine sleeps between calls
(``generation.vllm.sleep``: level 2, weights and KV cache freed; woken, refilled and its KV cache
rebuilt at the next call). On CPU there is no sleep mode: the engine's weights and KV cache
(``kv_cache_memory_bytes``) stay allocated while the policy trains. docs/generation.md says more.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stepwise_lit.data.records import Prompt
from stepwise_lit.errors import SettingError
from stepwise_lit.models.distributed import is_sharded
from stepwise_lit.models.generate import (
    VLLM_INSTALL,
    Backend,
    GenerationSettings,
    VLLMSettings,
    cut_completion,
    eos_token_ids,
)
from stepwise_lit.models.loading import causal_lm_of

log = logging.getLogger("stepwise_lit")

CPU_HEAD_DIM_MULTIPLE = 32
"""vLLM's CPU attention kernel takes head dimensions that are multiples of 32 (0.32: "Unsupported
CPU attention configuration: head_dim=16")."""

ENGINE: dict = {}
"""The process's engine and its state: ``key``, ``llm`` (the ``vllm.LLM``), ``settings``, ``asleep``... (empty before the first call)."""


def import_vllm():
    """The ``vllm`` module, imported with the engine in this process.

    Raises:
        SettingError: When vLLM is not installed.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: weights are handed over in memory
    try:
        import vllm
    except ImportError as error:
        raise SettingError(f"generator: vllm is not importable ({error}); {VLLM_INSTALL}") from None
    return vllm


def merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's full weights under the Hugging Face names vLLM loads, LoRA merged.

    For a PEFT model each adapted layer gives ``base_layer.weight + get_delta_weight`` (its
    active adapters, their scaling included) under the base layer's name; the adapter matrices
    themselves are left out. The model is not changed (no ``merge_adapter``, which would round
    the base weights when unmerged).

    Yields:
        ``(name, tensor)`` with names as in the base model's ``state_dict``.
    """
    from peft.tuners.lora import LoraLayer

    base = causal_lm_of(model)
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            adapters = [adapter for adapter in module.active_adapters if adapter in module.lora_A]
            if adapters:
                deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in adapters)
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        yield name.replace(".base_layer.", "."), tensor.detach()


def engine_key(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """What an engine is built for: the architecture, the dtype and the tokenizer."""
    return json.dumps([model.config.to_dict(), str(model.dtype), tokenizer.name_or_path, len(tokenizer),
                       tokenizer.chat_template], sort_keys=True, default=str)


def check_supported(model: PreTrainedModel, policy: torch.nn.Module) -> None:
    """Fails, naming the setting, on a policy the engine cannot take.

    Raises:
        SettingError: For a policy sharded by FSDP, or on CPU a head dimension vLLM's CPU kernel refuses.
    """
    if is_sharded(policy):
        raise SettingError("generator: vllm takes the policy's full weights in every process; an FSDP-sharded policy "
                           "is not supported yet: use DDP or one process, or generator: transformers")
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if model.device.type == "cpu" and head_dim % CPU_HEAD_DIM_MULTIPLE:
        raise SettingError(
            f"generator: vllm on CPU needs an attention head dimension that is a multiple of {CPU_HEAD_DIM_MULTIPLE}; "
            f"this model's is {head_dim} (hidden {config.hidden_size} / {config.num_attention_heads} heads; for the "
            "embedded model set model.tiny_model.num_heads so that hidden_size / num_heads is 32 or 64)"
        )


def engine(policy: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, vllm: VLLMSettings):
    """The process's ``vllm.LLM`` for this policy, built at the first call with that call's engine
    settings, and again only for another architecture or tokenizer. A later call with other
    engine settings (``evaluation.generation.vllm`` unlike ``online.generation.vllm``) uses the
    engine as built, with a warning."""
    model = causal_lm_of(policy)
    key = engine_key(model, tokenizer)
    if ENGINE.get("key") == key:
        if ENGINE["settings"] != vllm and not ENGINE["warned"]:
            log.warning("vllm: the engine was built with %s; these generation.vllm settings (%s) are not used: one engine "
                        "serves the process (give online and evaluation the same generation.vllm)", ENGINE["settings"], vllm)
            ENGINE["warned"] = True
        return ENGINE["llm"]
    check_supported(model, policy)
    module = import_vllm()
    ENGINE.clear()
    # Several processes (DDP): every rank its own engine in the existing process group (TRL's colocate
    # mode). vLLM's own engine leaves a one-process group behind, which is not that.
    distributed = (torch.distributed.is_available() and torch.distributed.is_initialized()
                   and torch.distributed.get_world_size() > 1)
    options = {"distributed_executor_backend": "external_launcher"} if distributed else {}
    on_gpu = model.device.type == "cuda"
    if not on_gpu:  # a prompt prefilled in chunks crashes seeded sampling on CPU (0.32: "CPU Generator does not use offset")
        longest = vllm.max_model_len or model.config.max_position_embeddings
        options.update(enable_chunked_prefill=False, max_num_batched_tokens=max(longest, 8192))
    with tempfile.TemporaryDirectory(prefix="stepwise-vllm-") as folder, rank_variables(distributed):
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]  # how vLLM picks its model class (unset on a model built from a config)
        config.save_pretrained(folder)  # architecture only: the weights come from the policy
        tokenizer.save_pretrained(folder)
        llm = module.LLM(
            model=folder,
            load_format="dummy",
            dtype=str(model.dtype).removeprefix("torch."),
            seed=0,
            generation_config="vllm",  # no sampling defaults from the model's generation_config
            max_model_len=vllm.max_model_len,
            enforce_eager=vllm.enforce_eager,
            gpu_memory_utilization=vllm.gpu_memory_utilization,
            kv_cache_memory_bytes=vllm.kv_cache_memory_bytes,
            enable_sleep_mode=vllm.sleep and on_gpu,
            **options,
        )
    # vLLM's own parameter names: a head tied to the embedding has none in some of its models (Gemma2)
    has_head = "lm_head.weight" in llm.apply_model(lambda m: [n for n, _ in m.named_parameters(remove_duplicate=False)])[0]
    log.info("vllm: engine built for %s (%s)", type(model).__name__, model.dtype)
    ENGINE.update(key=key, llm=llm, settings=vllm, warned=False, asleep=False, sleeps=vllm.sleep and on_gpu,
                  has_head=has_head)
    return llm


@contextmanager
def rank_variables(distributed: bool) -> Iterator[None]:
    """``RANK`` and ``LOCAL_RANK`` in the environment while a DDP rank builds its engine (vLLM's
    external launcher reads them; Lightning's launcher may set only ``LOCAL_RANK``), then as they
    were: a later subprocess must not inherit them (Lightning would take it for a launched rank)."""
    saved = {name: os.environ.get(name) for name in ("RANK", "LOCAL_RANK")}
    if distributed:
        rank = str(torch.distributed.get_rank())
        os.environ.setdefault("RANK", rank)
        os.environ.setdefault("LOCAL_RANK", rank)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def sampling_params(settings: GenerationSettings, seed: int, stop_token_ids: list[int]):
    """vLLM's ``SamplingParams`` for ``settings`` (see the module docstring)."""
    from vllm import SamplingParams

    sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "seed": seed} if settings.do_sample \
        else {"temperature": 0.0}
    return SamplingParams(
        n=settings.num_samples,
        max_tokens=settings.max_new_tokens,
        stop=list(settings.stop_strings) or None,
        include_stop_str_in_output=True,
        stop_token_ids=stop_token_ids,
        top_k=0,
        repetition_penalty=1.0,
        skip_special_tokens=True,
        **sampling,
    )


class VLLMGenerator(Backend):
    """Decoding through a vLLM engine (see the module docstring). Arguments as
    :class:`~stepwise_lit.models.generate.Backend`'s; the engine settings are ``generation.vllm``
    (:class:`~stepwise_lit.models.generate.VLLMSettings`)."""

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[list[str]]:
        """See :meth:`stepwise_lit.models.generate.Generator.generate`."""
        from vllm.inputs import TokensPrompt

        llm = engine(self.model, self.tokenizer, settings.vllm)  # under DDP built on every rank, with or without prompts
        self.push_weights(llm)
        ids = self.prompt_ids(prompts)
        if not ids:
            return []
        stop_ids = eos_token_ids(causal_lm_of(self.model), self.tokenizer)
        params = [sampling_params(settings, settings.seed + index, stop_ids) for index in range(len(ids))]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=row) for row in ids], params, use_tqdm=self.progress)
        self.tokens_generated += sum(len(sample.token_ids) for output in outputs for sample in output.outputs)
        if ENGINE["sleeps"]:
            llm.sleep(level=2)  # weights and KV cache freed while the policy trains
            ENGINE["asleep"] = True
        # outputs: one per prompt, in prompt order; each holds num_samples completions in sample order.
        # Decoded here, as the transformers backend decodes (vLLM's own text holds back a trailing
        # partial UTF-8 character, which `decode` gives as U+FFFD).
        return [[cut_completion(self.tokenizer.decode(sample.token_ids, skip_special_tokens=True), settings)
                 for sample in output.outputs] for output in outputs]

    @torch.no_grad()
    def push_weights(self, llm) -> None:
        """Loads the policy's current weights into the engine (waking it first if it sleeps)."""
        if ENGINE["asleep"]:
            llm.wake_up(tags=["weights"])
        weights = ((name, tensor) for name, tensor in merged_weights(self.model)
                   if ENGINE["has_head"] or name != "lm_head.weight")
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if ENGINE["asleep"]:
            llm.wake_up(tags=["kv_cache"])
            ENGINE["asleep"] = False
        llm.reset_prefix_cache()
