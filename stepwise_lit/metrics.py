"""Preference metrics as torchmetrics objects, synced across ranks by their ``dist_reduce_fx``.

Every metric honours a per-pair ``weight`` (0 for the duplicated samples a
distributed sampler pads with). Weighted means use :class:`WeightedMean`
rather than ``torchmetrics.aggregation.MeanMetric``: with
``nan_strategy="disable"`` MeanMetric replaces the weights by ones (torchmetrics
1.9), and with its other strategies it drops or replaces NaNs, which would hide
a diverged run.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.utilities import dim_zero_cat

PAIR_METRICS = (
    "reward_accuracy",
    "reward_margin",
    "chosen_reward",
    "rejected_reward",
    "chosen_logps",
    "rejected_logps",
    "verifier_agreement",
)
"""Per-pair weighted means, always present in :meth:`PreferenceMetrics.compute`."""

_NOT_COUNTED = -1  # AUROC target of a step that does not count (masked, g = 0 or weight 0)


class WeightedMean(Metric):
    """Exact weighted mean ``sum(w * x) / sum(w)``; NaN before any weight is seen."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("weighted_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total_weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, weights: torch.Tensor) -> None:
        """Add values with their weights.

        Args:
            values: any shape.
            weights: broadcastable to ``values``; non-negative.
        """
        weights = torch.broadcast_to(weights, values.shape).float()
        self.weighted_sum += (values.float() * weights).sum()
        self.total_weight += weights.sum()

    def compute(self) -> torch.Tensor:
        return self.weighted_sum / self.total_weight


class StepIndexAccuracy(Metric):
    """Weighted accuracy per step index, and the weighted number of steps it counts.

    ``compute`` gives two vectors ``[max_steps]``: the accuracy (NaN where no step
    was seen) and the count. Steps at index ``max_steps`` or later are not counted.
    """

    full_state_update = False

    def __init__(self, max_steps: int = 16, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_steps = max_steps
        self.add_state("correct", torch.zeros(max_steps), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(max_steps), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, weights: torch.Tensor) -> None:
        """Add per-step outcomes.

        Args:
            correct: ``[N, S]`` 1.0 where the step is classified correctly.
            weights: ``[N, S]`` weight of each step (0 for steps that do not count).
        """
        counted = min(correct.shape[-1], self.max_steps)
        self.correct[:counted] += (correct * weights).sum(0)[:counted]
        self.total[:counted] += weights.float().sum(0)[:counted]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.correct / self.total, self.total.clone()


class StepAUROC(BinaryAUROC):
    """Binary AUROC that is NaN (not a warning and 0) when a class is absent.

    Targets equal to ``-1`` are ignored.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(ignore_index=_NOT_COUNTED, **kwargs)

    def compute(self) -> torch.Tensor:
        if not len(self.target):
            return torch.tensor(float("nan"), device=self.device)
        target = dim_zero_cat(self.target)
        if not ((target == 1).any() and (target == 0).any()):
            return torch.tensor(float("nan"), device=self.device)
        return super().compute()


def _sign_agreement(step_rewards: torch.Tensor, step_scores: torch.Tensor) -> torch.Tensor:
    """1.0 where ``sign(h_t) == sign(g_t)``, else 0.0; ``[N, S]``."""
    return (torch.sign(step_rewards) == torch.sign(step_scores)).float()


def _first_error_distance(
    step_rewards: torch.Tensor, step_scores: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """How far, in steps, each response's lowest implicit step reward is from its first bad step.

    Args:
        step_rewards: ``[N, S]`` implicit step rewards ``h_t``.
        step_scores: ``[N, S]`` verifier step scores ``g_t``; a step is bad where ``g_t < 0``.
        mask: ``[N, S]`` bool, real steps.

    Returns:
        ``|argmin_t h_t - first bad t|`` as float ``[N]`` (argmin over real steps, the
        first on ties), and a float ``[N]`` that is 1.0 where the response has a bad step.
    """
    mask = mask.bool()
    bad = mask & (step_scores < 0)
    first_bad = bad.float().argmax(-1)  # the first maximal value: the first bad step
    lowest = step_rewards.float().masked_fill(~mask, float("inf")).argmin(-1)
    return (lowest - first_bad).abs().float(), bad.any(-1).float()


class PreferenceMetrics(torch.nn.Module):
    """Implicit-reward and verifier metrics for a stage (train, val or test).

    :meth:`compute` returns float32 tensors under these keys:

    - ``reward_accuracy``: fraction of pairs with chosen implicit reward > rejected
    - ``reward_margin``, ``chosen_reward``, ``rejected_reward``: mean implicit rewards
    - ``chosen_logps``, ``rejected_logps``: mean policy sequence log-probs
    - ``verifier_agreement``: fraction of pairs with ``R_c > R_r``
    - ``step_accuracy``: fraction of real steps with ``g_t != 0`` (both responses)
      where ``sign(h_t) == sign(g_t)``; absent when there is no such step
    - ``step_auroc``: AUROC of ``h_t`` for ``g_t > 0`` over the same steps;
      absent when one class is missing
    - ``chosen_step_accuracy_by_index``, ``rejected_step_accuracy_by_index``:
      vectors ``[max_step_index]`` of ``step_accuracy`` per step index (0-based),
      NaN where no step was seen
    - ``chosen_steps_by_index``, ``rejected_steps_by_index``: vectors
      ``[max_step_index]``, the (weighted) number of steps those accuracies count
    - ``first_error_accuracy``: over rejected responses with a step the verifier
      marks bad (``g_t < 0``; with -1/0/+1 labels, a -1 step), the fraction whose
      lowest implicit step reward ``h_t`` (over its real steps; the first on ties)
      is at the first bad step; absent when there is no such response
    - ``first_error_distance``: over the same responses, the mean absolute
      distance in steps between the lowest-``h_t`` step and the first bad step

    AUROC counts a step when its pair weight is > 0 (it takes no fractional weights).

    Args:
        max_step_index: length of the per-index step accuracy vectors.
    """

    def __init__(self, max_step_index: int = 16) -> None:
        super().__init__()
        self.pair_means = torch.nn.ModuleDict({name: WeightedMean() for name in PAIR_METRICS})
        self.step_accuracy = WeightedMean()
        self.step_auroc = StepAUROC()
        self.chosen_step_accuracy_by_index = StepIndexAccuracy(max_step_index)
        self.rejected_step_accuracy_by_index = StepIndexAccuracy(max_step_index)
        self.first_error_accuracy = WeightedMean()
        self.first_error_distance = WeightedMean()

    @torch.no_grad()
    def update(
        self,
        chosen_rewards: torch.Tensor,
        rejected_rewards: torch.Tensor,
        chosen_step_rewards: torch.Tensor,
        rejected_step_rewards: torch.Tensor,
        chosen_step_scores: torch.Tensor,
        rejected_step_scores: torch.Tensor,
        chosen_mask: torch.Tensor,
        rejected_mask: torch.Tensor,
        chosen_verifier_rewards: torch.Tensor,
        rejected_verifier_rewards: torch.Tensor,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> None:
        """Add a batch of N pairs.

        Args:
            chosen_rewards: ``[N]`` implicit reward ``beta_o * logratio`` of the chosen response.
            rejected_rewards: ``[N]`` the same for the rejected response.
            chosen_step_rewards: ``[N, S]`` implicit step rewards ``h_t`` of the chosen response.
            rejected_step_rewards: ``[N, S]`` the same for the rejected response.
            chosen_step_scores: ``[N, S]`` verifier step scores ``g_t`` of the chosen response.
            rejected_step_scores: ``[N, S]`` the same for the rejected response.
            chosen_mask: ``[N, S]`` bool, real steps of the chosen response.
            rejected_mask: ``[N, S]`` bool, real steps of the rejected response.
            chosen_verifier_rewards: ``[N]`` verifier outcome reward ``R_c``.
            rejected_verifier_rewards: ``[N]`` verifier outcome reward ``R_r``.
            chosen_logps: ``[N]`` policy sequence log-prob of the chosen response.
            rejected_logps: ``[N]`` the same for the rejected response.
            weight: ``[N]`` per-pair weight (0 for padding duplicates); default all 1.
        """
        chosen_rewards, rejected_rewards = chosen_rewards.float(), rejected_rewards.float()
        if weight is None:
            weight = torch.ones_like(chosen_rewards)
        weight = weight.float()
        pair_values = {
            "reward_accuracy": (chosen_rewards > rejected_rewards).float(),
            "reward_margin": chosen_rewards - rejected_rewards,
            "chosen_reward": chosen_rewards,
            "rejected_reward": rejected_rewards,
            "chosen_logps": chosen_logps.float(),
            "rejected_logps": rejected_logps.float(),
            "verifier_agreement": (chosen_verifier_rewards > rejected_verifier_rewards).float(),
        }
        for name, values in pair_values.items():
            self.pair_means[name].update(values, weight)

        step_rewards = torch.cat([chosen_step_rewards, rejected_step_rewards]).float()  # [2N, S]
        step_scores = torch.cat([chosen_step_scores, rejected_step_scores]).float()
        counted = torch.cat([chosen_mask, rejected_mask]).bool() & (step_scores != 0)
        step_weights = weight.repeat(2).unsqueeze(-1) * counted  # [2N, S]
        agreement = _sign_agreement(step_rewards, step_scores)  # [2N, S]
        self.step_accuracy.update(agreement, step_weights)
        auroc_target = torch.where(step_weights > 0, (step_scores > 0).long(), _NOT_COUNTED)
        # sigmoid keeps AUROC's ranking and puts every batch in [0, 1], so torchmetrics
        # never applies its own per-batch sigmoid to some batches and not to others.
        self.step_auroc.update(torch.sigmoid(step_rewards).flatten(), auroc_target.flatten())
        num_pairs = chosen_rewards.shape[0]
        self.chosen_step_accuracy_by_index.update(agreement[:num_pairs], step_weights[:num_pairs])
        self.rejected_step_accuracy_by_index.update(agreement[num_pairs:], step_weights[num_pairs:])
        distance, has_bad_step = _first_error_distance(rejected_step_rewards, rejected_step_scores, rejected_mask)
        self.first_error_accuracy.update((distance == 0).float(), weight * has_bad_step)
        self.first_error_distance.update(distance, weight * has_bad_step)

    def compute(self) -> dict[str, torch.Tensor]:
        """Metric values (see the class docstring for the keys)."""
        values = {name: metric.compute() for name, metric in self.pair_means.items()}
        for name in ("step_accuracy", "step_auroc", "first_error_accuracy", "first_error_distance"):
            value = getattr(self, name).compute()
            if not torch.isnan(value):
                values[name] = value
        for side in ("chosen", "rejected"):
            accuracy, count = getattr(self, f"{side}_step_accuracy_by_index").compute()
            values[f"{side}_step_accuracy_by_index"], values[f"{side}_steps_by_index"] = accuracy, count
        return values

    def reset(self) -> None:
        """Clear every metric's state (call at the end of each epoch)."""
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()
