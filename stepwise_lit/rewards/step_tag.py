"""StepTagScorer: a causal-LM PRM that reads P(+) / (P(+) + P(-)) at a tag after each step
(math-shepherd, RLHFlow; docs/data.md, published process reward models)."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import AutoModelForCausalLM

from stepwise_lit.data.records import Prompt
from stepwise_lit.rewards.base import load_pretrained, prompt_text, single_token_id
from stepwise_lit.rewards.batching import PositionScorer

FORMATS = ("raw", "chat")
READ_AT = ("tag", "before_tag")


def raw_layout(question: str, steps: list[str], tag: str, separator: str, joiner: str) -> tuple[str, list[tuple[int, int]]]:
    """math-shepherd's text: ``question + separator + joiner.join(step + tag)`` (steps stripped),
    and each tag's character span ``(start, end)`` in it."""
    text, spans = question + separator, []
    for index, step in enumerate(steps):
        text += ("" if index == 0 else joiner) + step.strip()
        spans.append((len(text), len(text) + len(tag)))
        text += tag
    return text, spans


def chat_messages(question: str, steps: list[str], tag: str, separator: str) -> list[dict[str, str]]:
    """RLHFlow's conversation: user turns ``question + separator + step_1``, then ``step_k``
    (stripped), each answered by an assistant turn holding `tag`."""
    messages = []
    for index, step in enumerate(steps):
        content = (question + separator if index == 0 else "") + step.strip()
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": tag}]
    return messages


def token_at(offsets: list[tuple[int, int]], char: int) -> int:
    """The index of the last token whose character span holds `char` (special tokens, spanning
    nothing, hold none).

    Raises:
        ValueError: If no token covers it.
    """
    covering = [index for index, (start, end) in enumerate(offsets) if start <= char < end]
    if not covering:
        raise ValueError(f"no token covers character {char} of the scored text")
    return covering[-1]


class StepTagScorer(PositionScorer):
    """Scores each step with a causal LM's next-token distribution at a tag that follows the step:
    p = P(`positive_token`) / (P(`positive_token`) + P(`negative_token`)) (a softmax over the two
    logits), score = 2p - 1.

    `format` "raw" (math-shepherd, ``peiyi9979/math-shepherd-mistral-7b-prm``): the text is
    ``question + question_separator + step_joiner.join(step + step_tag)``, tokenized with the
    tokenizer's special tokens (its BOS), and `read_at` "tag" reads the logits at the tag's last
    token (``" ки"``). `format` "chat" (RLHFlow, ``RLHFlow/Llama3.1-8B-PRM-Deepseek-Data``): the
    tokenizer's chat template over user turns ``question + question_separator + step_1``, then
    ``step_k``, each followed by an assistant turn holding `step_tag` (``"+"``); `read_at`
    "before_tag" reads at the token before that "+" (the position that predicts it; the model
    card's ``logits[:, -3]`` for the last step). Steps are stripped of surrounding whitespace.
    The tag's tokens are found by character offsets, so the scorer needs a fast tokenizer.

    The step text is re-tokenized with this model's own tokenizer, whatever the policy's is.
    """

    def __init__(
        self,
        model_name_or_path: str,
        step_tag: str = " ки",
        positive_token: str = "+",
        negative_token: str = "-",
        read_at: Literal["tag", "before_tag"] = "tag",
        format: Literal["raw", "chat"] = "raw",
        question_separator: str = " ",
        step_joiner: str = "\n",
        batch_size: int = 4,
        trust_remote_code: bool = False,
        dtype: str = "auto",
    ) -> None:
        """Loads the PRM.

        Args:
            model_name_or_path: A Hugging Face causal LM (local folder or Hub id in the local cache).
            step_tag: "raw": the text appended to every step (math-shepherd: ``" ки"``); "chat":
                each assistant turn's content (RLHFlow: ``"+"``).
            positive_token: The token meaning "step is correct"; must encode to one token.
            negative_token: The token meaning "step is wrong"; must encode to one token.
            read_at: "tag": the logits at the tag's last token; "before_tag": at the token before
                the tag's first token.
            format: "raw" text or "chat" (the tokenizer's chat template, which it must have).
            question_separator: Between the question and the first step.
            step_joiner: Between a tag and the next step ("raw" only).
            batch_size: Responses per forward pass.
            trust_remote_code: Run the model repository's own code; only for sources you trust.
            dtype: Weight dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".

        Raises:
            ValueError: On an unknown `format` / `read_at`, an empty tag, label tokens that are not
                single tokens or are the same, a "chat" format without a chat template, a slow
                tokenizer, or `batch_size` < 1.
            OSError: If the model cannot be loaded (FileNotFoundError for a missing local folder).
            SettingError: If the checkpoint leaves weights freshly initialised.
        """
        super().__init__()
        if format not in FORMATS or read_at not in READ_AT:
            raise ValueError(f"format must be one of {FORMATS} and read_at one of {READ_AT}; got {format!r}, {read_at!r}")
        if not step_tag or batch_size < 1:
            raise ValueError(f"need a non-empty step_tag and batch_size >= 1; got {step_tag!r}, {batch_size}")
        self.model, self.tokenizer = load_pretrained(
            AutoModelForCausalLM, model_name_or_path, trust_remote_code, dtype, type(self).__name__
        )
        if not self.tokenizer.is_fast:
            raise ValueError(f"model_name_or_path: {model_name_or_path!r} has no fast tokenizer (the tags are found by offsets)")
        if format == "chat" and self.tokenizer.chat_template is None:
            raise ValueError(f"format: 'chat' needs a chat template, and {model_name_or_path!r}'s tokenizer has none")
        self.label_ids = [
            single_token_id(self.tokenizer, positive_token, "positive_token"),
            single_token_id(self.tokenizer, negative_token, "negative_token"),
        ]
        if self.label_ids[0] == self.label_ids[1]:
            raise ValueError(f"positive_token and negative_token are the same token {self.label_ids[0]}")
        self.step_tag, self.read_at, self.format = step_tag, read_at, format
        self.question_separator, self.step_joiner = question_separator, step_joiner
        self.batch_size = batch_size

    def step_probability(self, outputs: torch.Tensor) -> torch.Tensor:
        """P(+) / (P(+) + P(-)): the softmax over the two label tokens' logits."""
        return outputs[:, self.label_ids].softmax(-1)[:, 0]

    def encode(self, prompt: Prompt, steps: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of one response as the PRM reads it, and the position read for each step."""
        text, spans = self.layout(prompt_text(prompt), steps)
        encoding = self.tokenizer(text, add_special_tokens=self.format == "raw", return_offsets_mapping=True)
        offsets = [tuple(span) for span in encoding["offset_mapping"]]
        if self.read_at == "tag":
            positions = [token_at(offsets, end - 1) for _, end in spans]
        else:
            positions = [token_at(offsets, start) - 1 for start, _ in spans]
        return encoding["input_ids"], positions

    def layout(self, question: str, steps: list[str]) -> tuple[str, list[tuple[int, int]]]:
        """The text the PRM reads and the character span of each step's tag in it.

        Raises:
            ValueError: If the chat template does not render each turn as a prefix of the whole.
        """
        if self.format == "raw":
            return raw_layout(question, steps, self.step_tag, self.question_separator, self.step_joiner)
        messages = chat_messages(question, steps, self.step_tag, self.question_separator)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for turn in range(1, len(steps) + 1):
            prefix = self.tokenizer.apply_chat_template(messages[: 2 * turn], tokenize=False)
            if not text.startswith(prefix):
                raise ValueError("format 'chat': the chat template does not render a conversation's turns as its prefixes")
            start = prefix.rindex(self.step_tag)
            spans.append((start, start + len(self.step_tag)))
        return text, spans
