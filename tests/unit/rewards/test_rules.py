"""ArithmeticStepVerifier: the rules one by one, and its measured quality on real GSM8K model solutions."""

import json
import re

import pytest

from stepwise_lit.data.synthetic import generate_pairs
from stepwise_lit.grading.answers import extract_answer
from stepwise_lit.rewards.rules import (
    ArithmeticStepVerifier,
    check_step,
    evaluate,
    final_answer,
    matches,
)
from tests.helpers.paths import SHARED_DATA

SOLUTIONS = SHARED_DATA / "gsm8k" / "example_model_solutions.jsonl"
MODEL_KEYS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
REFERENCE = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day.\nA: 18"
PROBLEM = "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. She sells the rest for $2 each. How much does she make?"


@pytest.fixture(scope="module")
def verifier():
    return ArithmeticStepVerifier()


@pytest.mark.parametrize(
    ("step", "ok"),
    [
        ("She has 16 - 3 = <<16-3=13>>13 eggs left\n", True),
        ("She has 16 - 3 = <<16-3=12>>12 eggs left\n", False),  # wrong annotation
        ("So she makes 13 * 2 = $26 a day\n", True),
        ("So she makes 13 * 2 = $27 a day\n", False),  # wrong plain equation
        ("It takes 2 x 0.5 = 1.0 bolts\n", True),  # "x" as times
        ("The house cost 80,000+50,000=$130,000\n", True),  # thousands commas
        ("Total 2 + 3 = 5 = 6 - 2\n", False),  # a chain whose last link is wrong
        ("Each piece is 10/3 = <<10/3=3.33>>3.33 feet\n", True),  # rounding passes
        ("20% of 50 = 10 dollars\n", True),  # words between: not an equation, not flagged
        ("She buys 3 hours * 2 = 7 items\n", True),  # units inside: skipped
        ("The tickets - 3 = 5 left\n", True),  # the tail of a phrase is not an expression
        ("A: 18", True),
    ],
)
def test_arithmetic_rules(verifier, step, ok):
    assert verifier.score_steps(["q"], [[step]]) == [[1.0 if ok else -1.0]]


def test_step_result_and_answer_are_found():
    check = check_step("So 4 + 5 = <<4+5=9>>9 and then 9 * 2 = <<9*2=18>>18\n")
    assert (check.arithmetic_ok, check.result, check.answer) == (True, 18.0, None)
    assert check_step("\nA: 1,250").answer == 1250.0


def test_evaluate_is_arithmetic_only():
    assert evaluate("(16 - 3) * 2 / 4") == 6.5
    assert evaluate("2 ** 10") == 1024.0
    assert evaluate("__import__('os')") is None
    assert evaluate("1 / 0") is None
    assert evaluate("2 ** 1000") is None
    assert matches(3.333, 3.33, "3.33") and not matches(3.5, 3.3, "3.3")


def test_reference_flags_a_wrong_answer_and_where_the_response_leaves_the_reference(verifier):
    wrong = ["She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs\n", "She makes 9 * 3 = <<9*3=27>>27\n", "A: 27"]
    assert verifier.score_steps([PROBLEM], [wrong], [REFERENCE]) == [[1.0, -1.0, -1.0]]
    # Without the reference, only arithmetic counts: every calculation here is right.
    assert verifier.score_steps([PROBLEM], [wrong]) == [[1.0, 1.0, 1.0]]


def test_reference_limit_a_wrong_answer_also_flags_correct_values_off_the_reference_path(verifier):
    # 3 + 4 = 7 is right but the reference never computes 7; the answer is wrong, so rule 4 flags it.
    wrong = ["She eats 3 + 4 = <<3+4=7>>7 eggs\n", "She uses 16 * 7 = <<16*7=112>>112 eggs\n", "A: 112"]
    assert verifier.score_steps([PROBLEM], [wrong], [REFERENCE]) == [[-1.0, -1.0, -1.0]]


def test_reference_accepts_a_correct_alternative_path(verifier):
    other_path = ["She uses 3 + 4 = <<3+4=7>>7 eggs\n", "She sells 16 - 7 = <<16-7=9>>9\n", "She makes 9 * 2 = $<<9*2=18>>18\n", "A: 18"]
    assert verifier.score_steps([PROBLEM], [other_path], [REFERENCE]) == [[1.0, 1.0, 1.0, 1.0]]


def split_lines(text):
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


@pytest.mark.skipif(not SOLUTIONS.exists(), reason="shared GSM8K data not present")
@pytest.mark.parametrize(("use_reference", "incorrect_floor"), [(True, 0.99), (False, 0.035)])
def test_measured_on_gsm8k_model_solutions(verifier, use_reference, incorrect_floor):
    """Measured (1,319 questions x 4 model solutions): with the ground truth as reference,
    3267/3275 = 99.8% of incorrect solutions get a -1 somewhere (the misses are cut off
    before their answer); without it, 152/3275 = 4.6% (most errors are not arithmetic).
    Either way 1993/2001 = 99.6% of correct solutions get no -1 (the 8 others contain a
    real arithmetic slip, e.g. 0.5 - 0.4 = 0.5). Floors: measured minus a margin."""
    flagged_incorrect = clean_correct = incorrect = correct = 0
    with SOLUTIONS.open() as lines:
        for line in lines:
            record = json.loads(line)
            for key in MODEL_KEYS:
                solution = record[key]
                reference = [record["ground_truth"]] if use_reference else None
                scores = verifier.score_steps([record["question"]], [split_lines(solution["solution"])], reference)[0]
                flagged = min(scores) < 0
                if solution["is_correct"]:
                    correct += 1
                    clean_correct += not flagged
                else:
                    incorrect += 1
                    flagged_incorrect += flagged
    assert flagged_incorrect / incorrect >= incorrect_floor
    assert clean_correct / correct >= 0.99


EMBEDDED_PAIRS = generate_pairs(200, seed=11, max_value=20)
GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"


def test_the_rule_verifier_reads_the_embedded_answer_where_answers_does():
    """The embedded task states its answer mid-line ("Step 4: 76 - 9 = 67. The answer is 67.");
    the rule verifier's final answer agrees with `extract_answer(..., "embedded")` on every
    generated solution, right and slipped (before: None for all, the phrase was read at a line start only)."""
    for row in EMBEDDED_PAIRS:
        for side in ("chosen", "rejected"):
            text = "".join(row[f"{side}_steps"])
            assert final_answer(text) == float(extract_answer(text, "embedded"))
            assert check_step(row[f"{side}_steps"][-1]).answer == float(extract_answer(text, "embedded"))


def test_an_embedded_solution_that_stops_early_is_flagged_where_it_states_its_answer(verifier):
    """Real embedded strings: a correct solution cut after its second step, which then states its
    running value as the answer. Every equation is right, so only rule 3 (a stated answer that
    is not the reference's, read from the reference's "The answer is N.") can flag it: [+1, -1].
    Before the fix the reference had no answer for the rules and the steps scored [+1, +1]."""
    row = next(row for row in EMBEDDED_PAIRS if len(row["chosen_steps"]) >= 3)
    first, second = row["chosen_steps"][:2]
    value = second.split("=")[-1].strip()
    stopped = [first, f"{second.rstrip()}. The answer is {value}.\n"]
    assert value != extract_answer(row["reference_solution"], "embedded")
    assert verifier.score_steps([row["prompt"]], [stopped], [row["reference_solution"]]) == [[1.0, -1.0]]
    assert verifier.score_steps([row["prompt"]], [row["chosen_steps"]], [row["reference_solution"]]) == [
        [1.0] * len(row["chosen_steps"])
    ]


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason="shared GSM8K data not present")
def test_gsm8k_answers_are_read_as_before_and_agree_with_answers():
    """GSM8K's "#### n" (line start) reads as `extract_answer(..., "gsm8k")` does on the first 200
    test solutions; "A:" is still read at a line start only, and a sentence that says the answer mid-line is read."""
    with GSM8K_TEST.open() as lines:
        solutions = [json.loads(line)["answer"] for line, _ in zip(lines, range(200))]
    for solution in solutions:
        assert final_answer(solution) == float(extract_answer(solution, "gsm8k"))
    assert check_step("Plan A: 5 apples\n").answer is None
    assert check_step("She makes 9 * 2 = $18 a day, so the answer is $18.\n").answer == 18.0
