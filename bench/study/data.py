"""The study's data: held-out problems, the base's gold solutions, and the files each method trains
on, made from the pool of the base's own samples (`pool_files`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bench.study.methods import Setup


def held_out(key: str, low: float, high: float) -> bool:
    """Whether a stable hash of `key` falls in [low, high) of [0, 1)."""
    position = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10_000 / 10_000
    return low <= position < high


def write(rows: list[dict], path: Path) -> Path:
    from stepwise_lit.data.writers import write_rows

    path.parent.mkdir(parents=True, exist_ok=True)
    write_rows(rows, path)
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


OPERATIONS = ("+", "-", "*")


def mixed_problem(rng, setup: Setup) -> dict | None:
    """One problem of mixed operations, the embedded task's story and step format with a different
    operation at every step: "Ana has 508 pens. Then +47, -19, *3. How many pens?", solved
    "Step 1: 508 + 47 = 555" ... "Step 3: 536 * 3 = 1608. The answer is 1608."; + and - take 2 to
    `setup.max_operand`, * takes 2 to 9, every running value stays in [1, `setup.max_value`]. The
    rejected side, which no method of the study trains on, slips by ±1..9 at a random step and
    carries the error on. None when no operation fits."""
    from stepwise_lit.data.synthetic import NAMES, TEMPLATES, Operation

    template = rng.choice(TEMPLATES)
    name, thing = rng.choice(NAMES), rng.choice(template.things)
    value = start = rng.randint(2, setup.max_value)
    operations, values = [], []
    for _ in range(rng.randint(setup.min_steps, setup.max_steps)):
        choices = [(symbol, operand) for symbol in OPERATIONS
                   for operand in (range(2, 10) if symbol == "*" else range(2, setup.max_operand + 1))
                   if 1 <= Operation(symbol, operand).apply(value) <= setup.max_value]
        if not choices:
            return None
        symbol = rng.choice([symbol for symbol in OPERATIONS if any(choice[0] == symbol for choice in choices)])
        operand = rng.choice([choice[1] for choice in choices if choice[0] == symbol])
        operations.append((symbol, operand))
        value = Operation(symbol, operand).apply(value)
        values.append(value)
    opening = template.opening.format(name=name, start=start, thing=thing)
    listed = ", ".join(f"{symbol}{operand}" for symbol, operand in operations)
    prompt = f"{opening} Then {listed}. {template.question.format(thing=thing)}"
    slip_at, slip = rng.randrange(len(operations)), rng.choice([d for d in range(-9, 10) if d])
    wrong = [v + slip if index >= slip_at else v for index, v in enumerate(values)]
    chosen, rejected = steps_of(start, operations, values), steps_of(start, operations, wrong)
    return {"prompt": prompt, "chosen_steps": chosen, "rejected_steps": rejected,
            "chosen_step_scores": [1.0] * len(chosen),
            "rejected_step_scores": [1.0 if index < slip_at else -1.0 for index in range(len(rejected))],
            "chosen_score": 1.0, "rejected_score": -1.0, "reference_solution": "".join(chosen)}


def steps_of(start: int, operations: list[tuple[str, int]], values: list[int]) -> list[str]:
    """``"Step t: a <op> b = c\n"`` lines from the running `values`; the last also states the answer."""
    inputs = [start] + values[:-1]
    steps = [f"Step {index + 1}: {left} {symbol} {operand} = {result}"
             for index, (left, (symbol, operand), result) in enumerate(zip(inputs, operations, values))]
    steps[-1] += f". The answer is {values[-1]}."
    return [step + "\n" for step in steps]


def generate_problems(count: int, setup: Setup, seed: int = 0) -> list[dict]:
    """`count` distinct mixed problems (`mixed_problem`), ids ``mixed-<index>``."""
    import random

    rng, rows, prompts = random.Random(seed), [], set()
    while len(rows) < count:
        row = mixed_problem(rng, setup)
        if row is not None and row["prompt"] not in prompts:
            prompts.add(row["prompt"])
            rows.append({**row, "id": f"mixed-{len(rows)}"})
    return rows


def split_problems(setup: Setup) -> dict[str, list[dict]]:
    """Mixed problems (`generate_problems`, seed 0) split by their arithmetic:
    a hash of the correct solution puts 5% in validation and 10% in test (one pair per distinct
    solution, so no held-out solution occurs in training); of the rest, the first
    ``base_batch_size * base_steps`` are the base's gold solutions and the next ``pool_prompts`` the
    pool's prompts.

    Returns:
        ``base``, ``pool``, ``val`` and ``test`` rows (canonical pairs: gold chosen, a synthetic slip rejected).
    """
    num_train = setup.base_batch_size * setup.base_steps + setup.pool_prompts
    rows = generate_problems(int(1.2 * num_train) + 12 * setup.test_problems, setup)
    train, evaluation = [], {"val": {}, "test": {}}
    for row in rows:
        solution = row["reference_solution"]
        split = "val" if held_out(solution, 0.0, 0.05) else "test" if held_out(solution, 0.05, 0.15) else "train"
        if split == "train":
            train.append(row)
        else:
            evaluation[split].setdefault(solution, row)
    sizes = {"val": setup.val_problems, "test": setup.test_problems}
    short = [split for split, size in sizes.items() if len(evaluation[split]) < size] + (["train"] if len(train) < num_train else [])
    if short:
        raise ValueError(f"max_value {setup.max_value}: too few distinct problems for the {', '.join(short)} split")
    base = setup.base_batch_size * setup.base_steps
    return {"base": train[:base], "pool": train[base:num_train],
            **{split: list(evaluation[split].values())[: sizes[split]] for split in sizes}}


def is_right(solution) -> bool:
    """A right sample: right answer and no flagged step (`stepwise_lit.online.pairs.is_correct` with
    ``answer_and_steps``, on a sample with a step)."""
    from stepwise_lit.online.pairs import is_correct, is_usable

    return is_usable(solution) and bool(is_correct(solution, "answer_and_steps"))


def labelled_rows(record) -> list[dict]:
    """Every scored sample of a round (`stepwise_lit.online.solutions.RoundRecord`) with a step, as a
    canonical labelled response: its first step the verifier scores below 0 is its first error."""
    rows = []
    for prompt in record.prompts:
        for index, solution in enumerate(prompt.solutions):
            if solution.steps:
                flagged = [step for step, score in enumerate(solution.step_scores) if score < 0]
                rows.append({"prompt": prompt.prompt, "steps": solution.steps, "step_scores": solution.step_scores,
                             "first_error": flagged[0] if flagged else -1, "id": f"{prompt.id}/{index}",
                             "reference_answer": None})
    return rows


def step_dpo_rows(pairs: list[dict]) -> tuple[list[dict], int]:
    """The pairs in Step-DPO's layout (the package's ``step_dpo`` format): ``initial_reason_steps`` =
    the steps both sides share, ``chosen`` / ``rejected`` = each side's next step only. Pairs where one
    side ends inside the shared prefix have no such step and are left out.

    Returns:
        The rows and how many pairs were left out.
    """
    from stepwise_lit.data.tokenize import first_divergence

    rows, left_out = [], 0
    for pair in pairs:
        chosen, rejected = pair["chosen_steps"], pair["rejected_steps"]
        shared = first_divergence(chosen, rejected)
        if shared is None or shared >= min(len(chosen), len(rejected)):
            left_out += 1
            continue
        rows.append({"prompt": pair["prompt"], "initial_reason_steps": "".join(chosen[:shared]), "chosen": chosen[shared],
                     "rejected": rejected[shared], "answer": pair["reference_solution"], "id": pair["id"]})
    return rows, left_out


def right_rows(record, slips: dict[str, dict]) -> list[dict]:
    """RFT's rows: each distinct right sample (right answer, no flagged step) of each pool prompt as the
    chosen side; the rejected side, which SFT does not read, is the prompt's synthetic slip (`slips`, by id)."""
    rows = []
    for prompt in record.prompts:
        texts = set()
        for index, solution in enumerate(prompt.solutions):
            if is_right(solution) and solution.completion not in texts:
                texts.add(solution.completion)
                slip = slips[prompt.id]
                rows.append({**slip, "chosen_steps": solution.steps, "chosen_step_scores": [1.0] * len(solution.steps),
                             "id": f"{prompt.id}/right-{index}"})
    return rows


def pool_pairs(record) -> tuple[list[dict], dict]:
    """The pool's pairs: per prompt its first-error pair (a right sample, right answer and every step
    passed, against the wrong one sharing the most leading steps with it), else its best sample
    against its worst by the lowest step score (where no sample is right, or none wrong).

    Returns:
        The rows (prompt order) and the counts: ``first_error_branch``, ``best_vs_worst``, ``no_pair``,
        ``wrong_chosen`` (best-vs-worst pairs whose chosen answer is wrong) and ``parting_at_first_error``
        (pairs whose sides part at the rejected side's first flagged step: there the pair alone
        already says which step is wrong).
    """
    from stepwise_lit.data.tokenize import first_divergence
    from stepwise_lit.online.pairs import PairSettings, build_pairs

    first = build_pairs(record.prompts, PairSettings(strategy="first_error_branch", correctness="answer_and_steps"))
    paired = {row["id"].split("/")[0] for row in first.rows}
    rest = [prompt for prompt in record.prompts if prompt.id not in paired]
    fallback = build_pairs(rest, PairSettings(strategy="best_vs_worst", aggregation="min"))
    order = {prompt.id: index for index, prompt in enumerate(record.prompts)}
    rows = sorted(first.rows + fallback.rows, key=lambda row: order[row["id"].split("/")[0]])
    answers = {prompt.id: prompt.solutions for prompt in record.prompts}
    wrong_chosen = sum(not answers[row["id"].split("/")[0]][int(row["id"].split("/")[1].split("-")[0])].correct
                       for row in fallback.rows)
    parting = sum(first_divergence(row["chosen_steps"], row["rejected_steps"]) ==
                  next((i for i, score in enumerate(row["rejected_step_scores"]) if score < 0), None) for row in rows)
    return rows, {"first_error_branch": len(first.rows), "best_vs_worst": len(fallback.rows),
                  "no_pair": len(record.prompts) - len(rows), "wrong_chosen": wrong_chosen,
                  "parting_at_first_error": parting}


def pool_summary(record) -> dict:
    """The pool's right-answer share, right-with-every-step-passed share and prompts with a right sample."""
    solutions = [solution for prompt in record.prompts for solution in prompt.solutions]
    clean = [is_right(solution) for solution in solutions]
    return {
        "prompts": len(record.prompts), "samples": len(solutions),
        "right_answer_share": sum(bool(s.correct) for s in solutions) / len(solutions),
        "right_all_steps_share": sum(clean) / len(solutions),
        "right_answer_flagged_step_share": sum(bool(s.correct) and not c for s, c in zip(solutions, clean)) / len(solutions),
        "prompts_with_a_right_sample": sum(any(map(is_right, prompt.solutions)) for prompt in record.prompts),
        "prompts_all_right": sum(all(bool(s.correct) for s in prompt.solutions) for prompt in record.prompts),
    }
