"""How a prompt becomes the text the policy reads: the one rendering every stage shares.

Training (`stepwise_lit.data.tokenize`), generation (`stepwise_lit.models.generate`: the
evaluation callback, online rounds and ``python -m stepwise_lit.evaluate``) and scoring with
the policy (`stepwise_lit.rewards.implicit`) all call :func:`render_prompt`, so one prompt
gives the same tokens in each (docs/data.md, "Prompts and chat templates").

A string prompt is first wrapped in ``data.step_wise_prompt_template`` (when
``data.use_step_wise_prompt``), then, when the chat template applies, sent as the user turn
(after ``data.system_prompt`` as the system turn) through the tokenizer's chat template with
the generation prompt. Chat messages always go through the chat template (the system prompt
is put first when they have no system turn of their own).

``data.apply_chat_template`` null (the default) applies the template when the tokenizer has one
that is not the embedded byte tokenizer's minimal ``<|role|>`` template: the embedded model is
trained from scratch on raw text, and wrapping its prompts would change every number the
embedded runs give (tests/e2e/test_golden.py). An instruct tokenizer (Qwen2.5, Llama 3.2) has
its own template, so its string prompts are rendered as chat.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from stepwise_lit.data.records import Prompt
from stepwise_lit.data.tokenizer import BYTE_CHAT_TEMPLATE
from stepwise_lit.errors import SettingError

TOKENIZER_SETTING = "data.tokenizer_name_or_path (train.py: model.tokenizer_name_or_path, else model.model_name_or_path)"


class NoChatTemplate(SettingError):
    """A prompt needs a chat template the tokenizer does not have; names the tokenizer setting."""


@dataclass(frozen=True)
class PromptFormat:
    """How string and message prompts are rendered (the ``data.*`` settings of the same names).

    Attributes:
        step_wise_prompt_template: Template with ``{prompt}`` wrapped around string prompts,
            or None (``data.use_step_wise_prompt`` off).
        apply_chat_template: Render string prompts through the chat template: True, False, or
            None for the tokenizer's default (:func:`chat_template_applies`).
        system_prompt: System turn put before the user turn when the chat template is
            applied (and before chat messages that have no system turn); None for none.
    """

    step_wise_prompt_template: str | None = None
    apply_chat_template: bool | None = None
    system_prompt: str | None = None


def prompt_format_of(data: Mapping[str, Any]) -> PromptFormat:
    """The `PromptFormat` that data settings (``StepwiseDataModule``'s hparams, or the ``data``
    section an export saved; missing keys take the defaults) describe."""
    template = data.get("step_wise_prompt_template") if data.get("use_step_wise_prompt") else None
    return PromptFormat(template, data.get("apply_chat_template"), data.get("system_prompt"))


def tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer as messages name it: its source quoted, or ``the embedded byte-level one``."""
    return repr(tokenizer.name_or_path) if tokenizer.name_or_path else "the embedded byte-level one"


def has_own_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer carries a chat template other than the embedded byte tokenizer's."""
    return bool(tokenizer.chat_template) and tokenizer.chat_template != BYTE_CHAT_TEMPLATE


def chat_template_applies(tokenizer: PreTrainedTokenizerBase, apply: bool | None) -> bool:
    """Whether string prompts go through the chat template: `apply`, or when None, whether the
    tokenizer has its own template (:func:`has_own_chat_template`)."""
    return has_own_chat_template(tokenizer) if apply is None else apply


def check_chat_template(tokenizer: PreTrainedTokenizerBase, why: str) -> None:
    """Fails unless the tokenizer has a chat template.

    Raises:
        NoChatTemplate: Naming the tokenizer setting and `why` the template is needed.
    """
    if not tokenizer.chat_template:
        raise NoChatTemplate(
            f"{TOKENIZER_SETTING}: the tokenizer ({tokenizer_name(tokenizer)}) has no chat template, and {why}; "
            "name a tokenizer that has one, or give the prompts as text with data.apply_chat_template: false"
        )


def check_prompt_format(tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat) -> None:
    """Fails at start on chat-template settings the tokenizer cannot honour.

    Raises:
        NoChatTemplate: For ``data.apply_chat_template: true`` with a tokenizer without a template.
        SettingError: Naming ``data.system_prompt`` when string prompts are not rendered as chat.
    """
    if prompt_format.apply_chat_template:
        check_chat_template(tokenizer, "data.apply_chat_template is true")
    if prompt_format.system_prompt is not None and not chat_template_applies(tokenizer, prompt_format.apply_chat_template):
        raise SettingError(
            "data.system_prompt: set, but string prompts are not rendered through a chat template "
            f"(data.apply_chat_template: {prompt_format.apply_chat_template}, tokenizer: {tokenizer_name(tokenizer)}); "
            "set data.apply_chat_template: true"
        )


def render_prompt(prompt: Prompt, tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat) -> str:
    """The text a prompt becomes (before tokenizing; no BOS added here).

    Args:
        prompt: A string or chat messages ``[{"role": ..., "content": ...}]``.
        tokenizer: The policy's tokenizer.
        prompt_format: The step-wise template, chat template switch and system prompt.

    Returns:
        The prompt text, ending with the chat template's generation prompt when it applies.

    Raises:
        NoChatTemplate: For chat messages, or ``apply_chat_template: true``, with a tokenizer
            that has no chat template.
    """
    if isinstance(prompt, str):
        if prompt_format.step_wise_prompt_template is not None:
            prompt = prompt_format.step_wise_prompt_template.replace("{prompt}", prompt)
        if not chat_template_applies(tokenizer, prompt_format.apply_chat_template):
            return prompt
        check_chat_template(tokenizer, "data.apply_chat_template is true")
        messages = [{"role": "user", "content": prompt}]
    else:
        check_chat_template(tokenizer, "a prompt is chat messages")
        messages = list(prompt)
    if prompt_format.system_prompt is not None and (not messages or messages[0].get("role") != "system"):
        messages = [{"role": "system", "content": prompt_format.system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
