"""`stepwise_lit.objective.stepwise`: the loss assembly of one batch, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from stepwise_lit.objective.stepwise import (
    ObjectiveSettings,
    sft_loss,
    stepwise_objective,
    verifier_rewards,
)


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def one_pair(settings: ObjectiveSettings, policy=None, weights=None, token_counts=None):
    """One pair (rows: chosen, rejected) of two steps; the rejected response has one real step."""
    policy = torch.tensor([[-1.0, -2.0], [-3.0, -5.0]], requires_grad=True) if policy is None else policy
    reference = torch.tensor([[-1.5, -2.5], [-2.0, -9.0]])
    scores = torch.tensor([[1.0, 0.5], [-1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    return policy, stepwise_objective(
        policy, reference, scores, mask, outcome_scores=torch.tensor([0.0, 0.0]),
        has_outcome_scores=torch.tensor([False, False]), first_divergence=torch.tensor([0]),
        chosen_tokens=torch.tensor([6]), settings=settings, pair_weights=weights, step_token_counts=token_counts,
    )


def test_sigmoid_and_reward_weighted_by_hand():
    """ρ_c = (0.5, 0.5), ρ_r = (−1, masked) so ρ(y_c) = 1, ρ(y_r) = −1. With β_o = β_s = 0.1:
    z = 0.1·(1 − (−1)) = 0.2, L_outcome = −log σ(0.2). At α = 0.5, u = Σ(1 + α g_c)h_c − Σ(1 − α g_r)h_r
    = 0.1·(1.5·0.5 + 1.25·0.5) − 0.1·(1.5·(−1)) = 0.1375 + 0.15 = 0.2875, L_step = −log σ(0.2875).
    Total 0.5·L_step + 0.5·L_outcome + 0.25·SFT, SFT = −(−1 − 2)/6 = 0.5."""
    settings = ObjectiveSettings(outcome_loss_type="sigmoid", step_loss_type="reward_weighted", sft_weight=0.25)
    _, out = one_pair(settings)
    torch.testing.assert_close(out.logratios, torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(out.step_logratios, torch.tensor([[0.5, 0.5], [-1.0, 0.0]]))
    torch.testing.assert_close(out.outcome_loss, torch.tensor(-logsigmoid(0.2)))
    torch.testing.assert_close(out.step_loss, torch.tensor(-logsigmoid(0.2875)))
    torch.testing.assert_close(out.sft_loss, torch.tensor(0.5))
    expected = 0.5 * -logsigmoid(0.2875) + 0.5 * -logsigmoid(0.2) + 0.25 * 0.5
    torch.testing.assert_close(out.loss, torch.tensor(expected))
    torch.testing.assert_close(out.rewards, torch.tensor([0.1, -0.1]))
    torch.testing.assert_close(out.step_rewards, 0.1 * out.step_logratios)
    torch.testing.assert_close(out.policy_logps, torch.tensor([-3.0, -8.0]))
    torch.testing.assert_close(out.verifier_rewards, torch.tensor([0.75, -1.0]))  # mean of the real steps


def test_per_token_step_rewards_feed_the_step_loss_by_hand():
    """Step tokens n_c = (2, 5), n_r = (4, padding): ρ_t / n_t = (0.25, 0.1) and (−0.25, 0). At β_s 0.1,
    α 0.5: u = 0.1·(1.5·0.25 + 1.25·0.1) − 0.1·(1.5·(−0.25)) = 0.05 + 0.0375 = 0.0875, L_step = −log σ(0.0875).
    The outcome loss keeps ρ(y) = (1, −1): z = 0.2, and the returned ρ_t and h_t stay per step, as without the setting."""
    settings = ObjectiveSettings(outcome_loss_type="sigmoid", step_reward_per_token=True)
    _, out = one_pair(settings, token_counts=torch.tensor([[2, 5], [4, 0]]))
    torch.testing.assert_close(out.step_logratios, torch.tensor([[0.5, 0.5], [-1.0, 0.0]]))
    torch.testing.assert_close(out.step_rewards, 0.1 * out.step_logratios)
    torch.testing.assert_close(out.step_loss, torch.tensor(-logsigmoid(0.0875)))
    torch.testing.assert_close(out.logratios, torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(out.outcome_loss, torch.tensor(-logsigmoid(0.2)))
    with pytest.raises(ValueError, match="step_token_counts"):
        one_pair(settings)


def test_only_the_loss_carries_gradients_and_they_reach_the_policy():
    policy, out = one_pair(ObjectiveSettings())
    for value in (out.step_loss, out.outcome_loss, out.sft_loss, out.step_logratios, out.logratios, out.rewards,
                  out.step_rewards, out.verifier_rewards, out.policy_logps):
        assert not value.requires_grad
    out.loss.backward()
    assert policy.grad is not None and policy.grad[1, 1] == 0  # a masked step gets no gradient


def test_a_pair_of_weight_zero_does_not_count():
    """Two pairs, the second weighted 0: the losses are the first pair's alone."""
    settings = ObjectiveSettings()
    _, alone = one_pair(settings)
    policy = torch.tensor([[-1.0, -2.0], [7.0, 1.0], [-3.0, -5.0], [2.0, 3.0]])
    reference = torch.tensor([[-1.5, -2.5], [0.0, 0.0], [-2.0, -9.0], [0.0, 0.0]])
    out = stepwise_objective(
        policy, reference, torch.tensor([[1.0, 0.5], [1.0, 1.0], [-1.0, 0.0], [-1.0, -1.0]]),
        torch.tensor([[True, True], [True, True], [True, False], [True, True]]), torch.zeros(4),
        torch.zeros(4, dtype=torch.bool), torch.tensor([0, 0]), torch.tensor([6, 9]), settings,
        pair_weights=torch.tensor([1.0, 0.0]),
    )
    for name in ("loss", "step_loss", "outcome_loss", "sft_loss"):
        torch.testing.assert_close(getattr(out, name), getattr(alone, name).detach(), msg=name)


def test_verifier_rewards_mix_outcome_scores_where_rows_have_them():
    """mean aggregation: A = (1 + 0)/2 = 0.5 and −1; w = 0.25 mixes row 0's outcome score 1:
    0.75·0.5 + 0.25·1 = 0.625; row 1 has none and keeps −1."""
    rewards = verifier_rewards(
        torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[True, True], [True, False]]),
        torch.tensor([1.0, 0.0]), torch.tensor([True, False]), ObjectiveSettings(outcome_score_weight=0.25),
    )
    torch.testing.assert_close(rewards, torch.tensor([0.625, -1.0]))


def test_sft_loss_is_the_per_token_nll():
    """−(Σ w log p)/(Σ w n): (−(−6 − 4)/2) / ((3 + 2)/2) = 5 / 2.5 = 2; with the second pair at
    weight 0: 6 / 3 = 2."""
    torch.testing.assert_close(sft_loss(torch.tensor([-6.0, -4.0]), torch.tensor([3, 2]), None), torch.tensor(2.0))
    torch.testing.assert_close(
        sft_loss(torch.tensor([-6.0, -4.0]), torch.tensor([3, 2]), torch.tensor([1.0, 0.0])), torch.tensor(2.0)
    )
