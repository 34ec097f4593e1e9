"""QwenProcessRewardScorer: Qwen/Qwen2.5-Math-PRM's chat layout and 2-class head
(docs/data.md, published process reward models)."""

from __future__ import annotations

import torch
from transformers import AutoModel

from stepwise_lit.data.records import Prompt
from stepwise_lit.rewards.base import load_pretrained, prompt_text, single_token_id
from stepwise_lit.rewards.batching import PositionScorer
from stepwise_lit.rewards.heads import Qwen2ProcessRewardModel

QWEN_PRM_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
"""The system prompt of Qwen2.5-Math-PRM's model card."""


class QwenProcessRewardScorer(PositionScorer):
    """Scores each step as Qwen2.5-Math-PRM's model card does: the tokenizer's chat template over
    (system: `system_prompt`, user: the problem, assistant: ``sep.join(steps) + sep`` with `sep`
    ``"<extra_0>"``, steps stripped), tokenized as the card does (``tokenizer.encode``); at every
    `sep` token the head's 2-class logits give p = softmax(logits)[1] (the "correct" class);
    score = 2p - 1.

    The model is `Qwen2ProcessRewardModel` (the Qwen2 backbone and the ``score`` MLP, built here,
    the checkpoint's weights loaded by key; a checkpoint without the head is refused), or with
    `trust_remote_code` the repository's own ``AutoModel`` class.
    The step text is re-tokenized with this model's own tokenizer, whatever the policy's is.
    """

    def __init__(
        self,
        model_name_or_path: str,
        system_prompt: str = QWEN_PRM_SYSTEM_PROMPT,
        step_separator: str = "<extra_0>",
        batch_size: int = 4,
        trust_remote_code: bool = False,
        dtype: str = "auto",
    ) -> None:
        """Loads the PRM.

        Args:
            model_name_or_path: Qwen2.5-Math-PRM-7B / -72B or a model of the same layout (local
                folder or Hub id in the local cache).
            system_prompt: The system turn's text.
            step_separator: The token after every step; must be one token of the tokenizer.
            batch_size: Responses per forward pass.
            trust_remote_code: Load with the repository's own modelling code (``AutoModel``)
                instead of the package's `Qwen2ProcessRewardModel`; only for sources you trust.
            dtype: Weight dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".

        Raises:
            ValueError: If the separator is not one token, the tokenizer has no chat template,
                the head does not have 2 classes, or `batch_size` < 1.
            OSError: If the model cannot be loaded (FileNotFoundError for a missing local folder).
            SettingError: If the checkpoint has no head weights (or weights the model does not use).
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        model_class = AutoModel if trust_remote_code else Qwen2ProcessRewardModel
        self.model, self.tokenizer = load_pretrained(
            model_class, model_name_or_path, trust_remote_code, dtype, type(self).__name__,
            refuse_unexpected=not trust_remote_code,
        )
        if self.model.config.num_labels != 2:
            raise ValueError(f"model_name_or_path: {model_name_or_path!r} has {self.model.config.num_labels} classes, not 2")
        if self.tokenizer.chat_template is None:
            raise ValueError(f"model_name_or_path: {model_name_or_path!r}'s tokenizer has no chat template")
        self.separator_id = single_token_id(self.tokenizer, step_separator, "step_separator")
        self.step_separator, self.system_prompt = step_separator, system_prompt
        self.batch_size = batch_size

    def step_probability(self, outputs: torch.Tensor) -> torch.Tensor:
        """softmax(2-class logits)[1], the "correct" class, at each separator."""
        return outputs.softmax(-1)[:, 1]

    def model_outputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's ``[B, L, 2]`` logits (the remote-code model returns them first in its output)."""
        output = self.model(**inputs)
        return output if isinstance(output, torch.Tensor) else output[0]

    def encode(self, prompt: Prompt, steps: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of one response as the PRM reads it, and the position of each step's separator.

        Raises:
            ValueError: If the separators found are not one per step (a step holding the separator text).
        """
        messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": prompt_text(prompt)},
            {"role": "assistant", "content": "".join(step.strip() + self.step_separator for step in steps)},
        ]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        ids = self.tokenizer.encode(text)
        positions = [index for index, token in enumerate(ids) if token == self.separator_id]
        if len(positions) != len(steps):
            raise ValueError(f"{len(steps)} steps but {len(positions)} {self.step_separator!r} tokens in the scored text")
        return ids, positions
