"""Reward aggregation and DPO losses (stepwise_lit.objective.losses) against hand computations."""

import math
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from stepwise_lit.errors import SettingError
from stepwise_lit.objective.losses import (
    AGGREGATION_STRATEGIES,
    OUTCOME_LOSS_TYPES,
    STEP_LOSS_TYPES,
    AggregationName,
    OutcomeLossType,
    StepLossType,
    aggregate_rewards,
    outcome_loss,
    resolve_aggregation,
    step_loss,
)
from tests.helpers import custom_aggregation

LOG2 = math.log(2)

# Two responses: 3 real steps, and 2 real steps + 1 pad (its score 5.0 must be ignored).
SCORES = torch.tensor([[0.5, -1.0, 1.0], [1.0, 0.0, 5.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def _sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize(
    "strategy, kwargs, expected",
    [
        # row 0: 0.5 - 1 + 1 = 0.5; row 1: 1 + 0 = 1
        ("sum", {}, [0.5, 1.0]),
        # 0.5 / 3, 1 / 2
        ("mean", {}, [0.5 / 3, 0.5]),
        # weights [2, 3]: row 0 = 2*0.5 + 3*(-1) + 3*1 (step 3 past the list uses 3) = 1; row 1 = 2
        ("weighted_sum", {"weights": [2.0, 3.0]}, [1.0, 2.0]),
        # no weights: all 1, same as sum
        ("weighted_sum", {}, [0.5, 1.0]),
        ("min", {}, [-1.0, 0.0]),
        # row 1's masked 5.0 is not the max
        ("max", {}, [1.0, 1.0]),
        # last real step: row 0 step 3, row 1 step 2
        ("last", {}, [1.0, 0.0]),
        # row 0: 2 * (0.75 * 0 * 1) - 1 = -1; row 1: 2 * (1 * 0.5) - 1 = 0
        ("product", {}, [-1.0, 0.0]),
        # gamma 0.5: row 0 = 0.5 - 0.5 + 0.25 = 0.25; row 1 = 1 + 0 = 1
        ("discounted", {"gamma": 0.5}, [0.25, 1.0]),
    ],
)
def test_aggregate_rewards_hand_computed(strategy, kwargs, expected):
    result = aggregate_rewards(SCORES, MASK, strategy, **kwargs)
    assert result.dtype == torch.float32
    assert_close(result, torch.tensor(expected))


def test_product_of_all_correct_steps():
    """g = [0.5, 0.5]: 2 * 0.75 * 0.75 - 1 = 0.125."""
    result = aggregate_rewards(torch.tensor([[0.5, 0.5]]), torch.tensor([[True, True]]), "product")
    assert_close(result, torch.tensor([0.125]))


@pytest.mark.parametrize("strategy", AGGREGATION_STRATEGIES)
def test_row_without_real_steps_aggregates_to_zero(strategy):
    result = aggregate_rewards(torch.tensor([[0.7, -0.3]]), torch.tensor([[False, False]]), strategy)
    assert_close(result, torch.tensor([0.0]))


def test_aggregate_rejects_unknown_strategy_and_empty_weights():
    with pytest.raises(ValueError, match="'median'.*sum, mean"):
        aggregate_rewards(SCORES, MASK, "median")
    with pytest.raises(ValueError, match="empty"):
        aggregate_rewards(SCORES, MASK, "weighted_sum", weights=[])


# --- outcome loss ---------------------------------------------------------------

# Two pairs. beta = 0.5.
# logratio margins: pair 0: 1.0 - (-1.0) = 2 -> z = 1; pair 1: 0.2 - 0.6 = -0.4 -> z = -0.2
# rewards: delta = 1 - (-1) = 2 and 0.5 - 0.5 = 0
CHOSEN_LOGRATIO = torch.tensor([1.0, 0.2])
REJECTED_LOGRATIO = torch.tensor([-1.0, 0.6])
CHOSEN_REWARD = torch.tensor([1.0, 0.5])
REJECTED_REWARD = torch.tensor([-1.0, 0.5])
BETA = 0.5
Z = [1.0, -0.2]
DELTA = [2.0, 0.0]


def _outcome(loss_type, **kwargs):
    return outcome_loss(
        CHOSEN_LOGRATIO, REJECTED_LOGRATIO, CHOSEN_REWARD, REJECTED_REWARD, BETA, loss_type, **kwargs
    )


def test_outcome_sigmoid_hand_computed():
    """-log σ(z): -log σ(1) = 0.31326, -log σ(-0.2) = 0.79814."""
    assert_close(_outcome("sigmoid"), torch.tensor([-math.log(_sig(z)) for z in Z]))


def test_outcome_soft_label_hand_computed():
    """tau = 2: p = σ(delta / 2) = [σ(1), 0.5];
    loss = -p log σ(z) - (1 - p) log σ(-z)."""
    p = [_sig(1.0), 0.5]
    expected = [-pi * math.log(_sig(z)) - (1 - pi) * math.log(_sig(-z)) for pi, z in zip(p, Z)]
    assert_close(_outcome("soft_label", tau=2.0), torch.tensor(expected))


def test_outcome_margin_hand_computed():
    """gamma = 0.25: -log σ(z - 0.25 delta) = [-log σ(0.5), -log σ(-0.2)]."""
    expected = [-math.log(_sig(0.5)), -math.log(_sig(-0.2))]
    assert_close(_outcome("margin", gamma=0.25), torch.tensor(expected))


def test_outcome_distill_hand_computed():
    """(z - delta)^2 = [(1 - 2)^2, (-0.2)^2] = [1, 0.04]."""
    assert_close(_outcome("distill"), torch.tensor([1.0, 0.04]))


def test_outcome_ipo_hand_computed():
    """(margin - 1 / (2 beta))^2 = [(2 - 1)^2, (-0.4 - 1)^2] = [1, 1.96]."""
    assert_close(_outcome("ipo"), torch.tensor([1.0, 1.96]))


@pytest.mark.parametrize("loss_type", ["sigmoid", "soft_label", "margin"])
def test_outcome_loss_is_log2_at_policy_equals_reference(loss_type):
    """Logratios 0 -> z = 0. margin: only log 2 when the reward margin is 0 too, so use equal rewards."""
    zeros = torch.zeros(3)
    rewards = torch.tensor([0.3, -0.2, 1.0])
    result = outcome_loss(zeros, zeros, rewards, rewards, 0.1, loss_type)
    assert_close(result, torch.full((3,), LOG2))


def test_soft_label_is_log2_at_policy_equals_reference_for_any_rewards():
    """z = 0: -p log(1/2) - (1 - p) log(1/2) = log 2 whatever p."""
    zeros = torch.zeros(2)
    result = outcome_loss(zeros, zeros, torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 0.5]), 0.1)
    assert_close(result, torch.full((2,), LOG2))


def test_swapping_chosen_and_rejected_flips_sigmoid_margin():
    swapped = outcome_loss(
        REJECTED_LOGRATIO, CHOSEN_LOGRATIO, REJECTED_REWARD, CHOSEN_REWARD, BETA, "sigmoid"
    )
    assert_close(swapped, torch.tensor([-math.log(_sig(-z)) for z in Z]))
    assert_close(swapped, -F.logsigmoid(-BETA * (CHOSEN_LOGRATIO - REJECTED_LOGRATIO)))


def test_outcome_loss_bad_settings():
    with pytest.raises(ValueError, match="'hinge'.*sigmoid, soft_label"):
        _outcome("hinge")
    with pytest.raises(ValueError, match="outcome beta"):
        outcome_loss(CHOSEN_LOGRATIO, REJECTED_LOGRATIO, CHOSEN_REWARD, REJECTED_REWARD, 0.0)
    with pytest.raises(ValueError, match="tau"):
        _outcome("soft_label", tau=0.0)


@pytest.mark.parametrize("loss_type", OUTCOME_LOSS_TYPES)
def test_outcome_gradients_reach_logratios_not_rewards(loss_type):
    chosen_logratio = CHOSEN_LOGRATIO.clone().requires_grad_()
    rejected_logratio = REJECTED_LOGRATIO.clone().requires_grad_()
    chosen_reward = CHOSEN_REWARD.clone().requires_grad_()
    rejected_reward = REJECTED_REWARD.clone().requires_grad_()
    loss = outcome_loss(chosen_logratio, rejected_logratio, chosen_reward, rejected_reward, BETA, loss_type)
    loss.sum().backward()
    assert chosen_logratio.grad.abs().sum() > 0 and rejected_logratio.grad.abs().sum() > 0
    assert chosen_reward.grad is None and rejected_reward.grad is None


# --- step loss ------------------------------------------------------------------

# Two pairs, S = 3, beta = 0.5.
# pair 0: chosen 3 real steps, rejected 2 real steps; pair 1: chosen 2, rejected 3.
CHOSEN_STEP_LOGRATIOS = torch.tensor([[0.4, 0.2, -0.2], [1.0, -0.6, 9.0]])  # 9.0 is padding
REJECTED_STEP_LOGRATIOS = torch.tensor([[0.2, -1.0, 7.0], [0.0, 0.4, -0.8]])  # 7.0 is padding
CHOSEN_STEP_SCORES = torch.tensor([[1.0, 1.0, 0.5], [1.0, -1.0, 3.0]])
REJECTED_STEP_SCORES = torch.tensor([[1.0, -1.0, 3.0], [0.0, 1.0, -1.0]])
CHOSEN_MASK = torch.tensor([[True, True, True], [True, True, False]])
REJECTED_MASK = torch.tensor([[True, True, False], [True, True, True]])
STEP_BETA = 0.5
# h = beta * logratio on real steps:
# chosen h:   [[0.2, 0.1, -0.1], [0.5, -0.3, -]]
# rejected h: [[0.1, -0.5, -],   [0.0, 0.2, -0.4]]


def _step(loss_type, **kwargs):
    return step_loss(
        CHOSEN_STEP_LOGRATIOS,
        REJECTED_STEP_LOGRATIOS,
        CHOSEN_STEP_SCORES,
        REJECTED_STEP_SCORES,
        CHOSEN_MASK,
        REJECTED_MASK,
        STEP_BETA,
        loss_type,
        **kwargs,
    )


def test_reward_weighted_hand_computed():
    """alpha = 0.5.
    pair 0: chosen  (1.5)(0.2) + (1.5)(0.1) + (1.25)(-0.1) = 0.325
            rejected (0.5)(0.1) + (1.5)(-0.5) = -0.7           -> u = 1.025
    pair 1: chosen  (1.5)(0.5) + (0.5)(-0.3) = 0.6
            rejected (1)(0) + (0.5)(0.2) + (1.5)(-0.4) = -0.5  -> u = 1.1
    """
    expected = [-math.log(_sig(1.025)), -math.log(_sig(1.1))]
    assert_close(_step("reward_weighted", alpha=0.5), torch.tensor(expected))


def _bce(h, g):
    y = (g + 1) / 2
    return -y * math.log(_sig(h)) - (1 - y) * math.log(_sig(-h))


def test_step_bce_hand_computed():
    """Mean of BCE(σ(h_t), (g_t+1)/2) over the pair's real steps (5 per pair)."""
    pair0 = [_bce(0.2, 1), _bce(0.1, 1), _bce(-0.1, 0.5), _bce(0.1, 1), _bce(-0.5, -1)]
    pair1 = [_bce(0.5, 1), _bce(-0.3, -1), _bce(0.0, 0), _bce(0.2, 1), _bce(-0.4, -1)]
    expected = [sum(pair0) / 5, sum(pair1) / 5]
    assert_close(_step("step_bce"), torch.tensor(expected))


def test_first_divergence_hand_computed_with_clamp():
    """divergence = [1, 2].
    pair 0: k = 1 for both: -log σ(h^c_1 - h^r_1) = -log σ(0.1 - (-0.5)) = -log σ(0.6)
    pair 1: k = 2 is past the chosen's 2 real steps -> chosen uses its last real step (1):
            -log σ(h^c_1 - h^r_2) = -log σ(-0.3 - (-0.4)) = -log σ(0.1)
    """
    expected = [-math.log(_sig(0.6)), -math.log(_sig(0.1))]
    assert_close(_step("first_divergence", divergence=torch.tensor([1, 2])), torch.tensor(expected))


@pytest.mark.parametrize("loss_type", STEP_LOSS_TYPES)
def test_step_loss_is_log2_at_policy_equals_reference(loss_type):
    zeros = torch.zeros(2, 3)
    result = step_loss(
        zeros,
        zeros,
        CHOSEN_STEP_SCORES,
        REJECTED_STEP_SCORES,
        CHOSEN_MASK,
        REJECTED_MASK,
        0.1,
        loss_type,
        divergence=torch.tensor([0, 2]),
    )
    assert_close(result, torch.full((2,), LOG2))


def test_reward_weighted_at_alpha_zero_equals_sigmoid_outcome():
    """Step logratios sum (over real steps) to the sequence logratios."""
    chosen_seq = (CHOSEN_STEP_LOGRATIOS * CHOSEN_MASK).sum(-1)
    rejected_seq = (REJECTED_STEP_LOGRATIOS * REJECTED_MASK).sum(-1)
    sigmoid = outcome_loss(chosen_seq, rejected_seq, torch.zeros(2), torch.zeros(2), STEP_BETA, "sigmoid")
    assert_close(_step("reward_weighted", alpha=0.0), sigmoid)


def test_step_loss_bad_settings():
    with pytest.raises(ValueError, match="'stepwise'.*reward_weighted, step_bce, first_divergence"):
        _step("stepwise")
    with pytest.raises(ValueError, match="divergence"):
        _step("first_divergence")
    with pytest.raises(ValueError, match="step beta"):
        step_loss(
            CHOSEN_STEP_LOGRATIOS,
            REJECTED_STEP_LOGRATIOS,
            CHOSEN_STEP_SCORES,
            REJECTED_STEP_SCORES,
            CHOSEN_MASK,
            REJECTED_MASK,
            -1.0,
        )


@pytest.mark.parametrize("loss_type", STEP_LOSS_TYPES)
def test_step_gradients_reach_real_step_logratios_not_scores(loss_type):
    chosen = CHOSEN_STEP_LOGRATIOS.clone().requires_grad_()
    rejected = REJECTED_STEP_LOGRATIOS.clone().requires_grad_()
    chosen_scores = CHOSEN_STEP_SCORES.clone().requires_grad_()
    rejected_scores = REJECTED_STEP_SCORES.clone().requires_grad_()
    loss = step_loss(
        chosen,
        rejected,
        chosen_scores,
        rejected_scores,
        CHOSEN_MASK,
        REJECTED_MASK,
        STEP_BETA,
        loss_type,
        divergence=torch.tensor([1, 2]),
    )
    loss.sum().backward()
    assert chosen.grad.abs().sum() > 0 and rejected.grad.abs().sum() > 0
    assert torch.all(chosen.grad[~CHOSEN_MASK] == 0) and torch.all(rejected.grad[~REJECTED_MASK] == 0)
    assert chosen_scores.grad is None and rejected_scores.grad is None


# ------------------------------------------------------------------ user aggregation functions


def test_choice_tuples_are_the_literal_types():
    assert AGGREGATION_STRATEGIES == get_args(AggregationName) and "discounted" in AGGREGATION_STRATEGIES
    assert OUTCOME_LOSS_TYPES == get_args(OutcomeLossType) and STEP_LOSS_TYPES == get_args(StepLossType)


@pytest.mark.parametrize("name", AGGREGATION_STRATEGIES)
def test_built_in_names_resolve_to_themselves(name):
    assert resolve_aggregation(name) == name


def test_a_function_by_import_path_aggregates():
    """`fraction_good` = 2 * good / T - 1 over real steps: row 0 has g (0.5, -1, 1): 2 of 3 good,
    1/3; row 1 (1, 0) [5.0 masked]: 1 of 2, 0.0; a row without real steps: 0."""
    function = resolve_aggregation("tests.helpers.custom_aggregation.fraction_good")
    assert function is custom_aggregation.fraction_good
    scores = torch.cat([SCORES, torch.tensor([[7.0, 7.0, 7.0]])])
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.bool)])
    rewards = aggregate_rewards(scores, mask, function)
    assert_close(rewards, torch.tensor([1 / 3, 0.0, 0.0]))
    assert rewards.dtype == torch.float32


def test_a_function_sees_zero_on_masked_steps_and_no_graph():
    seen = {}

    def record(scores, mask):
        seen.update(scores=scores, mask=mask)
        return scores.sum(-1)

    rewards = aggregate_rewards(SCORES.clone().requires_grad_(), MASK.long(), record)
    assert_close(seen["scores"], torch.tensor([[0.5, -1.0, 1.0], [1.0, 0.0, 0.0]]))
    assert seen["mask"].dtype == torch.bool and not seen["scores"].requires_grad
    assert_close(rewards, torch.tensor([0.5, 1.0]))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("median", r"unknown value 'median'; choose one of sum, mean, .*package\.module\.function"),
        ("no_such_package.mod.fn", r"cannot import module 'no_such_package\.mod' of 'no_such_package\.mod\.fn'"),
        ("tests.helpers.custom_aggregation.missing", r"module 'tests.helpers.custom_aggregation' has no attribute 'missing'"),
        ("tests.helpers.custom_aggregation.NOT_A_FUNCTION", r"'tests\.helpers\.custom_aggregation\.NOT_A_FUNCTION' is not callable \(type int\)"),
    ],
)
def test_unusable_names_are_setting_errors(name, message):
    with pytest.raises(SettingError, match=rf"^model\.aggregation_strategy: {message}"):
        resolve_aggregation(name)


@pytest.mark.parametrize(
    ("function", "problem"),
    [
        (custom_aggregation.per_step, r"shape \[2, 3\]"),
        (custom_aggregation.count_good, r"a torch\.int64 tensor"),
        (custom_aggregation.as_list, r"a list"),
        (custom_aggregation.divide_by_zero, r"non-finite values"),
    ],
)
def test_a_function_returning_the_wrong_thing_is_named(function, problem):
    expected = (
        rf"^model\.aggregation_strategy: tests\.helpers\.custom_aggregation\.{function.__name__} returned {problem}; "
        r"expected a floating tensor of shape \[2\]"
    )
    with pytest.raises(SettingError, match=expected):
        aggregate_rewards(SCORES, MASK, function)
