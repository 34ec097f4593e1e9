"""How math-verify and the hand normaliser grade MATH answers. Pairs: MATH-500's reference answers
against model-style rewrites of themselves and against another problem's answer, and PRM800K's real
model answers against their ground truth. Run from the repository root (needs math-verify, the `[math]`
extra, and ../shared/data):

    python -m bench.math_grading            # print the agreement and the disagreements
    python -m bench.math_grading --write    # ... and docs/results/math_grading.md (+ .json)

For each MATH-500 row (prm800k/math_test.sample.jsonl) the predicted answers are: the last
`\\boxed{}` of its own solution; the reference rewritten as a model might write it (`variants`:
`\\dfrac`, `a/b`, an unreduced fraction, `\\sqrt2`, spaces, `\\left(`/`\\right)`, a decimal for
a fraction, a unit, `\\!` in thousands, a leading `x =`); and the reference of the next row (a
wrong answer, unless the two are equal).
Each pair is graded by `normalized_match` (the old grader) and `symbolic_match` (math-verify,
what `answers_match` uses when it is installed); a pair math-verify cannot parse counts as the
normaliser's verdict, as in `answers_match`. The PRM800K records (prm800k_found_records.jsonl)
give real answers: each `# Answer` completion and `pre_generated_answer`, against the question's
`ground_truth_answer`. Deterministic: no seed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from fractions import Fraction
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/math_grading.py`: this checkout's bench

from bench.common import REPO, Report, add_write_option  # noqa: E402
from stepwise_lit.grading.answers import (  # noqa: E402
    as_number,
    extract_math,
    math_verifier,
    normalize_math,
    normalized_match,
    symbolic_match,
)

DATA = REPO.parent / "shared" / "data" / "prm800k"
MAX_LISTED = 25
"""Disagreements listed per kind in the results file (all are counted)."""
SIMPLE_FRACTION = re.compile(r"\\d?frac\{(\d+)\}\{(\d+)\}")
THOUSANDS_MARK = re.compile(r"\d,(?:\\!)?\s*\d{3}")


def decimal_form(answer: str) -> str | None:
    """A fraction's terminating decimal (``"\\frac{3}{8}"`` -> ``"0.375"``, at most 6 places), else None."""
    value = as_number(normalize_math(answer))
    if value is None or "frac" not in answer and "/" not in answer:
        return None
    exact = Fraction(value).limit_denominator(10_000)
    text = f"{float(exact):.6f}".rstrip("0").rstrip(".")
    return text if Fraction(text) == exact else None


def variants(answer: str) -> dict[str, str]:
    """Model-style rewrites of a reference answer, by kind; a kind that would not change it is left out."""
    rewrites = {
        "dfrac": answer.replace("\\frac", "\\dfrac"),
        "spaces": None if THOUSANDS_MARK.search(answer) else re.sub(r"\s*([=+,\-])\s*", r" \1 ", answer).strip(),
        "left_right": None if "\\left" in answer else answer.replace("(", "\\left(").replace(")", "\\right)"),
        "decimal": decimal_form(answer),
        "unit": answer + "\\text{ units}" if re.fullmatch(r"-?\d+(\.\d+)?", answer) else None,
        "thousands": re.sub(r"(\d)(\d{3})$", r"\1,\\!\2", answer) if re.fullmatch(r"\d{4,}", answer) else None,
        "slash": SIMPLE_FRACTION.sub(r"\1/\2", answer) if SIMPLE_FRACTION.search(answer) else None,
        "unreduced": SIMPLE_FRACTION.sub(lambda m: f"\\frac{{{2 * int(m[1])}}}{{{2 * int(m[2])}}}", answer)
        if SIMPLE_FRACTION.fullmatch(answer) else None,
        "sqrt_braces": re.sub(r"\\sqrt\{(\d)\}", r"\\sqrt\1", answer),
        "assignment": "x = " + answer if "=" not in answer and "," not in answer else None,
    }
    return {kind: text for kind, text in rewrites.items() if text is not None and text != answer}


def math500_pairs() -> list[tuple[str, str, str, str, bool | None]]:
    """``(id, kind, reference, predicted, expected)``: expected True for a rewrite or the solution's
    box, False for another problem's (different) answer."""
    rows = [json.loads(line) for line in (DATA / "math_test.sample.jsonl").open(encoding="utf-8")]
    pairs = []
    for index, row in enumerate(rows):
        reference = row["answer"]
        pairs.append((row["unique_id"], "solution_box", reference, extract_math(row["solution"]), True))
        pairs += [(row["unique_id"], kind, reference, text, True) for kind, text in variants(reference).items()]
        other = rows[(index + 1) % len(rows)]["answer"]
        if normalize_math(other) != normalize_math(reference):
            pairs.append((row["unique_id"], "other_answer", reference, other, False))
    return pairs


def prm800k_pairs() -> list[tuple[str, str, str, str, bool | None]]:
    """``(record line, kind, ground truth, model answer, None)`` from the real PRM800K records."""
    pairs = []
    for line, text in enumerate((DATA / "prm800k_found_records.jsonl").open(encoding="utf-8"), start=1):
        record = json.loads(text)
        truth = record["question"]["ground_truth_answer"]
        if truth is None:
            continue
        answers = [("pre_generated", record["question"].get("pre_generated_answer"))]
        for step in record["label"]["steps"]:
            answers += [("answer_step", completion["text"].split("# Answer", 1)[1].strip())
                        for completion in step["completions"] or [] if "# Answer" in completion["text"]]
        pairs += [(f"record {line}", kind, truth, answer, None) for kind, answer in answers if answer]
    return pairs


def main(argv: list[str] | None = None) -> None:
    """Grade every pair both ways; print the agreement by kind and the disagreements."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_write_option(parser, "math_grading")
    options = parser.parse_args(argv)
    verifier = math_verifier()
    if verifier is None:
        raise SystemExit("math-verify is not installed: pip install 'stepwise_lit[math]'")
    report = Report(__doc__, "none (deterministic)")
    graded = []
    for uid, kind, reference, predicted, expected in math500_pairs() + prm800k_pairs():
        hand = normalized_match(predicted, reference, "math")
        symbolic = symbolic_match(predicted, reference, verifier)
        graded.append((uid, kind, reference, predicted, expected, hand, hand if symbolic is None else symbolic,
                       symbolic is None))
    kinds = sorted({row[1] for row in graded}, key=[row[1] for row in graded].index)
    table = []
    for kind in kinds:
        rows = [row for row in graded if row[1] == kind]
        expected = rows[0][4]
        table.append([kind, len(rows), sum(row[5] == row[6] for row in rows),
                      "-" if expected is None else sum(row[5] == expected for row in rows),
                      "-" if expected is None else sum(row[6] == expected for row in rows),
                      sum(row[7] for row in rows)])
    agree = sum(row[5] == row[6] for row in graded)
    report.say(f"math-verify {version('math-verify')} against the hand "
               f"normaliser on {len(graded)} answer pairs: the graders agree on {agree} ({agree / len(graded):.1%}).")
    report.say("Per kind: pairs, pairs both graders grade alike, pairs each grades as expected (True for a rewrite "
               "or the solution's box, False for another problem's answer; '-': real answers, unknown), pairs "
               "math-verify could not parse (its verdict is then the normaliser's).")
    report.table(["kind", "pairs", "agree", "normaliser right", "math-verify right", "unparsed"], table)
    disagreements = [row for row in graded if row[5] != row[6]]
    listed = [row for kind in kinds for row in [row for row in disagreements if row[1] == kind][:MAX_LISTED]]
    report.say(f"The {len(disagreements)} disagreements (at most {MAX_LISTED} of each kind listed):")
    report.table(["id", "kind", "reference", "predicted", "normaliser", "math-verify"],
                 [[uid, kind, f"`{ref}`", f"`{pred}`", hand, symbolic]
                  for uid, kind, ref, pred, _, hand, symbolic, _ in listed])
    report.finish({"pairs": len(graded), "agree": agree, "disagreements": len(disagreements),
                   "by_kind": {row[0]: dict(zip(["pairs", "agree", "normaliser_right", "math_verify_right", "unparsed"],
                                                row[1:])) for row in table}}, options.write)


if __name__ == "__main__":
    main()
