"""Pair building from scored solutions (stepwise_lit.online.pairs) on hand-made solutions.

The main prompt has four solutions (steps written A, B, C, ...; ``!`` marks a wrong step):

    sample 0: A  B  C!      scores [1, 1, -1]   answer wrong
    sample 1: A  B  C       scores [1, 1, 1]    answer right
    sample 2: A  X  Y       scores [1, 1, 1]    answer right
    sample 3: Z! W          scores [-1, 1]      answer wrong

(correct, incorrect) pairs and their shared step prefixes: (1, 0): 2, (1, 3): 0, (2, 0): 1, (2, 3): 0.
"""

from __future__ import annotations

import pytest

from stepwise_lit.data.formats import to_canonical
from stepwise_lit.errors import SettingError
from stepwise_lit.online.pairs import (
    PairSettings,
    ScoredPrompt,
    ScoredSolution,
    build_pairs,
    common_prefix_steps,
    is_correct,
)


def solution(steps: list[str], scores: list[float], correct: bool | None) -> ScoredSolution:
    answer = None if correct is None else "1" if correct else "2"
    return ScoredSolution("".join(steps), steps, scores, answer, correct)


def main_prompt(prompt_id: str = "p0") -> ScoredPrompt:
    return ScoredPrompt(prompt_id, "Q?", "the reference", [
        solution(["A\n", "B\n", "C!\n"], [1.0, 1.0, -1.0], False),
        solution(["A\n", "B\n", "C\n"], [1.0, 1.0, 1.0], True),
        solution(["A\n", "X\n", "Y\n"], [1.0, 1.0, 1.0], True),
        solution(["Z!\n", "W\n"], [-1.0, 1.0], False),
    ])


def picked(rows: list[dict]) -> list[str]:
    return [row["id"] for row in rows]


def test_first_error_branch_pairs_the_longest_shared_prefix():
    """(1, 0) shares 2 steps, more than any other (correct, incorrect) pair: chosen A B C, rejected A B C!,
    first divergence at step index 2."""
    pairs = build_pairs([main_prompt()], PairSettings(strategy="first_error_branch"))
    assert picked(pairs.rows) == ["p0/1-0"]
    row = pairs.rows[0]
    assert row["chosen_steps"] == ["A\n", "B\n", "C\n"] and row["rejected_steps"] == ["A\n", "B\n", "C!\n"]
    assert row["chosen_step_scores"] == [1.0, 1.0, 1.0] and row["rejected_step_scores"] == [1.0, 1.0, -1.0]
    assert row["prompt"] == "Q?" and row["reference_solution"] == "the reference"
    assert common_prefix_steps(row["chosen_steps"], row["rejected_steps"]) == 2
    assert pairs.skipped == {}


def test_first_error_branch_ties_go_to_the_lowest_indices():
    """Two incorrect solutions share one step with the correct one (samples 1 and 2): the lower, 1, is taken."""
    prompt = ScoredPrompt("t", "Q?", None, [
        solution(["A\n", "B\n"], [1.0, 1.0], True),
        solution(["A\n", "C\n"], [1.0, -1.0], False),
        solution(["A\n", "D\n"], [1.0, -1.0], False),
    ])
    assert picked(build_pairs([prompt], PairSettings()).rows) == ["t/0-1"]


def test_common_prefix_steps_when_one_solution_extends_the_other():
    assert common_prefix_steps(["A", "B"], ["A", "B", "C"]) == 2
    assert common_prefix_steps(["A", "B"], ["A", "B"]) == 2
    assert common_prefix_steps(["X"], ["A", "B"]) == 0


def test_best_vs_worst_uses_the_named_aggregation():
    """min: samples 1, 2 tie at 1 (best: the lower, 1); samples 0, 3 tie at -1 (worst: the lower, 0).
    sum: 3, 3 for samples 1, 2 (best 1); sample 0: 1, sample 3: 0 (worst 3)."""
    by_min = build_pairs([main_prompt()], PairSettings(strategy="best_vs_worst", aggregation="min"))
    by_sum = build_pairs([main_prompt()], PairSettings(strategy="best_vs_worst", aggregation="sum"))
    assert picked(by_min.rows) == ["p0/1-0"]
    assert picked(by_sum.rows) == ["p0/1-3"]


def test_all_pairs_lists_every_correct_incorrect_pair_in_order():
    pairs = build_pairs([main_prompt()], PairSettings(strategy="all_pairs", max_pairs_per_prompt=10))
    assert picked(pairs.rows) == ["p0/1-0", "p0/1-3", "p0/2-0", "p0/2-3"]


def test_all_pairs_cap_draws_a_seeded_subset_in_order():
    """Cap 2 of 4: the same seed gives the same 2 pairs, in (correct, incorrect) order, out of the 4."""
    every = {"p0/1-0", "p0/1-3", "p0/2-0", "p0/2-3"}
    settings = PairSettings(strategy="all_pairs", max_pairs_per_prompt=2, seed=3)
    first = picked(build_pairs([main_prompt()], settings).rows)
    assert first == picked(build_pairs([main_prompt()], settings).rows)
    assert len(first) == 2 and set(first) <= every and first == sorted(first)
    draws = {tuple(picked(build_pairs([main_prompt()], PairSettings("all_pairs", max_pairs_per_prompt=2,
                                                                    seed=seed)).rows)) for seed in range(20)}
    assert len(draws) > 1  # the seed matters


def test_skipped_prompts_are_counted_by_reason():
    """One prompt per reason, plus the main prompt, which gives its pair."""
    right = solution(["A\n"], [1.0], True)
    wrong = solution(["B\n"], [-1.0], False)
    unknown = solution(["C\n"], [1.0], None)
    blank = ScoredSolution("", [], [], None, False)
    prompts = [
        main_prompt(),
        ScoredPrompt("all-right", "Q?", None, [right, right]),
        ScoredPrompt("all-wrong", "Q?", None, [wrong, wrong]),
        ScoredPrompt("no-reference", "Q?", None, [unknown, unknown]),
        ScoredPrompt("one-usable", "Q?", None, [right, blank]),
    ]
    pairs = build_pairs(prompts, PairSettings(strategy="first_error_branch"))
    assert picked(pairs.rows) == ["p0/1-0"]
    assert pairs.skipped == {"fewer_than_two_usable": 1, "correctness_unknown": 1, "no_correct": 1, "no_incorrect": 1}
    same_scores = build_pairs([ScoredPrompt("same", "Q?", None, [right, unknown])], PairSettings("best_vs_worst"))
    assert same_scores.rows == [] and same_scores.skipped == {"equal_scores": 1}


def test_correctness_by_steps_flags_a_right_answer_with_a_wrong_step():
    """A right answer after a step scored -1: correct by answer, incorrect by steps and by both."""
    lucky = solution(["A!\n", "B\n"], [-1.0, 1.0], True)
    assert is_correct(lucky, "answer") is True
    assert is_correct(lucky, "steps") is False
    assert is_correct(lucky, "answer_and_steps") is False
    unflagged_unknown = solution(["A\n"], [1.0], None)
    assert is_correct(unflagged_unknown, "answer_and_steps") is None
    assert is_correct(unflagged_unknown, "steps") is True


def test_pairs_are_canonical_rows():
    """The rows pass the loader's validation unchanged (the stepwise format)."""
    rows = build_pairs([main_prompt(), main_prompt("p1")], PairSettings("all_pairs")).rows
    assert list(to_canonical(rows, "stepwise", "pairs")) == rows


@pytest.mark.parametrize(("name", "value"), [("strategy", "best"), ("aggregation", "median"),
                                             ("correctness", "vibes"), ("max_pairs_per_prompt", 0)])
def test_bad_pair_settings_name_the_setting(name, value):
    with pytest.raises(SettingError, match=rf"^online\.pairs\.{name}: "):
        PairSettings(**{name: value})


def test_reference_fallback_pairs_the_reference_with_the_closest_wrong_sample():
    """No sample is right by answer_and_steps (sample 0's answer is right but its step B! is flagged):
    the reference "A\\nB\\nC\\n" (steps scored 1) becomes sample 2 and pairs with the wrong sample that
    shares most steps with it: sample 0 (A), not sample 1 (none). A prompt with a right sample keeps
    its own pair; one without a reference is skipped as before."""
    weak = ScoredPrompt("w", "Q?", "A\nB\nC\n", [
        solution(["A\n", "B!\n", "C\n"], [1.0, -1.0, 1.0], True),
        solution(["Z!\n", "C\n"], [-1.0, 1.0], False),
    ])
    no_reference = ScoredPrompt("n", "Q?", None, list(weak.solutions))
    settings = PairSettings(correctness="answer_and_steps", reference_fallback=True)
    pairs = build_pairs([weak, main_prompt(), no_reference], settings)
    assert picked(pairs.rows) == ["w/2-0", "p0/1-0"]
    row = pairs.rows[0]
    assert row["chosen_steps"] == ["A\n", "B\n", "C\n"] and row["chosen_step_scores"] == [1.0, 1.0, 1.0]
    assert row["rejected_steps"] == ["A\n", "B!\n", "C\n"]
    assert pairs.reference_pairs == 1 and pairs.skipped == {"no_correct": 1}
    without = build_pairs([weak, main_prompt(), no_reference], PairSettings(correctness="answer_and_steps"))
    assert picked(without.rows) == ["p0/1-0"] and without.reference_pairs == 0 and without.skipped == {"no_correct": 2}


def test_reference_fallback_needs_a_strategy_that_uses_correctness():
    with pytest.raises(SettingError, match="online.pairs.reference_fallback: needs strategy"):
        PairSettings(strategy="best_vs_worst", reference_fallback=True)
