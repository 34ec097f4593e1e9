"""Step-error localisation (ProcessBench, Zheng et al. 2024) from per-step rewards of any step scorer.

:class:`ProcessBenchF1` with a threshold from :func:`choose_threshold`, and
:class:`WithinResponseAUROC`. Which reward is scored is the caller's choice: the implicit
step reward ``h_t = beta * (step log-ratio)`` sums over the step's tokens, so a long
step's reward is larger in size; its per-token form ``h_t / n_t`` (``n_t`` the step's
token count) removes that, and is passed the same way.

Every metric takes a per-response ``weights`` (0 for the duplicates a distributed sampler pads
with) and keeps sums as states (``dist_reduce_fx="sum"``), so the value over ranks equals the
value over all inputs on one rank; :class:`WithinResponseAUROC` and :class:`LabelledStepRewards`
(the responses a threshold is chosen on) keep the values themselves (``"cat"``).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from stepwise_lit.evaluation.preference import ones_if_none


def first_true(flags: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dimension, or -1 where there is none: ``[N, S]`` -> ``[N]`` long."""
    return torch.where(flags.any(-1), flags.long().argmax(-1), -1)


def first_error_labels(step_scores: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """ProcessBench labels from verifier step scores: the 0-based index of the first real
    step with ``g_t < 0``, or -1 when every real step has ``g_t >= 0``.

    Args:
        step_scores: ``[N, S]`` step scores ``g_t``.
        step_mask: ``[N, S]`` bool, real steps.

    Returns:
        ``[N]`` long labels.
    """
    return first_true(step_mask.bool() & (step_scores < 0))


def first_error_prediction(step_rewards: torch.Tensor, step_mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """The predicted earliest wrong step: the first real step whose reward is below ``threshold``, or -1.

    Args:
        step_rewards: ``[N, S]`` step rewards (compared in float64, as thresholds are chosen).
        step_mask: ``[N, S]`` bool, real steps.
        threshold: Rewards strictly below it mark a step wrong.

    Returns:
        ``[N]`` long, 0-based step index or -1.
    """
    return first_true(step_mask.bool() & (step_rewards.double() < threshold))


def f1_of(error_acc: torch.Tensor, correct_acc: torch.Tensor) -> torch.Tensor:
    """Harmonic mean ``2ab / (a + b)``, 0 where both are 0, NaN where either is NaN."""
    total = error_acc + correct_acc
    return torch.where(total > 0, 2 * error_acc * correct_acc / total.where(total > 0, 1.0), total)


class ProcessBenchF1(Metric):
    """ProcessBench error localisation at a fixed threshold.

    Per response, the label is the 0-based index of its earliest wrong step or -1
    (all right), the prediction :func:`first_error_prediction`. :meth:`compute` gives
    ``error_acc`` (exact-index accuracy over responses with an error), ``correct_acc``
    (share of all-right responses predicted -1) and ``f1``, their harmonic mean; an
    accuracy with no response to count is NaN, and so is ``f1`` then.

    Args:
        threshold: Step rewards below it mark a step wrong (see :func:`choose_threshold`).
    """

    full_state_update = False

    def __init__(self, threshold: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        for name in ("error_hits", "error_total", "correct_hits", "correct_total"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        step_rewards: torch.Tensor,
        step_mask: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Add N labelled responses.

        Args:
            step_rewards: ``[N, S]`` step rewards.
            step_mask: ``[N, S]`` bool, real steps.
            labels: ``[N]`` earliest wrong step (0-based) or -1.
            weights: ``[N]`` response weights; None: all 1.
        """
        weights = ones_if_none(weights, labels.shape[0], self.error_hits.device).double()
        hits = (first_error_prediction(step_rewards, step_mask, self.threshold) == labels).double()
        erroneous = (labels >= 0).double()
        self.error_hits += (hits * erroneous * weights).sum()
        self.error_total += (erroneous * weights).sum()
        self.correct_hits += (hits * (1 - erroneous) * weights).sum()
        self.correct_total += ((1 - erroneous) * weights).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        error_acc = self.error_hits / self.error_total
        correct_acc = self.correct_hits / self.correct_total
        return {"error_acc": error_acc, "correct_acc": correct_acc, "f1": f1_of(error_acc, correct_acc)}


def threshold_candidates(step_rewards: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """Thresholds worth trying: the distinct real-step rewards, the midpoints between
    neighbours, and the largest plus 1; ascending ``[C]`` float64.

    Every split of the rewards into "below" and "not below" is made by one of them:
    the smallest flags nothing, the largest plus 1 flags every step.
    """
    values = step_rewards[step_mask.bool()].double().unique()  # sorted
    return torch.cat([values, (values[1:] + values[:-1]) / 2, values[-1:] + 1]).sort().values


def choose_threshold(
    step_rewards: torch.Tensor, step_mask: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> float:
    """The threshold of :class:`ProcessBenchF1` that maximises F1 on labelled (validation) responses.

    Tries :func:`threshold_candidates` and returns the smallest one reaching the best
    F1 (on ties this is the midpoint rather than a reward value itself). Exact and
    fast: a response's prediction equals its label on one interval of thresholds,
    ``prefix_min[L] < t <= prefix_min[L-1]`` for label L (``prefix_min[-1] = inf``) and
    ``t <= min`` for label -1, so hits per candidate are two sorted counts.

    Args:
        step_rewards: ``[N, S]`` step rewards.
        step_mask: ``[N, S]`` bool, real steps, at least one per response.
        labels: ``[N]`` earliest wrong step (0-based) or -1; both kinds must occur.
        weights: ``[N]`` response weights; None: all 1.

    Returns:
        The threshold.

    Raises:
        ValueError: If the labels lack responses with an error or responses without one.
    """
    step_mask = step_mask.bool()
    labels = labels.long()
    weights = ones_if_none(weights, labels.shape[0], step_rewards.device).double()
    erroneous = labels >= 0
    if not (weights[erroneous].sum() > 0 and weights[~erroneous].sum() > 0):
        raise ValueError("choose_threshold needs responses with an error (label >= 0) and responses without (-1)")
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=step_rewards.device)
    prefix_min = step_rewards.double().masked_fill(~step_mask, inf).cummin(-1).values  # [N, S]
    padded = torch.cat([inf.expand(labels.shape[0], 1), prefix_min], dim=-1)  # padded[:, j + 1] = prefix_min[:, j]
    label_at = labels.clamp(0, step_mask.shape[-1] - 1).unsqueeze(-1)
    at_real_step = erroneous & (labels < step_mask.shape[-1]) & step_mask.gather(-1, label_at).squeeze(-1)
    low = torch.where(erroneous, padded.gather(-1, label_at + 1).squeeze(-1), -inf)
    high = torch.where(erroneous, padded.gather(-1, label_at).squeeze(-1), prefix_min[:, -1])
    high = torch.where(erroneous & ~at_real_step, low, high)  # a label at no real step is never hit
    candidates = threshold_candidates(step_rewards, step_mask)

    def hits(group: torch.Tensor) -> torch.Tensor:
        """Weighted responses of ``group`` whose interval ``(low, high]`` holds each candidate: ``[C]``."""
        below_low = weight_below(low[group], weights[group], candidates)
        return below_low - weight_below(high[group], weights[group], candidates)

    error_acc = hits(erroneous) / weights[erroneous].sum()
    correct_acc = hits(~erroneous) / weights[~erroneous].sum()
    return float(candidates[f1_of(error_acc, correct_acc).argmax()])


def weight_below(values: torch.Tensor, weights: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """For each point, the total weight of the values strictly below it.

    Args:
        values: ``[N]`` values.
        weights: ``[N]`` their weights.
        points: ``[C]`` ascending query points.

    Returns:
        ``[C]`` sums of the weights of values ``< point``.
    """
    order = values.argsort()
    cumulative = torch.cat([weights.new_zeros(1), weights[order].cumsum(0)])
    return cumulative[torch.searchsorted(values[order].contiguous(), points, right=False)]


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve: the chance that a random positive scores above a random
    negative, ties counting half (the Mann-Whitney U statistic over ``P * N``).

    Args:
        scores: ``[M]`` scores (any real values; no sigmoid is applied).
        labels: ``[M]`` bool, True for positives.

    Returns:
        Float64 scalar; NaN when either class is absent.
    """
    values, inverse, counts = scores.double().unique(return_inverse=True, return_counts=True)
    # the 1-based rank of each distinct value, averaged over its ties
    average_rank = counts.cumsum(0).double() - (counts - 1).double() / 2
    positives, negatives = labels.sum().double(), (~labels).sum().double()
    rank_sum = average_rank[inverse][labels].sum()
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


class WithinResponseAUROC(Metric):
    """AUROC of step rewards for good (``g_t > 0``) vs bad (``g_t < 0``) steps, over the steps
    of responses that have a bad step only.

    The pooled step AUROC also ranks the steps of all-good (chosen) responses against
    those of rejected ones, so it rewards telling which response is better; this one
    asks only where inside a flawed response the error is. Steps with ``g_t = 0``, padding
    and responses of weight 0 do not count; NaN when a class is absent. The counted
    rewards and labels are kept (``"cat"`` states), so the AUROC is exact after a sync.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("rewards", [], dist_reduce_fx="cat")
        self.add_state("good", [], dist_reduce_fx="cat")

    def update(
        self,
        step_rewards: torch.Tensor,
        step_scores: torch.Tensor,
        step_mask: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Add N responses.

        Args:
            step_rewards: ``[N, S]`` step rewards.
            step_scores: ``[N, S]`` verifier step scores ``g_t`` (the labels).
            step_mask: ``[N, S]`` bool, real steps.
            weights: ``[N]`` response weights; only whether each is > 0 counts.
        """
        step_mask = step_mask.bool()
        weights = ones_if_none(weights, step_rewards.shape[0], step_rewards.device)
        flawed = (step_mask & (step_scores < 0)).any(-1) & (weights > 0)
        counted = step_mask & (step_scores != 0) & flawed.unsqueeze(-1)
        # float32 both, as the empty placeholder torchmetrics syncs for a rank that saw nothing
        self.rewards.append(step_rewards[counted].float())
        self.good.append((step_scores[counted] > 0).float())

    def compute(self) -> torch.Tensor:
        if isinstance(self.rewards, list) and not self.rewards:  # a list before a sync, one tensor after
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        return auroc(dim_zero_cat(self.rewards), dim_zero_cat(self.good) > 0)


class LabelledStepRewards(Metric):
    """Collects labelled responses' step rewards, to choose a threshold on (:func:`choose_threshold`).

    States are ``"cat"``: the real steps' rewards flattened, each response's step count,
    label and weight, so after a sync every rank holds every response. Responses of weight
    0 (distributed padding) are not kept.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("rewards", "lengths", "labels", "weights"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(
        self, step_rewards: torch.Tensor, step_mask: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
    ) -> None:
        """Add N responses.

        Args:
            step_rewards: ``[N, S]`` step rewards.
            step_mask: ``[N, S]`` bool, real steps, a prefix of each row.
            labels: ``[N]`` earliest wrong step (0-based) or -1.
            weights: ``[N]`` response weights; None: all 1.
        """
        weights = ones_if_none(weights, labels.shape[0], step_rewards.device)
        kept = weights > 0
        step_mask = step_mask.bool()[kept]
        self.rewards.append(step_rewards[kept][step_mask].double())
        self.lengths.append(step_mask.sum(-1).double())
        self.labels.append(labels[kept].double())
        self.weights.append(weights[kept].double())

    def compute(self) -> dict[str, torch.Tensor]:
        """``step_rewards`` ``[N, S]`` (0 past a response's steps), ``step_mask`` ``[N, S]``,
        ``labels`` ``[N]`` long and ``weights`` ``[N]`` of every response kept."""
        if isinstance(self.rewards, list) and not self.rewards:  # a list before a sync, one tensor after
            empty = torch.zeros(0, dtype=torch.float64, device=self.device)
            return {"step_rewards": empty[:, None], "step_mask": empty[:, None].bool(), "labels": empty.long(), "weights": empty}
        rewards, lengths = dim_zero_cat(self.rewards), dim_zero_cat(self.lengths).long()
        num_steps = int(lengths.max()) if lengths.numel() else 0
        step_mask = torch.arange(num_steps, device=lengths.device) < lengths[:, None]  # [N, S]
        step_rewards = torch.zeros(step_mask.shape, dtype=torch.float64, device=rewards.device)
        step_rewards[step_mask] = rewards
        return {
            "step_rewards": step_rewards,
            "step_mask": step_mask,
            "labels": dim_zero_cat(self.labels).long(),
            "weights": dim_zero_cat(self.weights),
        }
