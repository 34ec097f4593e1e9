"""A byte-level tokenizer carrying a Qwen2.5-style chat template, its rendering written out by hand,
a random tiny model (a Llama unless told otherwise) saved beside it as a model folder (no download),
and an online-round backend that records the prompt ids it is asked for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stepwise_lit.data.tokenize import prompt_token_ids
from stepwise_lit.data.tokenizer import BYTE_TOKEN_OFFSET, build_byte_tokenizer
from stepwise_lit.models.loading import build_tiny_model
from tests.helpers.implicit_prm import SHAPE
from tests.helpers.online_helpers import SolvingGenerator

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's template without its tool-calling branches.
QWEN_STYLE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_style_text(user: str, system: str = QWEN_DEFAULT_SYSTEM) -> str:
    """What the template renders for one user turn with the generation prompt, written by hand."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def byte_ids(text: str) -> list[int]:
    """The byte tokenizer's ids of `text` with BOS first: ``<s>`` = 1, byte b = b + 3."""
    return [1, *(byte + BYTE_TOKEN_OFFSET for byte in text.encode())]


def tiny_llama(tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The embedded tiny Llama of `tests.helpers.implicit_prm.SHAPE`, sized for `tokenizer`."""
    return build_tiny_model(tokenizer, SHAPE)


def save_model_folder(
    folder: Path,
    chat_template: str | None,
    seed: int = 0,
    build: Callable[[PreTrainedTokenizerBase], PreTrainedModel] = tiny_llama,
) -> str:
    """A random tiny model (`build(tokenizer)`, seeded with `seed`; a Llama by default) and the byte
    tokenizer with `chat_template` (None: no template at all) saved as a Hugging Face folder;
    returns its path."""
    tokenizer = build_byte_tokenizer(chat_template)
    if chat_template is None:
        tokenizer.chat_template = None
    torch.manual_seed(seed)
    build(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


class RecordingSolvingGenerator(SolvingGenerator):
    """An online-round backend (``online.generator: tests.helpers.chat.RecordingSolvingGenerator``):
    `SolvingGenerator`'s solutions, and in `calls` each prompt with its ids as the loop's prompt
    format renders them (``prompt_token_ids`` with the ``prompt_format`` the loop built it with)."""

    calls: list[tuple[str, list[int]]] = []

    def __init__(self, model, tokenizer, prompt_format, max_prompt_length=None, progress=True) -> None:
        super().__init__(model, tokenizer)
        self.tokenizer, self.prompt_format = tokenizer, prompt_format

    def generate(self, prompts, settings):
        type(self).calls += [(prompt, prompt_token_ids(prompt, self.tokenizer, self.prompt_format)) for prompt in prompts]
        return super().generate(prompts, settings)
