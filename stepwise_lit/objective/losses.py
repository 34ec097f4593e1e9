"""Reward aggregation and the outcome and step DPO losses (docs/loss.md, "Rewards and aggregation" and "Losses").

Pure functions of tensors. Every loss is computed in fp32 and returned per pair,
unreduced (``[N]``); the caller takes the mean. Verifier scores and rewards
are targets, not predictions: they are detached inside the losses.

Notation: ``logratio = policy log-prob - reference log-prob`` (per sequence or
per step), ``h_t = beta * step_logratio_t`` the implicit step reward, ``g_t``
the verifier score of step ``t`` in [-1, 1].

The choices are ``Literal`` types (for settings, so ``--help`` lists them and the parser
rejects a typo); the tuples of their values are derived from them. Besides the built-in
aggregations, a user function given by import path aggregates scores (`resolve_aggregation`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from stepwise_lit.errors import SettingError
from stepwise_lit.imports import import_callable

AggregationName = Literal["sum", "mean", "weighted_sum", "min", "max", "last", "product", "discounted"]
OutcomeLossType = Literal["sigmoid", "soft_label", "margin", "distill", "ipo"]
StepLossType = Literal["reward_weighted", "step_bce", "first_divergence"]
AGGREGATION_STRATEGIES: tuple[str, ...] = get_args(AggregationName)
OUTCOME_LOSS_TYPES: tuple[str, ...] = get_args(OutcomeLossType)
STEP_LOSS_TYPES: tuple[str, ...] = get_args(StepLossType)

AggregationFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A user aggregation: ``fn(scores [N, S] float32, mask [N, S] bool) -> rewards [N]`` (floating)."""
AGGREGATION_SETTING = "model.aggregation_strategy"


def _check_choice(setting: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {setting} {value!r}; valid: {', '.join(valid)}")


def _check_positive(setting: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{setting} must be > 0, got {value}")


def _last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real step (0 for a row without real steps).

    Args:
        mask: ``[N, S]`` bool, True on real steps.

    Returns:
        ``[N]`` long.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, 0).amax(-1)


def _step_weights(
    weights: Sequence[float] | torch.Tensor | None, num_steps: int, device: torch.device
) -> torch.Tensor:
    """Per-column weights ``[S]``: a step past the list uses the last weight; no list: all 1."""
    if weights is None:
        return torch.ones(num_steps, device=device)
    weights = torch.as_tensor(weights, dtype=torch.float32, device=device).flatten()
    if weights.numel() == 0:
        raise ValueError("step weights must not be empty (pass None for all-1 weights)")
    columns = torch.arange(num_steps, device=device).clamp(max=weights.numel() - 1)
    return weights[columns]


def resolve_aggregation(name: str) -> str | AggregationFunction:
    """The aggregation a setting names: a built-in name unchanged, or the function at an import path.

    Args:
        name: One of :data:`AGGREGATION_STRATEGIES`, or ``package.module.function``: a callable
            that `aggregate_rewards` calls with the scores and mask (see there).

    Returns:
        ``name`` itself for a built-in, else the function.

    Raises:
        SettingError: (message starting ``model.aggregation_strategy:``) for an unknown name, a
            module that cannot be imported, a missing attribute or one that is not callable.
    """
    if name in AGGREGATION_STRATEGIES:
        return name
    if "." not in name:
        raise SettingError(
            f"{AGGREGATION_SETTING}: unknown value {name!r}; choose one of {', '.join(AGGREGATION_STRATEGIES)}, "
            "or give a function as package.module.function"
        )
    return import_callable(name, AGGREGATION_SETTING, "a function of (scores, mask)")


def aggregate_rewards(
    scores: torch.Tensor,
    mask: torch.Tensor,
    strategy: str | AggregationFunction,
    weights: Sequence[float] | torch.Tensor | None = None,
    gamma: float = 0.9,
) -> torch.Tensor:
    """Aggregate per-step verifier scores into one outcome reward per response.

    With ``g_t`` the score of real step ``t`` (1-based, ``T`` real steps):

    - ``sum``: ``sum_t g_t``; ``mean``: ``sum_t g_t / T``
    - ``weighted_sum``: ``sum_t w_t g_t``; step ``t`` past the end of
      ``weights`` uses the last weight; ``weights=None`` means all 1
    - ``min``, ``max``: over the real steps; ``last``: the last real step
    - ``product``: ``2 * prod_t (g_t + 1) / 2 - 1``
    - ``discounted``: ``sum_t gamma ** (t - 1) * g_t``

    Masked steps are ignored by every strategy; a row with no real step gets 0.

    A function (see `resolve_aggregation`) is called as ``strategy(scores, mask)`` with the
    scores as the built-ins see them: float32, detached, 0 on masked steps (so padding never
    leaks in, whatever value it held), and the mask as bool. It must return a floating tensor
    ``[N]`` of finite values; ``weights`` and ``gamma`` are not passed to it.

    Args:
        scores: ``[N, S]`` step scores in [-1, 1] (any value where masked).
        mask: ``[N, S]`` bool, True on real steps.
        strategy: one of :data:`AGGREGATION_STRATEGIES`, or an aggregation function.
        weights: per-step weights for ``weighted_sum`` (length ≥ 1).
        gamma: discount for ``discounted``.

    Returns:
        ``[N]`` float32 rewards (no gradient).

    Raises:
        ValueError: for an unknown strategy name or empty ``weights``.
        SettingError: when a function returns anything but finite floats of shape ``[N]``.
    """
    mask = mask.bool()
    scores = torch.where(mask, scores.detach().float(), 0.0)  # [N, S], 0 on masked steps
    if callable(strategy):
        return _checked_reward(strategy, strategy(scores, mask), scores.shape[0])
    _check_choice("aggregation strategy", strategy, AGGREGATION_STRATEGIES)
    num_real = mask.sum(-1)  # [N]
    has_steps = num_real > 0
    num_columns = scores.shape[-1]
    if strategy == "sum":
        return scores.sum(-1)
    if strategy == "mean":
        return scores.sum(-1) / num_real.clamp(min=1)
    if strategy == "weighted_sum":
        return (scores * _step_weights(weights, num_columns, scores.device)).sum(-1)
    if strategy == "discounted":
        discounts = gamma ** torch.arange(num_columns, device=scores.device, dtype=torch.float32)
        return (scores * discounts).sum(-1)
    if strategy == "min":
        reward = torch.where(mask, scores, torch.inf).amin(-1)
    elif strategy == "max":
        reward = torch.where(mask, scores, -torch.inf).amax(-1)
    elif strategy == "last":
        reward = scores.gather(-1, _last_real_index(mask).unsqueeze(-1)).squeeze(-1)
    else:  # product
        reward = 2 * torch.where(mask, (scores + 1) / 2, 1.0).prod(-1) - 1
    return torch.where(has_steps, reward, 0.0)


def _checked_reward(function: AggregationFunction, reward: object, num_responses: int) -> torch.Tensor:
    """A user aggregation's result as float32 ``[N]``, or a `SettingError` naming the function."""
    name = f"{getattr(function, '__module__', None)}.{getattr(function, '__qualname__', repr(function))}"
    expected = f"a floating tensor of shape [{num_responses}] (one reward per response)"
    if not isinstance(reward, torch.Tensor):
        problem = f"a {type(reward).__name__}"
    elif not reward.is_floating_point():
        problem = f"a {reward.dtype} tensor"
    elif reward.shape != (num_responses,):
        problem = f"shape {list(reward.shape)}"
    elif not torch.isfinite(reward).all():
        problem = "non-finite values"
    else:
        return reward.detach().float()
    raise SettingError(f"{AGGREGATION_SETTING}: {name} returned {problem}; expected {expected}")


def outcome_loss(
    chosen_logratio: torch.Tensor,
    rejected_logratio: torch.Tensor,
    chosen_reward: torch.Tensor,
    rejected_reward: torch.Tensor,
    beta: float,
    loss_type: OutcomeLossType = "soft_label",
    tau: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Outcome-level DPO loss per pair.

    With ``z = beta * (chosen_logratio - rejected_logratio)`` and
    ``delta = chosen_reward - rejected_reward``:

    - ``sigmoid``: ``-log σ(z)`` (standard DPO; ignores the rewards)
    - ``soft_label``: ``p = σ(delta / tau)``; ``-p log σ(z) - (1 - p) log σ(-z)``
    - ``margin``: ``-log σ(z - gamma * delta)``
    - ``distill``: ``(z - delta) ** 2``
    - ``ipo``: ``(chosen_logratio - rejected_logratio - 1 / (2 beta)) ** 2``

    Args:
        chosen_logratio: ``[N]`` policy minus reference log-prob of the chosen response.
        rejected_logratio: ``[N]`` the same for the rejected response.
        chosen_reward: ``[N]`` verifier outcome reward ``R_c`` (detached).
        rejected_reward: ``[N]`` verifier outcome reward ``R_r`` (detached).
        beta: ``beta_o`` > 0.
        loss_type: one of :data:`OUTCOME_LOSS_TYPES`.
        tau: temperature of the soft label (> 0), ``soft_label`` only.
        gamma: margin scale, ``margin`` only.

    Returns:
        ``[N]`` float32 losses.
    """
    _check_choice("outcome loss type", loss_type, OUTCOME_LOSS_TYPES)
    _check_positive("outcome beta", beta)
    logratio_margin = chosen_logratio.float() - rejected_logratio.float()  # [N]
    z = beta * logratio_margin
    delta = chosen_reward.detach().float() - rejected_reward.detach().float()  # [N]
    if loss_type == "sigmoid":
        return -F.logsigmoid(z)
    if loss_type == "soft_label":
        _check_positive("tau", tau)
        p = torch.sigmoid(delta / tau)
        return -p * F.logsigmoid(z) - (1 - p) * F.logsigmoid(-z)
    if loss_type == "margin":
        return -F.logsigmoid(z - gamma * delta)
    if loss_type == "distill":
        return (z - delta) ** 2
    return (logratio_margin - 1 / (2 * beta)) ** 2  # ipo


def step_loss(
    chosen_step_logratios: torch.Tensor,
    rejected_step_logratios: torch.Tensor,
    chosen_step_scores: torch.Tensor,
    rejected_step_scores: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    beta: float,
    loss_type: StepLossType = "reward_weighted",
    alpha: float = 0.5,
    divergence: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step-level DPO loss per pair.

    With implicit step rewards ``h_t = beta * step_logratio_t`` and verifier
    scores ``g_t``, over real steps only:

    - ``reward_weighted``: ``u = sum_t (1 + alpha g^c_t) h^c_t - sum_t (1 - alpha g^r_t) h^r_t``,
      loss ``-log σ(u)``; at ``alpha = 0`` this is sigmoid DPO with ``beta``.
    - ``step_bce``: ``BCE(σ(h_t), (g_t + 1) / 2)`` averaged over the real
      steps of both responses of the pair.
    - ``first_divergence`` (Step-DPO): ``-log σ(h^c_k - h^r_k)`` with ``k =
      divergence``, the first step whose texts differ. Where ``k`` is past a
      response's real steps (truncation), that response's last real step is
      used instead.

    Args:
        chosen_step_logratios: ``[N, S]`` policy minus reference log-prob per chosen step.
        rejected_step_logratios: ``[N, S]`` the same for the rejected steps.
        chosen_step_scores: ``[N, S]`` verifier scores ``g^c`` in [-1, 1] (detached).
        rejected_step_scores: ``[N, S]`` verifier scores ``g^r`` in [-1, 1] (detached).
        chosen_mask: ``[N, S]`` bool, True on the chosen response's real steps.
        rejected_mask: ``[N, S]`` bool, True on the rejected response's real steps.
        beta: ``beta_s`` > 0.
        loss_type: one of :data:`STEP_LOSS_TYPES`.
        alpha: step reward scale in [0, 1], ``reward_weighted`` only.
        divergence: ``[N]`` long, 0-based step index; required by ``first_divergence``.

    Returns:
        ``[N]`` float32 losses.
    """
    _check_choice("step loss type", loss_type, STEP_LOSS_TYPES)
    _check_positive("step beta", beta)
    chosen_mask, rejected_mask = chosen_mask.bool(), rejected_mask.bool()
    chosen_h = torch.where(chosen_mask, beta * chosen_step_logratios.float(), 0.0)  # [N, S]
    rejected_h = torch.where(rejected_mask, beta * rejected_step_logratios.float(), 0.0)
    chosen_g = torch.where(chosen_mask, chosen_step_scores.detach().float(), 0.0)
    rejected_g = torch.where(rejected_mask, rejected_step_scores.detach().float(), 0.0)
    if loss_type == "reward_weighted":
        chosen_sum = ((1 + alpha * chosen_g) * chosen_h).sum(-1)  # [N]
        rejected_sum = ((1 - alpha * rejected_g) * rejected_h).sum(-1)
        return -F.logsigmoid(chosen_sum - rejected_sum)
    if loss_type == "step_bce":
        chosen_bce = F.binary_cross_entropy_with_logits(
            chosen_h, (chosen_g + 1) / 2, reduction="none"
        )  # [N, S]
        rejected_bce = F.binary_cross_entropy_with_logits(
            rejected_h, (rejected_g + 1) / 2, reduction="none"
        )
        total = (chosen_bce * chosen_mask).sum(-1) + (rejected_bce * rejected_mask).sum(-1)
        num_steps = chosen_mask.sum(-1) + rejected_mask.sum(-1)
        return total / num_steps.clamp(min=1)
    if divergence is None:
        raise ValueError(
            "step loss type 'first_divergence' needs `divergence` (index of the first differing step)"
        )
    divergence = divergence.long().clamp(min=0).unsqueeze(-1)  # [N, 1]
    chosen_k = torch.minimum(divergence, _last_real_index(chosen_mask).unsqueeze(-1))
    rejected_k = torch.minimum(divergence, _last_real_index(rejected_mask).unsqueeze(-1))
    margin = chosen_h.gather(-1, chosen_k) - rejected_h.gather(-1, rejected_k)  # [N, 1]
    return -F.logsigmoid(margin.squeeze(-1))
