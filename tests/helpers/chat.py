"""A byte-level tokenizer carrying a Qwen2.5-style chat template, its rendering written out by hand,
and a random tiny Llama saved beside it as a model folder (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

from stepwise_lit.data.tokenizer import BYTE_TOKEN_OFFSET, build_byte_tokenizer
from stepwise_lit.models.loading import build_tiny_model
from tests.helpers.implicit_prm import SHAPE

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


def save_model_folder(folder: Path, chat_template: str | None, seed: int = 0) -> str:
    """A random tiny Llama and the byte tokenizer with `chat_template` (None: no template at all)
    saved as a Hugging Face folder; returns its path."""
    tokenizer = build_byte_tokenizer(chat_template)
    if chat_template is None:
        tokenizer.chat_template = None
    torch.manual_seed(seed)
    build_tiny_model(tokenizer, SHAPE).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
