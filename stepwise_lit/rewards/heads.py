"""Qwen2 process reward models whose heads transformers does not ship, built in the package so the
published checkpoints load with ``trust_remote_code`` off (docs/data.md, published process reward models).

Each class names its weights as the published checkpoint does, so ``from_pretrained`` fills every
weight from the checkpoint's safetensors by key, and reports any it could not (see
`stepwise_lit.rewards.base.check_fully_loaded`). A causal LM's ``lm_head`` in the checkpoint is
not used and not reported.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2Model, Qwen2PreTrainedModel


class Qwen2WithHead(Qwen2PreTrainedModel):
    """The Qwen2 backbone (``model.*``) and a head on every position's last hidden state, stored
    under the attribute `head_name` (the checkpoint's key prefix)."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]
    head_name = "head"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.model = Qwen2Model(config)
        setattr(self, self.head_name, self.build_head(config))
        self.post_init()

    def build_head(self, config) -> nn.Module:
        """The head module for `config`."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The head's output at every position, ``[B, L, ...]`` for ``[B, L]`` ids."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return getattr(self, self.head_name)(hidden.last_hidden_state)


class Qwen2ProcessRewardModel(Qwen2WithHead):
    """Qwen/Qwen2.5-Math-PRM's layout: the Qwen2 backbone and
    ``score = Sequential(Linear(h, h), ReLU(), Linear(h, num_labels))`` (``score.0.*``, ``score.2.*``),
    as the checkpoint's own ``Qwen2ForProcessRewardModel``; outputs ``[B, L, num_labels]`` logits."""

    head_name = "score"

    def build_head(self, config) -> nn.Module:
        hidden = config.hidden_size
        return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, config.num_labels))


class ValueHead(nn.Module):
    """A scalar per position: ``summary = Linear(h, 1)`` (TRL's value head, as Skywork saves it;
    its dropout is off at inference and holds no weights)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, L, h]`` hidden states -> ``[B, L]`` values."""
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


class Qwen2ValueHeadModel(Qwen2WithHead):
    """Skywork/Skywork-o1-Open-PRM-Qwen-2.5's layout: the Qwen2 backbone and ``v_head.summary``
    (``Linear(h, 1)``); outputs ``[B, L]`` values (before the sigmoid)."""

    head_name = "v_head"

    def build_head(self, config) -> nn.Module:
        return ValueHead(config.hidden_size)
