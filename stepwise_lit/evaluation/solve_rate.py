"""Solve rates of generated solutions, graded by :func:`stepwise_lit.grading.answers.answers_match`.

- :class:`SolveRate`: share of prompts whose one (greedy) answer is right (pass@1);
- :class:`PassAtK`: the unbiased pass@k of Chen et al. (2021) from n >= k samples;
- :class:`MajorityAtK`: share of prompts whose most frequent sampled answer is right.

Every metric takes a per-prompt ``weights`` (0 for the duplicates a distributed sampler pads
with) and keeps sums as states (``dist_reduce_fx="sum"``), so the value over ranks equals the
value over all inputs on one rank.
"""

from __future__ import annotations

from collections import Counter

import torch

from stepwise_lit.evaluation.preference import WeightedMean, ones_if_none
from stepwise_lit.grading.answers import AnswerSourceName, answer_key, answers_match


class AnswerMean(WeightedMean):
    """Weighted mean over prompts of a grade of each prompt's answers (the base of the solve rates).

    Args:
        source: How answers are compared (``embedded``, ``gsm8k``, ``math``).
    """

    def __init__(self, source: AnswerSourceName, **kwargs) -> None:
        super().__init__(**kwargs)
        self.source = source

    def add_grades(self, grades: list[float] | torch.Tensor, weights: torch.Tensor | None) -> None:
        """Add one grade ``[N]`` per prompt with the prompts' weights ``[N]`` (None: all 1)."""
        device = self.weighted_sum.device
        grades = torch.as_tensor(grades, dtype=torch.float, device=device)
        super().update(grades, ones_if_none(weights, grades.shape[0], device))


class SolveRate(AnswerMean):
    """Weighted share of prompts whose answer matches the reference (pass@1 when greedy)."""

    def update(self, answers: list[str | None], references: list[str], weights: torch.Tensor | None = None) -> None:
        """Add N prompts.

        Args:
            answers: N extracted answers (None: the solution states none, graded wrong).
            references: N reference answers.
            weights: ``[N]`` prompt weights; None: all 1.
        """
        self.add_grades([answers_match(answer, ref, self.source) for answer, ref in zip(answers, references)], weights)


def pass_at_k(num_samples: torch.Tensor, num_correct: torch.Tensor, k: int) -> torch.Tensor:
    """Unbiased pass@k per prompt (Chen et al. 2021): ``1 - C(n - c, k) / C(n, k)``.

    The probability that k of the n samples, drawn without replacement, include a
    correct one. Computed in float64 log-gamma: ``C(n-c, k) / C(n, k) =
    (n-c)! (n-k)! / ((n-c-k)! n!)``, and 1 where ``n - c < k``.

    Args:
        num_samples: ``[N]`` samples n per prompt, each >= k.
        num_correct: ``[N]`` correct samples c per prompt.
        k: The k of pass@k, >= 1.

    Returns:
        ``[N]`` float64 pass@k per prompt.
    """
    n, c = num_samples.double(), num_correct.double()
    log_numerator = torch.lgamma(n - c + 1) + torch.lgamma(n - k + 1)
    log_ratio = log_numerator - torch.lgamma((n - c - k).clamp(min=0) + 1) - torch.lgamma(n + 1)
    return torch.where(n - c < k, torch.ones_like(n), 1 - log_ratio.exp())


class PassAtK(AnswerMean):
    """Weighted mean over prompts of the unbiased pass@k (:func:`pass_at_k`).

    Args:
        k: The k; every prompt needs at least k samples.
        source: How answers are compared.
    """

    def __init__(self, k: int, source: AnswerSourceName, **kwargs) -> None:
        super().__init__(source, **kwargs)
        if k < 1:
            raise ValueError(f"pass@k needs k >= 1, got {k}")
        self.k = k

    def update(
        self, sample_answers: list[list[str | None]], references: list[str], weights: torch.Tensor | None = None
    ) -> None:
        """Add N prompts.

        Args:
            sample_answers: Per prompt, the extracted answers of its n >= k samples.
            references: N reference answers.
            weights: ``[N]`` prompt weights; None: all 1.

        Raises:
            ValueError: If a prompt has fewer than k samples.
        """
        too_few = [index for index, answers in enumerate(sample_answers) if len(answers) < self.k]
        if too_few:
            raise ValueError(f"pass@{self.k} needs at least {self.k} samples per prompt; prompts {too_few} have fewer")
        correct = [
            sum(answers_match(answer, reference, self.source) for answer in answers)
            for answers, reference in zip(sample_answers, references)
        ]
        num_samples = torch.tensor([len(answers) for answers in sample_answers])
        self.add_grades(pass_at_k(num_samples, torch.tensor(correct), self.k), weights)


def majority_answer(answers: list[str | None], source: AnswerSourceName) -> str | None:
    """The most frequent answer; None answers do not vote.

    Answers are equal when their comparison keys are (:func:`stepwise_lit.grading.answers.answer_key`:
    the number, else the normalised string), so ``"18"`` and ``"18.0"`` vote together.
    Ties go to the answer whose first occurrence comes first.

    Args:
        answers: The extracted answers of one prompt's samples.
        source: How answers are compared.

    Returns:
        The first-written form of the winning answer, or None when no sample has one.
    """
    voted = [answer for answer in answers if answer is not None]
    if not voted:
        return None
    keys = [answer_key(answer, source) for answer in voted]
    votes = Counter(keys)  # insertion order is first occurrence; max keeps the first of equal counts
    winner = max(votes, key=votes.__getitem__)
    return voted[keys.index(winner)]


class MajorityAtK(AnswerMean):
    """Weighted share of prompts whose majority answer (:func:`majority_answer`) over its
    samples matches the reference; k is the number of samples given."""

    def update(
        self, sample_answers: list[list[str | None]], references: list[str], weights: torch.Tensor | None = None
    ) -> None:
        """Add N prompts.

        Args:
            sample_answers: Per prompt, the extracted answers of its k samples.
            references: N reference answers.
            weights: ``[N]`` prompt weights; None: all 1.
        """
        correct = [
            answers_match(majority_answer(answers, self.source), reference, self.source)
            for answers, reference in zip(sample_answers, references)
        ]
        self.add_grades(correct, weights)
