"""Qwen2 process reward models whose heads transformers does not ship, built in the package so the
published checkpoints load with ``trust_remote_code`` off (docs/evaluation.md, step scorers).

Each class names its weights as the published checkpoint does, so ``from_pretrained`` fills every
weight from the checkpoint's safetensors by key, and reports any it could not (see
`stepwise_lit.rewards.base.check_fully_loaded`). A causal LM's ``lm_head`` in the checkpoint is
not used and not reported.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2Model, Qwen2PreTrainedModel


class Qwen2ProcessRewardModel(Qwen2PreTrainedModel):
    """Qwen/Qwen2.5-Math-PRM's layout: the Qwen2 backbone (``model.*``) and
    ``score = Sequential(Linear(h, h), ReLU(), Linear(h, num_labels))`` (``score.0.*``, ``score.2.*``)
    on every position's last hidden state, as the checkpoint's own ``Qwen2ForProcessRewardModel``."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config) -> None:
        super().__init__(config)
        self.model = Qwen2Model(config)
        hidden = config.hidden_size
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, config.num_labels))
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The 2-class logits at every position: ``[B, L, num_labels]`` for ``[B, L]`` ids."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.score(hidden.last_hidden_state)


class ValueHead(nn.Module):
    """A scalar per position: ``summary = Linear(h, 1)`` (TRL's value head, as Skywork saves it;
    its dropout is off at inference and holds no weights)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, L, h]`` hidden states -> ``[B, L]`` values."""
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


class Qwen2ValueHeadModel(Qwen2PreTrainedModel):
    """Skywork/Skywork-o1-Open-PRM-Qwen-2.5's layout: the Qwen2 backbone (``model.*``) and
    ``v_head.summary`` (``Linear(h, 1)``) on the last hidden state; the checkpoint's ``lm_head`` is unused."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config) -> None:
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.v_head = ValueHead(config.hidden_size)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The value (before the sigmoid) at every position: ``[B, L]`` for ``[B, L]`` ids."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.v_head(hidden.last_hidden_state)
