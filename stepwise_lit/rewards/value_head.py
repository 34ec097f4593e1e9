"""ValueHeadStepScorer: a value-head PRM read at each step's end (Skywork-o1-Open-PRM;
docs/data.md, published process reward models)."""

from __future__ import annotations

import torch

from stepwise_lit.data.records import Prompt
from stepwise_lit.rewards.base import load_pretrained, prompt_text, single_token_id
from stepwise_lit.rewards.batching import PositionScorer
from stepwise_lit.rewards.heads import Qwen2ValueHeadModel


class ValueHeadStepScorer(PositionScorer):
    """Scores each step as Skywork-o1-Open-PRM's reference code (``prepare_input``) does: the ids
    of ``bos_token + problem + "\\n"``, then per step the ids of the step (stripped) followed by the
    id of `step_token` (``"\\n"``), all without added special tokens; at each step's `step_token`
    p = sigmoid(v_head(last hidden state)); score = 2p - 1.

    The model is `Qwen2ValueHeadModel` (the Qwen2 backbone and ``v_head.summary``, built here, the
    checkpoint's weights loaded by key; a checkpoint without ``v_head`` is refused).
    The step text is re-tokenized with this model's own tokenizer, whatever the policy's is.
    """

    def __init__(
        self, model_name_or_path: str, step_token: str = "\n", batch_size: int = 8, dtype: str = "auto"
    ) -> None:
        """Loads the PRM.

        Args:
            model_name_or_path: A Skywork-o1-Open-PRM-Qwen-2.5 checkpoint or one of the same
                layout (local folder or Hub id in the local cache).
            step_token: The text ending every step; must be one token.
            batch_size: Responses per forward pass.
            dtype: Weight dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".

        Raises:
            ValueError: If `step_token` is not one token or `batch_size` < 1.
            OSError: If the model cannot be loaded (FileNotFoundError for a missing local folder).
            SettingError: If the checkpoint has no ``v_head`` weights (or weights the model does not use).
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = load_pretrained(
            Qwen2ValueHeadModel, model_name_or_path, False, dtype, type(self).__name__, refuse_unexpected=True
        )
        self.step_token_id = single_token_id(self.tokenizer, step_token, "step_token")
        self.batch_size = batch_size

    def model_outputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The value head's ``[B, L]`` values."""
        return self.model(**inputs)

    def step_probability(self, outputs: torch.Tensor) -> torch.Tensor:
        """sigmoid(value) at each step's end token."""
        return torch.sigmoid(outputs)

    def encode(self, prompt: Prompt, steps: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of one response as the PRM reads it, and the position of each step's end token."""
        bos = self.tokenizer.bos_token or ""
        ids = self.tokenizer.encode(bos + prompt_text(prompt) + "\n", add_special_tokens=False)
        positions = []
        for step in steps:
            ids = ids + self.tokenizer.encode(step.strip(), add_special_tokens=False) + [self.step_token_id]
            positions.append(len(ids) - 1)
        return ids, positions
