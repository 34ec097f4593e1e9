"""ClassifierStepScorer: a token-classification process reward model (TRL PRMTrainer convention)."""

from __future__ import annotations

import torch
from transformers import AutoModelForTokenClassification

from stepwise_lit.data.records import Prompt
from stepwise_lit.rewards.base import load_pretrained, prompt_text
from stepwise_lit.rewards.batching import PositionScorer


class ClassifierStepScorer(PositionScorer):
    """Scores each step with a token-classification PRM read at the step's separator.

    The input is laid out as TRL's ``PRMTrainer`` lays out a training example:
    ``[bos] + prompt + step_1 + sep + step_2 + sep + ...``, each piece tokenized
    without special tokens and every step followed by `step_separator`; the label of
    step t sits on the last token of its separator. The same separator must be used
    here as at training time. Steps are stripped of surrounding whitespace first
    (canonical steps keep their delimiters, TRL's stepwise-supervision steps do not).
    Score = 2 P(`good_label`) - 1, P from a softmax over the model's labels.
    """

    def __init__(
        self,
        model_name_or_path: str,
        step_separator: str = "\n",
        good_label: int = 1,
        batch_size: int = 8,
        trust_remote_code: bool = False,
        dtype: str = "auto",
    ) -> None:
        """Loads the PRM.

        Args:
            model_name_or_path: A Hugging Face token-classification model (local folder
                or Hub id in the local cache) with at least two labels.
            step_separator: Text appended after every step; must tokenize to at least one token.
            good_label: Index of the "step is correct" label (1 in TRL's convention).
            batch_size: Responses per forward pass.
            trust_remote_code: Run the model repository's own code; only for sources you trust.
            dtype: Weight dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".

        Raises:
            ValueError: If the model has fewer than two labels, `good_label` is out of
                range, the separator tokenizes to nothing or `batch_size` < 1.
            OSError: If the model cannot be loaded (FileNotFoundError for a missing local folder).
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = load_pretrained(
            AutoModelForTokenClassification, model_name_or_path, trust_remote_code, dtype, type(self).__name__
        )
        num_labels = self.model.config.num_labels
        if num_labels < 2 or not 0 <= good_label < num_labels:
            raise ValueError(
                f"need a model with >= 2 labels and 0 <= good_label < num_labels; got {num_labels}, {good_label}"
            )
        self.separator_ids = self.tokenizer.encode(step_separator, add_special_tokens=False)
        if not self.separator_ids:
            raise ValueError(f"step_separator {step_separator!r} tokenizes to no tokens")
        self.good_label = good_label
        self.batch_size = batch_size

    def step_probability(self, outputs: torch.Tensor) -> torch.Tensor:
        """P(`good_label`) from the softmax over the labels at each separator."""
        return outputs.softmax(-1)[:, self.good_label]

    def encode(self, prompt: Prompt, steps: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of one response and the position of each step's label (its separator's last token)."""
        ids = self.tokenizer.encode(prompt_text(prompt), add_special_tokens=False)
        if self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id] + ids
        positions = []
        for step in steps:
            ids.extend(self.tokenizer.encode(step.strip(), add_special_tokens=False))
            ids.extend(self.separator_ids)
            positions.append(len(ids) - 1)
        return ids, positions
