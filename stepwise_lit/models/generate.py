"""Decoding solutions from a causal LM: greedy or sampled, batched, left-padded, with budgets.

A :class:`Generator` turns prompts into ``num_samples`` completions each (the generated
text only, never the prompt). :class:`TransformersGenerator` runs ``model.generate`` of
``transformers`` with the KV cache. Another backend plugs in by implementing the same
one method: :class:`~stepwise_lit.models.vllm_generate.VLLMGenerator` does, and a ``generator``
setting picks one by name (:func:`generator_class`).

Budgets, all optional except the token budget, whichever comes first:
  - EOS: any id of the model's ``generation_config.eos_token_id`` (one id or a list: Llama-3.x
    and Qwen-Instruct stop on several) or the tokenizer's ``eos_token_id``;
  - ``max_new_tokens`` generated tokens;
  - ``stop_strings``: the completion ends with the first stop string, included;
  - ``max_steps``: the completion ends with its ``max_steps``-th ``step_end``, included
    (``step_end="\\n"`` and ``max_steps=3`` keep three lines, as the embedded task and
    GSM8K write one step a line).
The text budgets are checked after every token on the completion decoded so far, which is
decoded a few tokens at a time (:func:`decoded_increment`) and scanned only where it grew
(:class:`TextStops`), so the check costs the same at every length; a token that runs past a
stop is cut back to it (:func:`cut_completion` on the whole decoded completion).

Under FSDP (a sharded model in a multi-process run) every forward is a collective, so every
rank must run as many as the others: ``generate`` then runs with ``synced_gpus=True``
(transformers keeps a rank that is done stepping until all are), and the callers give every
rank the same number of prompts (``stepwise_lit.data.sampling.PaddedShardSampler``), hence the
same number of batches.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria

from stepwise_lit.data.chat import PromptFormat
from stepwise_lit.data.records import Prompt
from stepwise_lit.data.tokenize import prompt_token_ids
from stepwise_lit.errors import SettingError
from stepwise_lit.imports import import_callable
from stepwise_lit.models.distributed import is_sharded

log = logging.getLogger("stepwise_lit")


@dataclass
class VLLMSettings:
    """The vLLM engine's settings (``generation.vllm``), used with ``generator: vllm``
    (`stepwise_lit.models.vllm_generate`; docs/generation.md).

    Attributes:
        gpu_memory_utilization: Share of the GPU's memory the engine may take for its weights
            and KV cache. The engine shares the GPU with training (the policy, reference,
            optimizer state and activations), so leave them room. On CPU vLLM reads it as the
            share of the machine's memory it reserves (0.3 of 23.5 GiB: 7.1 GiB).
        kv_cache_memory_bytes: KV cache size in bytes, instead of the share above; None: sized
            from the share (on CPU also ``VLLM_CPU_KVCACHE_SPACE`` GiB when that is set).
        max_model_len: Longest prompt + completion in tokens; None: the model config's
            ``max_position_embeddings``.
        enforce_eager: No CUDA graphs or compilation: a faster start, slower decoding.
        sleep: On a GPU, free the engine's weights and KV cache after every call (sleep level
            2) and rebuild them at the next; no effect on CPU, which has no sleep mode.
    """

    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int | None = None
    max_model_len: int | None = None
    enforce_eager: bool = True
    sleep: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise SettingError(f"generation.vllm.gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("kv_cache_memory_bytes", "max_model_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SettingError(f"generation.vllm.{name}: must be at least 1 or null, got {getattr(self, name)}")


@dataclass
class GenerationSettings:
    """How to decode (the ``generation`` settings).

    Attributes:
        max_new_tokens: Token budget per completion.
        do_sample: False: greedy (one completion per prompt); True: sample.
        temperature: Softmax temperature when sampling, > 0.
        top_p: Nucleus sampling mass in (0, 1]; 1 keeps every token. No top-k cut.
        num_samples: Completions per prompt (k of pass@k, maj@k); 1 when greedy.
        seed: Seed of the sampling; batch ``i`` draws with ``seed + i``, so the same
            prompts, settings and batch size give the same samples.
        batch_size: Prompts per ``generate`` call (each gives ``num_samples`` rows).
        stop_strings: The completion stops after the first of these, which it keeps.
        max_steps: Step budget: stop after this many ``step_end``; None: no budget.
        step_end: The text that ends a step, for ``max_steps``.
        vllm: The engine's settings when the generator is ``vllm`` (ignored otherwise).
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 16
    stop_strings: list[str] = field(default_factory=list)
    max_steps: int | None = None
    step_end: str = "\n"
    vllm: VLLMSettings = field(default_factory=VLLMSettings)

    def __post_init__(self) -> None:
        problems = {
            "max_new_tokens": (self.max_new_tokens < 1, "must be at least 1"),
            "temperature": (self.temperature <= 0, "must be above 0 (use do_sample: false for greedy)"),
            "top_p": (not 0 < self.top_p <= 1, "must be in (0, 1]"),
            "num_samples": (
                self.num_samples < 1 or (self.num_samples > 1 and not self.do_sample),
                "must be at least 1, and 1 with greedy decoding (set do_sample: true to draw several)",
            ),
            "batch_size": (self.batch_size < 1, "must be at least 1"),
            "stop_strings": ("" in self.stop_strings, "must not contain an empty string"),
            "max_steps": (self.max_steps is not None and self.max_steps < 1, "must be at least 1 or null"),
            "step_end": (self.step_end == "", "must not be empty"),
        }
        for name, (is_bad, problem) in problems.items():
            if is_bad:
                raise SettingError(f"generation.{name}: {problem}, got {getattr(self, name)!r}")


class Generator(Protocol):
    """Anything that decodes completions for prompts."""

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[list[str]]:
        """Completions of every prompt.

        Args:
            prompts: N prompts, text or chat messages.
            settings: How to decode.

        Returns:
            N lists of ``settings.num_samples`` completions (generated text only), in
            prompt order and, within a prompt, in sample order.
        """
        ...


def completion_end(text: str, settings: GenerationSettings) -> int | None:
    """Where a completion stops by its text: after its first stop string or its ``max_steps``-th step end.

    Args:
        text: A decoded completion.
        settings: The budgets.

    Returns:
        The end (exclusive character index) of the earliest stop reached, or None.
    """
    ends = [text.find(stop) + len(stop) for stop in settings.stop_strings if stop in text]
    if settings.max_steps is not None:
        position = -1
        for _ in range(settings.max_steps):
            position = text.find(settings.step_end, position + 1)
            if position < 0:
                break
        if position >= 0:
            ends.append(position + len(settings.step_end))
    return min(ends) if ends else None


def cut_completion(text: str, settings: GenerationSettings) -> str:
    """The completion up to its earliest text stop (:func:`completion_end`), stop included; all of it when none."""
    end = completion_end(text, settings)
    return text if end is None else text[:end]


def decoded_increment(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], prefix_offset: int, read_offset: int
) -> tuple[str, int, int]:
    """The text that the tokens ``ids[read_offset:]`` add to a completion whose text up to
    ``read_offset`` is known, decoding only ``ids[prefix_offset:]`` (the incremental
    detokenization of vLLM and text-generation-inference: the tokens from ``prefix_offset`` to
    ``read_offset`` give the context that tokenizers which drop a leading space need).

    Args:
        tokenizer: Decodes with ``skip_special_tokens=True``.
        ids: The completion's token ids so far.
        prefix_offset: Where the decoding window starts (0 at first).
        read_offset: How many of ``ids`` the known text covers (0 at first).

    Returns:
        The new text and the next ``(prefix_offset, read_offset)``. While the new tokens end
        inside a character (their decoding ends with U+FFFD, a byte-level token holding part of
        a UTF-8 sequence) no text is added and the offsets stay, so the character comes whole.
    """
    known = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=True)
    text = tokenizer.decode(ids[prefix_offset:], skip_special_tokens=True)
    if len(text) > len(known) and not text.endswith("\ufffd"):
        return text[len(known) :], read_offset, len(ids)
    return "", prefix_offset, read_offset


class TextStops:
    """Whether a completion fed piece by piece has reached a text budget: a stop string, or
    ``max_steps`` occurrences of ``step_end`` (``completion_end(text) is not None`` for the text
    fed so far). Only the last characters a match could start in are kept, so each piece is
    scanned once, with a bounded overlap.

    Args:
        settings: The budgets (``stop_strings``, ``max_steps``, ``step_end``).
    """

    def __init__(self, settings: GenerationSettings) -> None:
        self.stops = list(settings.stop_strings)
        self.step_end = settings.step_end
        self.steps_left = settings.max_steps  # None: no step budget
        self.keep = max(len(text) for text in [*self.stops, self.step_end]) - 1
        self.tail = ""  # the last `keep` characters fed
        self.reached = False

    def feed(self, piece: str) -> bool:
        """Adds ``piece`` to the completion; returns whether a budget is reached (it stays reached)."""
        if self.reached or not piece:
            return self.reached
        text, old = self.tail + piece, len(self.tail)
        # Only a match that ends in `piece` is new: it starts after old - len(match).
        if any(stop in text[max(0, old - len(stop) + 1) :] for stop in self.stops):
            self.reached = True
        if self.steps_left is not None:
            position = text.find(self.step_end, max(0, old - len(self.step_end) + 1))
            while position >= 0 and self.steps_left > 0:
                self.steps_left -= 1
                position = text.find(self.step_end, position + 1)  # overlapping, as completion_end counts
            self.reached = self.reached or self.steps_left == 0
        self.tail = text[max(0, len(text) - self.keep) :]
        return self.reached


class TextBudget(StoppingCriteria):
    """Stops a row once its decoded completion reaches a stop string or the step budget.

    Keeps per row the generated ids, the decoding offsets (:func:`decoded_increment`) and a
    :class:`TextStops`, so each call decodes and scans only what the new tokens add.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int, settings: GenerationSettings) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.settings = settings
        self.seen = prompt_length  # columns of input_ids already read
        self.rows: list[dict] = []  # per row: ids, prefix_offset, read_offset, stops

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs) -> torch.Tensor:
        """``input_ids`` ``[rows, prompt_length + generated]`` -> done ``[rows]`` (bool)."""
        if not self.rows:
            self.rows = [{"ids": [], "prefix_offset": 0, "read_offset": 0, "stops": TextStops(self.settings)}
                         for _ in range(input_ids.shape[0])]
        new_ids = input_ids[:, self.seen :].tolist()
        self.seen = input_ids.shape[1]
        done = []
        for row, new in zip(self.rows, new_ids):
            if not row["stops"].reached:
                row["ids"] += new
                piece, row["prefix_offset"], row["read_offset"] = decoded_increment(
                    self.tokenizer, row["ids"], row["prefix_offset"], row["read_offset"])
                row["stops"].feed(piece)
            done.append(row["stops"].reached)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def prompt_ids(
    prompts: Sequence[Prompt],
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: PromptFormat,
    max_prompt_length: int | None,
) -> list[list[int]]:
    """The prompts' token ids as training tokenizes them (`stepwise_lit.data.tokenize.prompt_token_ids`),
    each cut from the left to ``max_prompt_length`` tokens (None: whole); the number cut is logged."""
    ids = [prompt_token_ids(prompt, tokenizer, prompt_format) for prompt in prompts]
    if max_prompt_length is None:
        return ids
    cut = sum(len(row) > max_prompt_length for row in ids)
    if cut:
        log.info("generate: %d of %d prompts cut from the left to %d tokens", cut, len(ids), max_prompt_length)
    return [row[max(0, len(row) - max_prompt_length) :] for row in ids]


GENERATORS = {
    "transformers": "stepwise_lit.models.generate.TransformersGenerator",
    "vllm": "stepwise_lit.models.vllm_generate.VLLMGenerator",
}
"""The backends a ``generator`` setting names by a short name; any other value is an import path."""
VLLM_INSTALL = "install the [vllm] extra on a GPU machine, or make a CPU venv with bench/vllm_venv.sh (docs/generation.md)"


def generator_class(name: str, setting: str) -> Callable:
    """The backend class of a ``generator`` setting (``online.generator``, ``evaluation.generator``):
    ``transformers``, ``vllm`` (:data:`GENERATORS`) or the import path of a class built as
    ``Backend(policy, tokenizer, prompt_format, max_prompt_length, progress=bool)`` whose
    ``generate`` is a :class:`Generator`'s.

    Raises:
        SettingError: Naming ``setting``, for a path that does not import, or ``vllm`` where it is not installed.
    """
    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        raise SettingError(f"{setting}: vllm is not installed; {VLLM_INSTALL}")
    return import_callable(GENERATORS.get(name, name), setting, "transformers, vllm or a backend class")


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end a completion: the model's ``generation_config.eos_token_id`` (an id or a
    list of ids; Llama-3.x and Qwen-Instruct list several) and the tokenizer's ``eos_token_id``,
    each once, the model's first."""
    config = getattr(model, "generation_config", None)
    listed = getattr(config, "eos_token_id", None)
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return list(dict.fromkeys([*listed, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])]))


def new_token_count(generated: torch.Tensor, eos_ids: Sequence[int], pad_id: int | None) -> int:
    """Tokens decoded in ``generated`` ``[rows, steps]``: in each row, up to and including its
    first end-of-sequence id, else up to its trailing padding (rows that stopped early are padded)."""
    is_end = torch.isin(generated, torch.tensor(list(eos_ids), device=generated.device))
    if pad_id is None:
        unpadded = torch.full((generated.shape[0],), generated.shape[1], device=generated.device)
    else:  # the length before the trailing run of pad ids
        not_pad = (generated != pad_id).int()
        unpadded = generated.shape[1] - not_pad.flip(dims=[1]).cumsum(dim=1).eq(0).sum(dim=1)
    first_end = is_end.int().argmax(dim=1) + 1
    return int(torch.where(is_end.any(dim=1), first_end, unpadded).sum())


def runs_in_lockstep(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP across processes, so its forwards are collectives that
    every rank must run together (``generate(..., synced_gpus=True)``)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return distributed and torch.distributed.get_world_size() > 1 and is_sharded(model)


@contextmanager
def gathered_root(model: torch.nn.Module) -> Iterator[None]:
    """Holds the weights of an FSDP2 root (the embeddings, final norm and head outside the decoder
    layers) gathered for a ``generate`` call, then frees them: a PEFT model's ``generate`` calls the
    inner model's forward, so the root's own forward hooks, which gather them, do not run. Nothing
    to do for other models (decoder layers gather in their own forwards)."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


class Backend:
    """What a built-in backend is built from, as a ``generator`` setting builds it
    (:func:`generator_class`): ``Backend(model, tokenizer, prompt_format, max_prompt_length, progress)``.

    Prompts are tokenized as training tokenizes them (`stepwise_lit.data.chat.render_prompt`:
    ``data.step_wise_prompt_template``, ``data.apply_chat_template`` and ``data.system_prompt``
    for text, the chat template for messages; BOS prepended when missing, then cut from
    the left to ``data.max_prompt_length`` tokens; the number cut is logged: :meth:`prompt_ids`).

    Args:
        model: A causal LM (``PreTrainedModel`` or a PEFT model around one).
        tokenizer: Its tokenizer, with a pad token.
        prompt_format: Training's prompt rendering (``datamodule.settings.prompt_format``).
        max_prompt_length: Training's ``max_prompt_length``: most prompt tokens kept, from
            the right; None keeps whole prompts.
        progress: Show a progress bar.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompt_format: PromptFormat = PromptFormat(),
        max_prompt_length: int | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.max_prompt_length = max_prompt_length
        self.progress = progress
        self.tokens_generated = 0  # new tokens decoded by this backend so far (bench/generation_backends.py)

    def prompt_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """The prompts' token ids as training has them (:func:`prompt_ids`)."""
        return prompt_ids(prompts, self.tokenizer, self.prompt_format, self.max_prompt_length)


class TransformersGenerator(Backend):
    """Batched ``model.generate`` with the KV cache and left padding (arguments: :class:`Backend`'s).

    Prompts (:meth:`Backend.prompt_ids`) are left-padded with the tokenizer's pad token; the
    tokenizer's own ``padding_side`` is not changed. The model is put in eval mode for the call
    and given back in the mode it had. A model sharded by FSDP across processes decodes in
    lockstep with the other ranks (``synced_gpus``; see the module docstring): every rank must
    call with as many prompts.
    """

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[list[str]]:
        """See :meth:`Generator.generate`."""
        ids = self.prompt_ids(prompts)
        starts = range(0, len(prompts), settings.batch_size)
        completions: list[list[str]] = []
        for index, start in enumerate(tqdm(starts, desc="generate", disable=not self.progress)):
            batch = ids[start : start + settings.batch_size]
            completions.extend(self.generate_batch(batch, settings, seed=settings.seed + index))
        return completions

    @torch.no_grad()
    def generate_batch(self, batch: list[list[int]], settings: GenerationSettings, seed: int) -> list[list[str]]:
        """Completions of one batch of tokenized prompts, sampling (if any) seeded with ``seed``."""
        features = [{"input_ids": ids} for ids in batch]
        inputs = self.tokenizer.pad(features, padding=True, padding_side="left", return_tensors="pt")
        inputs = inputs.to(self.model.device)
        prompt_length = inputs["input_ids"].shape[1]
        has_text_stop = bool(settings.stop_strings) or settings.max_steps is not None
        was_training = self.model.training
        self.model.eval()
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), gathered_root(self.model):
                torch.manual_seed(seed)
                sequences = self.model.generate(
                    **inputs,
                    generation_config=self.generation_config(settings),
                    stopping_criteria=[TextBudget(self.tokenizer, prompt_length, settings)] if has_text_stop else [],
                    synced_gpus=runs_in_lockstep(self.model),
                )
        finally:
            self.model.train(was_training)
        # sequences: [len(prompts) * num_samples, prompt_length + generated], samples of a prompt adjacent
        self.tokens_generated += new_token_count(sequences[:, prompt_length:], eos_token_ids(self.model, self.tokenizer),
                                                 self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)
        texts = [cut_completion(text, settings) for text in texts]
        k = settings.num_samples
        return [texts[row * k : (row + 1) * k] for row in range(len(batch))]

    def generation_config(self, settings: GenerationSettings) -> GenerationConfig:
        """The ``GenerationConfig`` of ``settings``; sampling knobs the settings do not name
        (top-k, repetition penalty, beams) are switched off rather than taken from the model,
        whose end-of-sequence ids are kept (:func:`eos_token_ids`)."""
        sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            num_beams=1,
            repetition_penalty=1.0,
            num_return_sequences=settings.num_samples,
            use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos_token_ids(self.model, self.tokenizer),
            **(sampling if settings.do_sample else {}),
        )
