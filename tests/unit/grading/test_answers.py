"""Final-answer extraction and comparison, on real GSM8K and MATH-500 strings and on hand cases."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest

from stepwise_lit.data.synthetic import generate_pairs
from stepwise_lit.evaluation.generation import SolveRateEvaluation
from stepwise_lit.evaluation.solve_rate import SolveRate
from stepwise_lit.grading.answers import (
    MATH_VERIFY_INSTALL,
    announce_grader,
    answers_match,
    extract_answer,
    extract_embedded,
    extract_gsm8k,
    extract_math,
    math_verifier,
    normalize_math,
    normalized_match,
    symbolic_match,
)
from tests.helpers.paths import SHARED_DATA

DATA = SHARED_DATA
MODEL_SOLUTIONS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
needs_data = pytest.mark.skipif(not (DATA / "gsm8k").is_dir(), reason="../shared/data is not here")
needs_math_verify = pytest.mark.skipif(importlib.util.find_spec("math_verify") is None,
                                       reason=f"math-verify is not installed ({MATH_VERIFY_INSTALL})")
SYMBOLIC_ONLY = [("2x+x^2", "x^2+2x"), (r"\sqrt5", r"\sqrt{5}"), ("x = 5", "5"),
                 (r"\left( 3/2, -13 \right)", r"\left( \frac{3}{2}, -13 \right)")]
"""Equivalent answers (predicted, reference) that math-verify matches and the normaliser does not."""


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def test_embedded_answer_is_the_stated_one():
    rows = generate_pairs(20, seed=3)
    for row in rows:
        last_result = row["chosen_steps"][-1].split("= ")[-1].split(".")[0]
        assert extract_embedded(row["reference_solution"]) == last_result
        assert not answers_match(extract_embedded("".join(row["rejected_steps"])), last_result, "embedded")
    assert extract_embedded("Step 1: 4 + 3 = 7\nStep 2: 7 * 2 = 14\n") is None, "cut before the answer"
    assert extract_embedded("The answer is 3. No, the answer is -12.") == "-12"


@needs_data
@pytest.mark.parametrize(
    ("line", "answer"),
    [(1, "18"), (147, "2125"), (490, "-10"), (612, "1450000"), (1114, "-3")],
)
def test_gsm8k_reference_answers(line, answer):
    """Rows of gsm8k/test.jsonl (line as an editor counts) ending ``#### 2,125``, ``#### -10``, ..."""
    row = read_jsonl(DATA / "gsm8k" / "test.jsonl")[line - 1]
    assert extract_gsm8k(row["answer"]) == answer


@needs_data
def test_gsm8k_every_reference_answer_is_its_marked_number():
    for row in read_jsonl(DATA / "gsm8k" / "test.jsonl"):
        marked = row["answer"].rsplit("####", 1)[1]
        assert extract_gsm8k(row["answer"]) == marked.strip().replace(",", "")


@needs_data
def test_gsm8k_model_solutions_are_graded_as_the_data_set_grades_them():
    """Every model solution (``... A: 18``, or cut off mid-step) gets the data set's
    ``is_correct`` from comparing its answer with the ground truth's (5276 solutions)."""
    rows = read_jsonl(DATA / "gsm8k" / "example_model_solutions.jsonl")
    first = rows[0]
    assert extract_gsm8k(first["ground_truth"]) == "18"
    assert extract_gsm8k(first["175b_finetuning"]["solution"]) == "4"
    disagreements = [
        (index + 1, name)
        for index, row in enumerate(rows)
        for name in MODEL_SOLUTIONS
        if answers_match(extract_gsm8k(row[name]["solution"]), extract_gsm8k(row["ground_truth"]), "gsm8k")
        != row[name]["is_correct"]
    ]
    assert disagreements == []


def test_gsm8k_hand_cases():
    assert extract_gsm8k("She pays $1,250.\nA: $1,250.") == "1250"
    assert extract_gsm8k("2 + 2 = <<2+2=4>>4 apples\n#### 4") == "4"
    assert extract_gsm8k("It costs 3.50 dollars, so 7 in all.") == "7"
    assert extract_gsm8k("#### none\nso 12") == "12", "a #### without a number falls back to the last number"
    assert extract_gsm8k("no numbers here") is None
    assert answers_match("18.00", "18", "gsm8k")
    assert not answers_match("18.01", "18", "gsm8k")
    assert not answers_match(None, "18", "gsm8k")


@needs_data
@pytest.mark.parametrize(
    ("line", "unique_id", "boxed", "normalized"),
    [
        (1, "test/precalculus/807.json", r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        (74, "test/algebra/2253.json", r"\frac{3\sqrt{3}}{4}", r"\frac{3\sqrt{3}}{4}"),
        (199, "test/counting_and_probability/508.json", r"10,\!080", "10080"),
        (228, "test/precalculus/819.json", r"\text{(C)}", "(C)"),
        (243, "test/algebra/2626.json", r"\$32,\!348", "32348"),
        (258, "test/geometry/473.json", r"864 \mbox{ inches}^2", "864"),
        (423, "test/intermediate_algebra/2015.json", r"\{1\pm\sqrt{5},-2\}", r"\{1\pm\sqrt{5},-2\}"),
    ],
)
def test_math_boxed_answers_with_nested_braces(line, unique_id, boxed, normalized):
    """MATH-500 rows (prm800k/math_test.sample.jsonl, line as an editor counts)."""
    row = read_jsonl(DATA / "prm800k" / "math_test.sample.jsonl")[line - 1]
    assert row["unique_id"] == unique_id
    assert extract_math(row["solution"]) == boxed
    assert normalize_math(boxed) == normalized == normalize_math(row["answer"])


@needs_data
def test_math_every_boxed_answer_matches_the_answer_field():
    """All 500 MATH-500 solutions: the last box (8 solutions have several) matches ``answer``."""
    rows = read_jsonl(DATA / "prm800k" / "math_test.sample.jsonl")
    mismatches = [
        row["unique_id"] for row in rows if not answers_match(extract_math(row["solution"]), row["answer"], "math")
    ]
    assert mismatches == []


def test_math_hand_cases():
    assert extract_math(r"First $\boxed{1}$, then $\boxed{\frac{a}{\sqrt{b}}}$.") == r"\frac{a}{\sqrt{b}}"
    assert extract_math(r"\fbox{7}") == "7"
    assert extract_math(r"The answer is $\boxed{\frac{1}{2}$") is None, "the box never closes"
    assert extract_math("The answer is 5.") is None
    assert normalize_math(r"\dfrac{17}{50}.") == r"\frac{17}{50}"
    assert normalize_math(r"90^\circ") == normalize_math(r"90^{\circ}") == "90"
    assert normalize_math(r"\text{Evelyn}") == "Evelyn"
    assert normalize_math("(1,234)") == "(1,234)", "commas that are not thousands separators stay"
    assert answers_match("0.5", r"\frac{1}{2}", "math")
    assert answers_match(r"\frac{270}{7}", r"\frac{270}7\text{ degrees}", "math")
    assert answers_match("-3/4", r"-\frac34", "math")
    assert not answers_match(r"\frac{\sqrt{3}}{3}", r"\frac{\sqrt{3}}{2}", "math")
    assert not answers_match("(C)", "(E)", "math")


def test_unknown_source_is_named():
    with pytest.raises(ValueError, match="unknown answer source 'aime'; choose from"):
        extract_answer("1", "aime")


@needs_data
@needs_math_verify
def test_math500_answers_match_themselves_and_their_forms_by_both_graders():
    """Each MATH-500 ``answer`` against itself, its solution's last box and its ``\\dfrac`` form:
    the normaliser and math-verify both say equal (500 rows)."""
    verifier = math_verifier()
    for row in read_jsonl(DATA / "prm800k" / "math_test.sample.jsonl"):
        reference = row["answer"]
        for form in {reference, extract_math(row["solution"]), reference.replace("\\frac", "\\dfrac")}:
            assert normalized_match(form, reference, "math"), (row["unique_id"], form)
            assert symbolic_match(form, reference, verifier), (row["unique_id"], form)


@needs_math_verify
def test_math_answers_are_graded_by_math_verify_when_installed():
    for predicted, reference in SYMBOLIC_ONLY:
        assert not normalized_match(predicted, reference, "math")
        assert answers_match(predicted, reference, "math"), (predicted, reference)
    assert not answers_match("x^2+3x", "x^2+2x", "math")
    assert not answers_match(r"\sqrt6", r"\sqrt{5}", "math")
    metric = SolveRate("math")
    metric.update(["2x+x^2", r"\frac{1}{3}"], ["x^2+2x", "0.5"])
    assert metric.compute().item() == pytest.approx(0.5)


@pytest.fixture
def without_math_verify(monkeypatch):
    """``import math_verify`` fails (as where the extra is not installed) and the loader forgets
    what it found, before and after the test."""
    monkeypatch.setitem(sys.modules, "math_verify", None)
    math_verifier.cache_clear()
    yield
    monkeypatch.undo()
    math_verifier.cache_clear()


def test_without_math_verify_the_normaliser_grades_and_the_evaluation_start_says_so_once(without_math_verify, caplog):
    with caplog.at_level(logging.WARNING, logger="stepwise_lit"):
        announce_grader("gsm8k")
        assert caplog.records == []
        SolveRateEvaluation(enabled=True, source="math")
        announce_grader("math")
        assert not answers_match("2x+x^2", "x^2+2x", "math")
        assert answers_match("0.5", r"\frac{1}{2}", "math")
    assert [record.getMessage().count(MATH_VERIFY_INSTALL) for record in caplog.records] == [1]
    assert "math-verify is not installed" in caplog.records[0].getMessage()
