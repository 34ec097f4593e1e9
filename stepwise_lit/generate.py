"""Decoding solutions from a causal LM: greedy or sampled, batched, left-padded, with budgets.

A :class:`Generator` turns prompts into ``num_samples`` completions each (the generated
text only, never the prompt). :class:`TransformersGenerator` runs ``model.generate`` of
``transformers`` with the KV cache. Another backend plugs in by implementing the same
one method; for vLLM, say, ``LLM(model=export_dir).generate(prompts, SamplingParams(
n=num_samples, temperature=..., top_p=..., max_tokens=max_new_tokens, seed=seed,
stop=stop_strings))`` and then :func:`cut_completion` on every text, which also applies
the step budget (vLLM has no count-based stop). ``temperature`` 0 in vLLM is greedy.

Budgets, all optional except the token budget, whichever comes first:
  - EOS (the tokenizer's ``eos_token_id``);
  - ``max_new_tokens`` generated tokens;
  - ``stop_strings``: the completion ends with the first stop string, included;
  - ``max_steps``: the completion ends with its ``max_steps``-th ``step_end``, included
    (``step_end="\\n"`` and ``max_steps=3`` keep three lines, as the embedded task and
    GSM8K write one step a line).
The text budgets are checked on the decoded completion after every token, so a token
that runs past a stop is cut back to it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria

from stepwise_lit.data.tokenize import prompt_token_ids
from stepwise_lit.errors import SettingError

Prompt = str | list[dict]
log = logging.getLogger("stepwise_lit")


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


class TextBudget(StoppingCriteria):
    """Stops a row once its decoded completion reaches a stop string or the step budget."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int, settings: GenerationSettings) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.settings = settings

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs) -> torch.Tensor:
        """``input_ids`` ``[rows, prompt_length + generated]`` -> done ``[rows]`` (bool)."""
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [completion_end(text, self.settings) is not None for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class TransformersGenerator:
    """Batched ``model.generate`` with the KV cache and left padding.

    Prompts are tokenized as training tokenizes them (``data.step_wise_prompt_template``
    for text, the chat template for messages, BOS prepended when missing, then cut from
    the left to ``data.max_prompt_length`` tokens; the number cut is logged) and
    left-padded with the tokenizer's pad token; the tokenizer's own ``padding_side`` is
    not changed. The model is put in eval mode for the call and given back in the mode
    it had.

    Args:
        model: A causal LM (``PreTrainedModel`` or a PEFT model around one).
        tokenizer: Its tokenizer, with a pad token.
        prompt_template: Training's ``step_wise_prompt_template`` (``{prompt}`` in it), or None.
        max_prompt_length: Training's ``max_prompt_length``: most prompt tokens kept, from
            the right; None keeps whole prompts.
        progress: Show a progress bar over batches.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompt_template: str | None = None,
        max_prompt_length: int | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.max_prompt_length = max_prompt_length
        self.progress = progress

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[list[str]]:
        """See :meth:`Generator.generate`."""
        prompt_ids = [prompt_token_ids(prompt, self.tokenizer, self.prompt_template) for prompt in prompts]
        if self.max_prompt_length is not None:
            limit = self.max_prompt_length
            cut = sum(len(ids) > limit for ids in prompt_ids)
            if cut:
                log.info("generate: %d of %d prompts cut from the left to %d tokens", cut, len(prompt_ids), limit)
            prompt_ids = [ids[max(0, len(ids) - limit) :] for ids in prompt_ids]
        starts = range(0, len(prompts), settings.batch_size)
        completions: list[list[str]] = []
        for index, start in enumerate(tqdm(starts, desc="generate", disable=not self.progress)):
            batch = prompt_ids[start : start + settings.batch_size]
            completions.extend(self.generate_batch(batch, settings, seed=settings.seed + index))
        return completions

    @torch.no_grad()
    def generate_batch(self, prompt_ids: list[list[int]], settings: GenerationSettings, seed: int) -> list[list[str]]:
        """Completions of one batch of tokenized prompts, sampling (if any) seeded with ``seed``."""
        features = [{"input_ids": ids} for ids in prompt_ids]
        inputs = self.tokenizer.pad(features, padding=True, padding_side="left", return_tensors="pt")
        inputs = inputs.to(self.model.device)
        prompt_length = inputs["input_ids"].shape[1]
        has_text_stop = bool(settings.stop_strings) or settings.max_steps is not None
        was_training = self.model.training
        self.model.eval()
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                sequences = self.model.generate(
                    **inputs,
                    generation_config=self.generation_config(settings),
                    stopping_criteria=[TextBudget(self.tokenizer, prompt_length, settings)] if has_text_stop else [],
                )
        finally:
            self.model.train(was_training)
        # sequences: [len(prompts) * num_samples, prompt_length + generated], samples of a prompt adjacent
        texts = self.tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)
        texts = [cut_completion(text, settings) for text in texts]
        k = settings.num_samples
        return [texts[row * k : (row + 1) * k] for row in range(len(prompt_ids))]

    def generation_config(self, settings: GenerationSettings) -> GenerationConfig:
        """The ``GenerationConfig`` of ``settings``; sampling knobs the settings do not name
        (top-k, repetition penalty, beams) are switched off rather than taken from the model."""
        sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            num_beams=1,
            repetition_penalty=1.0,
            num_return_sequences=settings.num_samples,
            use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **(sampling if settings.do_sample else {}),
        )
