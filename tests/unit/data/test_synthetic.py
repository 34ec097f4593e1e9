"""The embedded synthetic arithmetic pairs and labelled solutions."""

import re
from collections import Counter

import pytest
import yaml

from stepwise_lit.data.chat import prompt_format_of
from stepwise_lit.data.formats import to_canonical
from stepwise_lit.data.labelled import labelled_responses
from stepwise_lit.data.synthetic import (
    NAMES,
    TEMPLATES,
    Operation,
    generate_labelled,
    generate_pairs,
    problem_statement,
)
from stepwise_lit.data.tokenize import first_divergence, prompt_token_ids
from stepwise_lit.data.tokenizer import build_byte_tokenizer
from stepwise_lit.grading.answers import extract_embedded
from tests.helpers.paths import REPO

EQUATION = re.compile(r"Step (\d+): (\d+) ([-+*]) (\d+) = (\d+)")
TINY_DATA = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["data"]


def equation_holds(step: str) -> bool:
    _, left, symbol, right, result = EQUATION.match(step).groups()
    left, right, result = int(left), int(right), int(result)
    return {"+": left + right, "-": left - right, "*": left * right}[symbol] == result


@pytest.fixture(scope="module")
def pairs():
    return generate_pairs(300, seed=0)


def test_pairs_are_valid_canonical_rows_and_seeded(pairs):
    assert to_canonical(pairs, "synthetic", "synthetic") == pairs
    assert generate_pairs(300, seed=0) == pairs
    assert generate_pairs(5, seed=1) != pairs[:5]
    assert len({pair["prompt"] for pair in pairs}) == 300


def test_step_counts_span_the_range_and_every_template_is_used(pairs):
    assert set(Counter(len(pair["chosen_steps"]) for pair in pairs)) == set(range(2, 9))
    openings = [template.opening.split("{start}")[0].replace("{name}", "") for template in TEMPLATES]
    assert len(TEMPLATES) >= 3
    for opening in openings:
        assert any(opening in pair["prompt"] for pair in pairs), opening
    short = generate_pairs(20, seed=0, min_steps=3, max_steps=3)
    assert {len(pair["chosen_steps"]) for pair in short} == {3}


def test_steps_are_numbered_lines_and_the_last_gives_the_answer(pairs):
    for pair in pairs:
        for side in ("chosen", "rejected"):
            steps = pair[f"{side}_steps"]
            assert [int(EQUATION.match(step).group(1)) for step in steps] == list(range(1, len(steps) + 1))
            assert all(step.endswith("\n") for step in steps)
            final_result = EQUATION.match(steps[-1]).group(5)
            assert steps[-1].endswith(f". The answer is {final_result}.\n")
        assert pair["reference_solution"] == "".join(pair["chosen_steps"])


def test_error_at_a_random_step_propagates_and_scores_follow_it(pairs):
    error_steps = Counter()
    for pair in pairs:
        chosen, rejected = pair["chosen_steps"], pair["rejected_steps"]
        scores = pair["rejected_step_scores"]
        error_step = scores.index(-1.0)
        error_steps[error_step] += 1
        assert scores == [1.0] * error_step + [-1.0] * (len(scores) - error_step)
        assert pair["chosen_step_scores"] == [1.0] * len(chosen)
        assert rejected[:error_step] == chosen[:error_step]
        # every chosen step is a true equation, every rejected step from the error on a false one
        assert all(map(equation_holds, chosen))
        assert [equation_holds(step) for step in rejected] == [score > 0 for score in scores]
        # the wrong value is carried: each rejected step starts from the previous rejected result
        for previous, step in zip(rejected, rejected[1:]):
            assert EQUATION.match(step).group(2) == EQUATION.match(previous).group(5)
        assert chosen[-1] != rejected[-1]  # the final answer is wrong
        assert (pair["chosen_score"], pair["rejected_score"]) == (1.0, -1.0)
    assert set(error_steps) == set(range(8))


def solve_from_prompt(prompt: str) -> tuple[int, list[tuple[str, int]], int]:
    """Independent reading of a prompt: its start value, its operations in order and the answer they give."""
    start = int(re.search(r" has (\d+) ", prompt).group(1))
    symbol, operand, times = re.search(r"Then ([-+*])(\d+), (\d+) times\.", prompt).groups()
    operations = [(symbol, int(operand))] * int(times)
    value = start
    for symbol, operand in operations:
        value = {"+": value + operand, "-": value - operand, "*": value * operand}[symbol]
    return start, operations, value


def test_the_prompt_states_the_whole_problem_and_the_chosen_solution_solves_it(pairs):
    """Read from the prompt alone, the start value is the left side of step 1, the operation is
    that of every step, there are as many steps as the prompt's count, and the answer the
    extractor reads is the value they give (the rejected answer is another)."""
    assert problem_statement(TEMPLATES[2], "Ana", "beads", 7, Operation("+", 3), 4) == (
        "Ana has 7 beads. Then +3, 4 times. How many beads?"
    )
    for pair in pairs + generate_pairs(100, seed=4242, max_value=TINY_DATA["synthetic_max_value"]):
        start, operations, answer = solve_from_prompt(pair["prompt"])
        steps = [EQUATION.match(step).groups() for step in pair["chosen_steps"]]
        assert [(symbol, int(operand)) for _, _, symbol, operand, _ in steps] == operations
        assert int(steps[0][1]) == start
        assert extract_embedded(pair["reference_solution"]) == extract_embedded(pair["chosen_steps"][-1]) == str(answer)
        assert extract_embedded(pair["rejected_steps"][-1]) != str(answer)


def test_the_slip_is_at_the_first_divergence_of_the_pair(pairs):
    """The first step whose text differs (what tokenization stores as ``first_divergence``) is the
    first step scored -1, and it is the first false equation of the rejected solution."""
    for pair in pairs:
        error_step = pair["rejected_step_scores"].index(-1.0)
        assert first_divergence(pair["chosen_steps"], pair["rejected_steps"]) == error_step
        assert not equation_holds(pair["rejected_steps"][error_step])


def test_every_prompt_fits_the_tiny_prompt_budget():
    """tiny.yaml keeps the whole prompt: the widest statement its numbers allow (every story kind,
    name and noun, the largest start, an operand as wide as max_value, eight times) fits
    max_prompt_length in byte tokens with BOS (and the template, if tiny.yaml sets one), and so
    do generated problems."""
    tokenizer = build_byte_tokenizer()
    budget, max_value = TINY_DATA["max_prompt_length"], TINY_DATA["synthetic_max_value"]
    widest = [
        problem_statement(kind, name, thing, max_value, Operation("+", max_value), 8)
        for kind in TEMPLATES for name in NAMES for thing in kind.things
    ]
    generated = [pair["prompt"] for seed in (0, 4242) for pair in generate_pairs(500, seed=seed, max_value=max_value)]
    lengths = [len(prompt_token_ids(prompt, tokenizer, prompt_format_of(TINY_DATA))) for prompt in widest + generated]
    assert max(lengths) <= budget
    assert max(lengths[: len(widest)]) >= max(lengths[len(widest) :])  # the widest bounds what is drawn


def test_too_few_distinct_problems_for_the_pairs_asked():
    """With numbers up to 10 there are about two thousand distinct prompts (start 1-10, one operation,
    2-8 times, the story kinds with their names and nouns), not 5000: a clear error, no endless search."""
    with pytest.raises(ValueError, match=r"found only \d+ distinct problems of 5000 with max_value=10 .*raise max_value"):
        generate_pairs(5000, seed=0, max_value=10)


def test_numbers_stay_small(pairs):
    numbers = [
        int(number)
        for pair in pairs
        for step in pair["rejected_steps"] + pair["chosen_steps"]
        for number in EQUATION.match(step).group(2, 4, 5)  # left, right, result
    ]
    assert 0 <= min(numbers) and max(numbers) <= 99


def test_bad_step_range():
    with pytest.raises(ValueError, match="min_steps <= max_steps"):
        generate_pairs(1, seed=0, min_steps=4, max_steps=3)


def test_max_value_bounds_every_number_and_keeps_the_error_visible():
    """With max_value=20 every number in every step (correct or slipped) is at most 20, and each
    rejected step scored −1 is a false equation while every +1 step is a true one."""
    for row in generate_pairs(200, seed=3, max_value=20):
        for steps, scores in ((row["chosen_steps"], row["chosen_step_scores"]), (row["rejected_steps"], row["rejected_step_scores"])):
            for step, score in zip(steps, scores):
                left, symbol, operand, result = re.search(r"(\d+) ([-+*]) (\d+) = (\d+)", step).groups()
                assert max(int(left), int(operand), int(result)) <= 20, step
                true_result = eval(f"{left} {symbol} {operand}")
                assert (int(result) == true_result) == (score == 1.0), step


# ---------------------------------------------------------------- labelled solutions


@pytest.fixture(scope="module")
def labelled():
    return generate_labelled(200, seed=5)


def test_labelled_solutions_are_valid_seeded_and_of_the_pairs_problems(labelled):
    assert labelled_responses(labelled, "labelled", "synthetic") == labelled
    assert generate_labelled(200, seed=5) == labelled
    assert generate_labelled(20, seed=6) != labelled[:20]
    assert [row["prompt"] for row in labelled] == [pair["prompt"] for pair in generate_pairs(200, seed=5)]


def test_the_error_share_is_error_fraction_and_the_first_error_is_the_first_false_equation(labelled):
    """100 of 200 solutions (round(200 * 0.5)) carry the slip; in those, every step before
    ``first_error`` holds and the step at it does not; the others hold throughout and end
    with the reference answer."""
    assert sum(row["first_error"] >= 0 for row in labelled) == 100
    for row in labelled:
        steps, first_error = row["steps"], row["first_error"]
        holds = [equation_holds(step) for step in steps]
        if first_error == -1:
            assert all(holds) and row["step_scores"] == [1.0] * len(steps)
            assert steps[-1].endswith(f"The answer is {row['reference_answer']}.\n")
        else:
            assert holds[:first_error] == [True] * first_error and not holds[first_error]
            assert row["step_scores"] == [1.0] * first_error + [-1.0] * (len(steps) - first_error)
    assert len({row["first_error"] for row in labelled if row["first_error"] >= 0}) > 3  # errors at varied steps


@pytest.mark.parametrize("fraction, wrong", [(0.0, 0), (0.25, 3), (1.0, 12)])
def test_error_fraction_sets_how_many_solutions_are_wrong(fraction, wrong):
    rows = generate_labelled(12, seed=0, error_fraction=fraction)
    assert sum(row["first_error"] >= 0 for row in rows) == wrong


def test_error_fraction_outside_zero_to_one():
    with pytest.raises(ValueError, match=r"error_fraction must be in \[0, 1\], got 1.5"):
        generate_labelled(4, seed=0, error_fraction=1.5)
