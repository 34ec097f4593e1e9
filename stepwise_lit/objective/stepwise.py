"""The stepwise DPO objective of one batch: log-ratios, rewards and losses (docs/loss.md).

Pure functions of tensors: no model, tokenizer or trainer state. Rows of every ``[2B, ...]``
tensor are ``[chosen; rejected]``. Training, validation, test and predict all call
`stepwise_objective`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stepwise_lit.data.batch import chosen, rejected
from stepwise_lit.errors import SettingError
from stepwise_lit.objective.losses import AggregationFunction, aggregate_rewards, outcome_loss, step_loss


@dataclass(frozen=True)
class ObjectiveSettings:
    """The loss settings (the module's settings of the same names; see `StepwiseDPOModule`).

    Attributes:
        step_beta: β_s, h_t = β_s ρ_t.
        outcome_beta: β_o, z = β_o (ρ(y_c) − ρ(y_r)).
        outcome_loss_type: `stepwise_lit.objective.losses.outcome_loss`'s `loss_type`.
        step_loss_type: `stepwise_lit.objective.losses.step_loss`'s `loss_type`.
        aggregation_strategy: How step scores become an outcome reward (`aggregate_rewards`): a
            built-in name or a function (`stepwise_lit.objective.losses.resolve_aggregation` turns an
            import path into one).
        step_weights: Per-step weights of "weighted_sum".
        discount_gamma: γ of "discounted".
        step_reward_scale: α of "reward_weighted".
        soft_label_tau: τ of "soft_label".
        margin_gamma: γ of "margin".
        outcome_score_weight: w, the share of a row's outcome score in its reward.
        step_loss_weight: Weight of the step loss in the total.
        outcome_loss_weight: Weight of the outcome loss in the total.
        sft_weight: Weight of the per-token NLL of the chosen responses.
        step_reward_per_token: The step loss sees the per-token step reward h_t / n_t (n_t: the
            step's tokens) instead of h_t; the outcome loss keeps ρ(y).
    """

    step_beta: float = 0.1
    outcome_beta: float = 0.1
    outcome_loss_type: str = "soft_label"
    step_loss_type: str = "reward_weighted"
    aggregation_strategy: str | AggregationFunction = "mean"
    step_weights: list[float] | None = None
    discount_gamma: float = 0.9
    step_reward_scale: float = 0.5
    soft_label_tau: float = 1.0
    margin_gamma: float = 1.0
    outcome_score_weight: float = 0.5
    step_loss_weight: float = 0.5
    outcome_loss_weight: float = 0.5
    sft_weight: float = 0.0
    step_reward_per_token: bool = False


@dataclass(frozen=True)
class Objective:
    """What `stepwise_objective` gives. Only `loss` carries gradients.

    Attributes:
        loss: Scalar total L = w_s L_step + w_o L_outcome (+ w_sft L_sft).
        step_loss: Scalar mean step loss over (weighted) pairs.
        outcome_loss: Scalar mean outcome loss.
        sft_loss: Scalar per-token NLL of the chosen responses (computed even at weight 0).
        step_logratios: ``[2B, S]`` ρ_t, zero past a response's steps.
        logratios: ``[2B]`` ρ(y).
        rewards: ``[2B]`` implicit rewards β_o ρ(y).
        step_rewards: ``[2B, S]`` implicit step rewards h_t = β_s ρ_t (also with
            `step_reward_per_token`, whose h_t / n_t the step loss alone sees).
        verifier_rewards: ``[2B]`` R.
        policy_logps: ``[2B]`` policy sequence log-probs.
    """

    loss: torch.Tensor
    step_loss: torch.Tensor
    outcome_loss: torch.Tensor
    sft_loss: torch.Tensor
    step_logratios: torch.Tensor
    logratios: torch.Tensor
    rewards: torch.Tensor
    step_rewards: torch.Tensor
    verifier_rewards: torch.Tensor
    policy_logps: torch.Tensor


def check_objective_settings(settings: ObjectiveSettings) -> None:
    """Fails, naming the setting as the module's YAML does (``model.<setting>``), on values the
    losses cannot use. (The loss types are `Literal` settings of the module, checked there.)

    Raises:
        SettingError: naming the setting.
    """
    s = settings

    def bad(setting: str, problem: str) -> SettingError:
        return SettingError(f"model.{setting}: {problem}")

    for name in ("step_beta", "outcome_beta", "soft_label_tau"):
        if not (math.isfinite(getattr(s, name)) and getattr(s, name) > 0):
            raise bad(name, f"must be a finite number > 0, got {getattr(s, name)}")
    for name in ("step_reward_scale", "outcome_score_weight"):
        if not 0.0 <= getattr(s, name) <= 1.0:
            raise bad(name, f"must lie in [0, 1], got {getattr(s, name)}")
    for name in ("step_loss_weight", "outcome_loss_weight", "sft_weight"):
        if not (math.isfinite(getattr(s, name)) and getattr(s, name) >= 0):
            raise bad(name, f"must be a finite number >= 0, got {getattr(s, name)}")
    if s.step_loss_weight + s.outcome_loss_weight + s.sft_weight == 0:
        raise bad("step_loss_weight", "step_loss_weight, outcome_loss_weight and sft_weight are all 0: nothing to train")
    if s.step_weights is not None:
        if len(s.step_weights) == 0 or not all(math.isfinite(w) for w in s.step_weights):
            raise bad("step_weights", f"must be a non-empty list of finite numbers, got {s.step_weights}")
        if s.aggregation_strategy != "weighted_sum":
            raise bad("step_weights", f"is only used by aggregation_strategy: weighted_sum, not {s.aggregation_strategy!r}")
    elif s.aggregation_strategy == "weighted_sum":
        raise bad("step_weights", "aggregation_strategy: weighted_sum needs step_weights (one weight per step; "
                  "a step past the list takes the last), e.g. [1.0, 0.5]")
    if not 0.0 < s.discount_gamma <= 1.0:
        raise bad("discount_gamma", f"must lie in (0, 1], got {s.discount_gamma}")


def verifier_rewards(
    step_scores: torch.Tensor,
    step_mask: torch.Tensor,
    outcome_scores: torch.Tensor,
    has_outcome_scores: torch.Tensor,
    settings: ObjectiveSettings,
) -> torch.Tensor:
    """Verifier outcome rewards R = A(g), mixed with outcome scores where rows carry them.

    Args:
        step_scores: ``[2B, S]`` g_t.
        step_mask: ``[2B, S]`` bool, real steps.
        outcome_scores: ``[2B]`` outcome scores (0 where missing).
        has_outcome_scores: ``[2B]`` bool.
        settings: aggregation and `outcome_score_weight`.

    Returns:
        ``[2B]`` R: (1 − w) A(g) + w · outcome score where a row has one, else A(g).
    """
    rewards = aggregate_rewards(
        step_scores, step_mask, settings.aggregation_strategy, settings.step_weights, settings.discount_gamma
    )
    mixed = (1 - settings.outcome_score_weight) * rewards + settings.outcome_score_weight * outcome_scores
    return torch.where(has_outcome_scores, mixed, rewards)


def per_token_step_rewards(step_rewards: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
    """The length-normalised step reward ``h_t / n_t``; 0 where a step has no token (padding).

    Args:
        step_rewards: ``[N, S]`` step rewards ``h_t``.
        token_counts: ``[N, S]`` tokens per step ``n_t`` (`stepwise_lit.logprobs.forward.step_token_counts`).
    """
    return torch.where(token_counts > 0, step_rewards / token_counts.clamp(min=1), torch.zeros_like(step_rewards))


def pair_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over pairs of ``values`` ``[B]``, weighted by ``weights`` ``[B]`` when given (0 when all are 0)."""
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp(min=torch.finfo(values.dtype).tiny)


def sft_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-token NLL of the chosen responses: −Σ log p / Σ tokens over (weighted) pairs.

    Args:
        chosen_logps: ``[B]`` sequence log-probs of the chosen responses.
        chosen_tokens: ``[B]`` their numbers of response tokens.
        weights: ``[B]`` pair weights, or None.
    """
    return -pair_mean(chosen_logps, weights) / pair_mean(chosen_tokens.float(), weights).clamp(min=1)


def stepwise_objective(
    policy_step_logps: torch.Tensor,
    reference_step_logps: torch.Tensor,
    step_scores: torch.Tensor,
    step_mask: torch.Tensor,
    outcome_scores: torch.Tensor,
    has_outcome_scores: torch.Tensor,
    first_divergence: torch.Tensor,
    chosen_tokens: torch.Tensor,
    settings: ObjectiveSettings,
    pair_weights: torch.Tensor | None = None,
    step_token_counts: torch.Tensor | None = None,
) -> Objective:
    """Log-ratios, verifier rewards and the step, outcome, SFT and total losses of one batch.

    Args:
        policy_step_logps: ``[2B, S]`` the policy's per-step log-probs (with gradients).
        reference_step_logps: ``[2B, S]`` the reference's (no gradients; zeros when reference-free).
        step_scores: ``[2B, S]`` verifier step scores g_t (targets: detached inside the losses).
        step_mask: ``[2B, S]`` bool, real steps.
        outcome_scores: ``[2B]`` outcome scores (0 where missing).
        has_outcome_scores: ``[2B]`` bool.
        first_divergence: ``[B]`` first differing step of each pair (0-based).
        chosen_tokens: ``[B]`` response tokens of each chosen side (for the SFT loss).
        settings: The loss settings.
        pair_weights: ``[B]`` per-pair weights (0: a row that only pads an evaluation shard); None: all 1.
        step_token_counts: ``[2B, S]`` tokens per step n_t; required by `step_reward_per_token`.
    """
    step_logratios = (policy_step_logps - reference_step_logps) * step_mask  # ρ_t, [2B, S]
    logratios = step_logratios.sum(-1)  # ρ(y), [2B]
    step_loss_logratios = step_logratios  # what the step loss sees: ρ_t, or ρ_t / n_t
    if settings.step_reward_per_token:
        if step_token_counts is None:
            raise ValueError("step_reward_per_token needs step_token_counts (tokens per step, [2B, S])")
        step_loss_logratios = per_token_step_rewards(step_logratios, step_token_counts)
    rewards = verifier_rewards(step_scores, step_mask, outcome_scores, has_outcome_scores, settings)  # R, [2B]
    outcome_losses = outcome_loss(
        chosen(logratios), rejected(logratios), chosen(rewards), rejected(rewards),
        beta=settings.outcome_beta, loss_type=settings.outcome_loss_type, tau=settings.soft_label_tau,
        gamma=settings.margin_gamma,
    )
    step_losses = step_loss(
        chosen(step_loss_logratios), rejected(step_loss_logratios), chosen(step_scores), rejected(step_scores),
        chosen(step_mask), rejected(step_mask), beta=settings.step_beta, loss_type=settings.step_loss_type,
        alpha=settings.step_reward_scale, divergence=first_divergence,
    )
    step_loss_mean, outcome_loss_mean = pair_mean(step_losses, pair_weights), pair_mean(outcome_losses, pair_weights)
    loss = settings.step_loss_weight * step_loss_mean + settings.outcome_loss_weight * outcome_loss_mean
    chosen_sft_loss = sft_loss(chosen(policy_step_logps).sum(-1), chosen_tokens, pair_weights)
    if settings.sft_weight:
        loss = loss + settings.sft_weight * chosen_sft_loss
    step_logratios, logratios = step_logratios.detach(), logratios.detach()
    return Objective(
        loss=loss,
        step_loss=step_loss_mean.detach(),
        outcome_loss=outcome_loss_mean.detach(),
        sft_loss=chosen_sft_loss.detach(),
        step_logratios=step_logratios,
        logratios=logratios,
        rewards=settings.outcome_beta * logratios,
        step_rewards=settings.step_beta * step_logratios,
        verifier_rewards=rewards.detach(),
        policy_logps=policy_step_logps.detach().sum(-1),
    )
