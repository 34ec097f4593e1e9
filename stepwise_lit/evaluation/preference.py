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


def ones_if_none(weights: torch.Tensor | None, count: int, device: torch.device) -> torch.Tensor:
    """``weights`` as float on ``device``, or ``count`` ones."""
    return torch.ones(count, device=device) if weights is None else weights.float().to(device)


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
    - ``first_error_accuracy``: over rejected responses with a step the verifier
      marks bad (``g_t < 0``; with -1/0/+1 labels, a -1 step), the fraction whose
      lowest implicit step reward ``h_t`` (over its real steps; the first on ties)
      is at the first bad step; absent when there is no such response
    - ``first_error_distance``: over the same responses, the mean absolute
      distance in steps between the lowest-``h_t`` step and the first bad step

    and, with ``step_metrics`` (the step keys):

    - ``step_accuracy``: fraction of real steps with ``g_t != 0`` (both responses)
      where ``sign(h_t) == sign(g_t)``; absent when there is no such step
    - ``step_auroc``: AUROC of ``h_t`` for ``g_t > 0`` over the same steps;
      absent when one class is missing
    - ``chosen_step_accuracy_by_index``, ``rejected_step_accuracy_by_index``:
      vectors ``[max_step_index]`` of ``step_accuracy`` per step index (0-based),
      NaN where no step was seen
    - ``chosen_steps_by_index``, ``rejected_steps_by_index``: vectors
      ``[max_step_index]``, the (weighted) number of steps those accuracies count

    AUROC counts a step when its pair weight is > 0 (it takes no fractional weights).

    Args:
        max_step_index: Length of the per-index step accuracy vectors.
        step_metrics: Compute the step keys; False skips their work (the AUROC alone keeps
            every counted step's reward until ``compute``) and leaves them out of ``compute``.
    """

    def __init__(self, max_step_index: int = 16, step_metrics: bool = True) -> None:
        super().__init__()
        self.step_metrics = step_metrics
        self.pair_means = torch.nn.ModuleDict({name: WeightedMean() for name in PAIR_METRICS})
        if step_metrics:
            self.step_accuracy = WeightedMean()
            self.step_auroc = StepAUROC()
            self.chosen_step_accuracy_by_index = StepIndexAccuracy(max_step_index)
            self.rejected_step_accuracy_by_index = StepIndexAccuracy(max_step_index)
        self.first_error_accuracy = WeightedMean()
        self.first_error_distance = WeightedMean()

    @torch.no_grad()
    def update(
        self,
        rewards: torch.Tensor,
        step_rewards: torch.Tensor,
        step_scores: torch.Tensor,
        step_mask: torch.Tensor,
        verifier_rewards: torch.Tensor,
        logps: torch.Tensor,
        num_pairs: int,
        weight: torch.Tensor | None = None,
    ) -> None:
        """Add a batch of N pairs; every ``[2N, ...]`` tensor holds the N chosen rows, then the N rejected.

        Args:
            rewards: ``[2N]`` implicit reward ``beta_o * logratio`` of each response.
            step_rewards: ``[2N, S]`` implicit step rewards ``h_t``.
            step_scores: ``[2N, S]`` verifier step scores ``g_t``.
            step_mask: ``[2N, S]`` bool, real steps.
            verifier_rewards: ``[2N]`` verifier outcome rewards ``R``.
            logps: ``[2N]`` policy sequence log-probs.
            num_pairs: N.
            weight: ``[N]`` per-pair weight (0 for padding duplicates); default all 1.

        Raises:
            ValueError: When a tensor does not have ``2 * num_pairs`` rows.
        """
        for name, value in (("rewards", rewards), ("step_rewards", step_rewards), ("step_scores", step_scores),
                            ("step_mask", step_mask), ("verifier_rewards", verifier_rewards), ("logps", logps)):
            if value.shape[0] != 2 * num_pairs:
                raise ValueError(
                    f"PreferenceMetrics.update: {name} has {value.shape[0]} rows, "
                    f"expected 2 * num_pairs = {2 * num_pairs}"
                )
        chosen, rejected = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
        rewards = rewards.float()
        weight = torch.ones_like(rewards[chosen]) if weight is None else weight.float()  # [N]
        pair_values = {
            "reward_accuracy": (rewards[chosen] > rewards[rejected]).float(),
            "reward_margin": rewards[chosen] - rewards[rejected],
            "chosen_reward": rewards[chosen],
            "rejected_reward": rewards[rejected],
            "chosen_logps": logps[chosen].float(),
            "rejected_logps": logps[rejected].float(),
            "verifier_agreement": (verifier_rewards[chosen] > verifier_rewards[rejected]).float(),
        }
        for name, values in pair_values.items():
            self.pair_means[name].update(values, weight)
        step_rewards = step_rewards.float()
        if self.step_metrics:
            self._update_step_metrics(step_rewards, step_scores.float(), step_mask, weight, num_pairs)
        distance, has_bad_step = _first_error_distance(
            step_rewards[rejected], step_scores[rejected], step_mask[rejected]
        )
        self.first_error_accuracy.update((distance == 0).float(), weight * has_bad_step)
        self.first_error_distance.update(distance, weight * has_bad_step)

    def _update_step_metrics(
        self, step_rewards: torch.Tensor, step_scores: torch.Tensor, step_mask: torch.Tensor, weight: torch.Tensor,
        num_pairs: int,
    ) -> None:
        """Step accuracy (overall and by index) and AUROC over real steps with ``g_t != 0``.

        Args:
            step_rewards: ``[2N, S]`` float ``h_t``, chosen rows first.
            step_scores: ``[2N, S]`` float ``g_t``.
            step_mask: ``[2N, S]`` bool, real steps.
            weight: ``[N]`` float pair weights.
            num_pairs: N.
        """
        counted = step_mask.bool() & (step_scores != 0)
        step_weights = weight.repeat(2).unsqueeze(-1) * counted  # [2N, S]
        agreement = _sign_agreement(step_rewards, step_scores)  # [2N, S]
        self.step_accuracy.update(agreement, step_weights)
        auroc_target = torch.where(step_weights > 0, (step_scores > 0).long(), _NOT_COUNTED)
        # sigmoid keeps AUROC's ranking and puts every batch in [0, 1], so torchmetrics
        # never applies its own per-batch sigmoid to some batches and not to others.
        self.step_auroc.update(torch.sigmoid(step_rewards).flatten(), auroc_target.flatten())
        self.chosen_step_accuracy_by_index.update(agreement[:num_pairs], step_weights[:num_pairs])
        self.rejected_step_accuracy_by_index.update(agreement[num_pairs:], step_weights[num_pairs:])

    def compute(self) -> dict[str, torch.Tensor]:
        """Metric values (see the class docstring for the keys)."""
        values = {name: metric.compute() for name, metric in self.pair_means.items()}
        optional = ("step_accuracy", "step_auroc") if self.step_metrics else ()
        for name in (*optional, "first_error_accuracy", "first_error_distance"):
            value = getattr(self, name).compute()
            if not torch.isnan(value):
                values[name] = value
        if self.step_metrics:
            for side in ("chosen", "rejected"):
                accuracy, count = getattr(self, f"{side}_step_accuracy_by_index").compute()
                values[f"{side}_step_accuracy_by_index"], values[f"{side}_steps_by_index"] = accuracy, count
        return values

    def reset(self) -> None:
        """Clear every metric's state (call at the end of each epoch)."""
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()
