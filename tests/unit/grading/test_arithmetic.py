"""The one safe arithmetic evaluator and number pattern, shared by the GSM8K corruption and the rule verifier."""

import json
import random

import pytest

from stepwise_lit.data.gsm8k import CALCULATOR_ANNOTATION, corrupt_solution
from stepwise_lit.grading.arithmetic import MAX_EXPONENT, NUMBER, evaluate_arithmetic
from stepwise_lit.rewards.rules import ArithmeticStepVerifier
from tests.helpers.paths import SHARED_DATA

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("(16 - 3) * 2", 26.0),  # 13 * 2
        (" 7 / 2 ", 3.5),
        ("10 // 3", 3.0),  # floor of 3.33
        ("10 % 3", 1.0),  # 10 - 3 * 3
        ("2 ** 10", 1024.0),
        ("-2 ** 2", -4.0),  # Python precedence: -(2 ** 2)
        ("2 ** -1", 0.5),
        ("1.5 * 1.5", 2.25),
        ("+4 - -1", 5.0),
        (f"2 ** {MAX_EXPONENT}", 2.0**MAX_EXPONENT),  # the largest exponent allowed
    ],
)
def test_arithmetic_by_hand(expression, value):
    assert evaluate_arithmetic(expression) == value


@pytest.mark.parametrize(
    "expression",
    [
        f"2 ** {MAX_EXPONENT + 1}",  # exponent bound
        "9 ** 9 ** 9",  # 9 ** 387420489: never computed
        "10 ** 60 * 10 ** 60 * 10 ** 60 * 10 ** 60 * 10 ** 60 * 10 ** 60",  # 1e360 overflows a float
        "1 / 0",
        "5 % 0",
        "(-8) ** 0.5",  # complex
        "__import__('os')",
        "x + 1",
        "'a' * 3",
        "[1, 2]",
        "True + 1",
        "1 +",
        "(" * 5000 + "1" + ")" * 5000,  # too long to parse safely
    ],
)
def test_anything_else_is_none(expression):
    assert evaluate_arithmetic(expression) is None


def test_number_pattern():
    text = "He paid $1,040.50 for 3 items, -2 degrees, 12.5. Then 2023,15 and 1,2345."
    assert NUMBER.findall(text) == ["1,040.50", "3", "-2", "12.5"]


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason="shared GSM8K data not present")
def test_every_calculator_annotation_of_gsm8k_test_evaluates_to_its_result():
    """Real lines: each ``<<expr=result>>`` with a numeric result in GSM8K test.jsonl (4,266 of them)
    evaluates to the result within one unit of its last decimal."""
    checked = 0
    for line in GSM8K_TEST.read_text().splitlines():
        for match in CALCULATOR_ANNOTATION.finditer(json.loads(line)["answer"]):
            expression, result = match.group(1), match.group(2)
            if not NUMBER.fullmatch(result):
                continue
            value = evaluate_arithmetic(expression)
            decimals = len(result.partition(".")[2])
            assert value is not None and abs(value - float(result.replace(",", ""))) < 10.0**-decimals + 1e-9, match.group()
            checked += 1
    assert checked > 4000


def test_gsm8k_corruption_recomputes_a_power():
    """The corruption changes step 1's result 5 and carries it into step 2's ``<<5**2=25>>``:
    the new value v gives ``<<v**2=v*v>>`` (the old evaluator had no ``**`` and left 25)."""
    steps = ["She has 2 + 3 = <<2+3=5>>5 boxes\n", "Squared: <<5**2=25>>25\n", "#### 25"]
    seed = next(seed for seed in range(100) if corrupt_solution(steps, random.Random(seed))[1] == 0)
    corrupted, error_step = corrupt_solution(steps, random.Random(seed))
    new_value = int(CALCULATOR_ANNOTATION.search(corrupted[0]).group(2))
    assert error_step == 0 and new_value != 5
    assert corrupted[1] == f"Squared: <<{new_value}**2={new_value**2}>>{new_value**2}\n"
    assert corrupted[2] == f"#### {new_value**2}"


@pytest.mark.parametrize(
    ("annotation", "score"), [("<<7//2=3>>3", 1.0), ("<<7//2=4>>4", -1.0), ("<<7%2=1>>1", 1.0), ("<<7%2=0>>0", -1.0)]
)
def test_rule_verifier_checks_floor_division_and_remainder(annotation, score):
    """The verifier uses the shared evaluator, so ``//`` and ``%`` annotations are checked (7 // 2 = 3, 7 % 2 = 1)."""
    assert ArithmeticStepVerifier().score_steps(["q"], [[f"Each gets {annotation} apples\n"]]) == [[score]]
