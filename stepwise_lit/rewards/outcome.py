"""OutcomeRewardModel: a sequence-classification reward model scoring whole responses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from transformers import AutoModelForSequenceClassification

from stepwise_lit.data.records import Prompt
from stepwise_lit.rewards.base import StepScorer, load_pretrained, prompt_text
from stepwise_lit.rewards.batching import padded_batches

SQUASHES = {"tanh": torch.tanh, "sigmoid": lambda reward: 2.0 * torch.sigmoid(reward) - 1.0}


class OutcomeRewardModel(StepScorer):
    """Scores a whole response with a one-output sequence-classification reward model
    (e.g. one trained with TRL's ``RewardTrainer``).

    The text is the prompt and response through the tokenizer's chat template (user,
    assistant) when it has one, else the prompt text followed directly by the
    response. The model's scalar r (read by Hugging Face at the last non-pad token)
    becomes a score in [-1, 1] by ``tanh(r)`` (`squash` "tanh") or ``2 sigmoid(r) - 1``
    (`squash` "sigmoid", which is ``tanh(r / 2)``: P(good) read as a score, for a
    Bradley-Terry reward model whose reward differences are log-odds).

    As a `StepScorer` it gives every step of a response the response's outcome score.
    """

    def __init__(
        self,
        model_name_or_path: str,
        squash: Literal["tanh", "sigmoid"] = "tanh",
        use_chat_template: bool = True,
        batch_size: int = 8,
        trust_remote_code: bool = False,
        dtype: str = "auto",
    ) -> None:
        """Loads the reward model.

        Args:
            model_name_or_path: A Hugging Face sequence-classification model with one
                label (local folder or Hub id in the local cache).
            squash: Map from the raw reward to [-1, 1]: "tanh" or "sigmoid" (2σ(r) − 1).
            use_chat_template: Format (prompt, response) with the tokenizer's chat template when it has one.
            batch_size: Responses per forward pass.
            trust_remote_code: Run the model repository's own code; only for sources you trust.
            dtype: Weight dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".

        Raises:
            ValueError: If the model does not have exactly one label, `squash` is
                unknown or `batch_size` < 1.
            OSError: If the model cannot be loaded (FileNotFoundError for a missing local folder).
        """
        super().__init__()
        if squash not in SQUASHES:
            raise ValueError(f"squash must be one of {sorted(SQUASHES)}, got {squash!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = load_pretrained(
            AutoModelForSequenceClassification, model_name_or_path, trust_remote_code, dtype, type(self).__name__
        )
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"an outcome reward model has one output; {model_name_or_path!r} has {self.model.config.num_labels}"
            )
        self.squash = SQUASHES[squash]
        self.use_chat_template = use_chat_template and self.tokenizer.chat_template is not None
        self.batch_size = batch_size

    def score_outcomes(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """One score in [-1, 1] per (prompt, response).

        Raises:
            ValueError: If the two sequences differ in length.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"score_outcomes got {len(prompts)} prompts but {len(responses)} responses")
        encoded = [self.encode(prompt, response) for prompt, response in zip(prompts, responses)]
        scores = [0.0] * len(encoded)
        batches = padded_batches(self.model, encoded, self.batch_size, self.tokenizer.pad_token_id, "right")
        with torch.no_grad():
            for batch, inputs in batches:
                rewards = self.model(**inputs).logits[:, 0].float()
                for i, score in zip(batch, self.squash(rewards).tolist()):
                    scores[i] = score
        return scores

    def _score_steps(
        self, prompts: list[Prompt], steps: list[list[str]], reference_solutions: list[str | None]
    ) -> list[list[float]]:
        outcomes = self.score_outcomes(prompts, ["".join(row_steps) for row_steps in steps])
        return [[outcome] * len(row_steps) for outcome, row_steps in zip(outcomes, steps)]

    def encode(self, prompt: Prompt, response: str) -> list[int]:
        """Token ids of (prompt, response) as the reward model reads them."""
        if not self.use_chat_template:
            return self.tokenizer(prompt_text(prompt) + response)["input_ids"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages.append({"role": "assistant", "content": response})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
