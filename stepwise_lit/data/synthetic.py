"""The embedded data set: procedurally generated multi-step arithmetic problems.

Each problem states, in a compact form a small model reads within a short prompt
budget, a start value and one operation applied to it a number of times::

    Ana has 7 pens. Then +3, 4 times. How many pens?

(an opening with the start value, the operation ``+n``, ``-n`` or ``*n``, how many
times, and a question; four story kinds). Every solution step applies the operation
once to the running value, ``"Step 2: 10 + 3 = 13\n"``; the last step ends with the
answer sentence ``"... = 19. The answer is 19.\n"`` that
:func:`stepwise_lit.grading.answers.extract_embedded` reads. Every fact a step needs is at one
place in the prompt, so a tiny model learns to read it within minutes; what it must
still learn is the arithmetic and when to stop. The chosen solution is correct. The
rejected one makes an arithmetic slip at a random step (``"10 + 3 = 14"``), carries
the wrong value forward and repeats the slip in every later step, so each step from
the error on is a false equation that can be seen within the step itself, and the
final answer is wrong. Step scores are +1 before the error and -1 from it on. Every
number, right or slipped, stays within ``[0, max_value]``.

:func:`generate_labelled` gives single labelled solutions of the same problems for error
localisation (``stepwise_lit.data.labelled``): the correct solution, or the slipped one
with its first wrong step known.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from stepwise_lit.grading.answers import extract_embedded

MAX_VALUE = 99
NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Juno")


@dataclass(frozen=True)
class Operation:
    """One step of a problem: ``value <symbol> operand``.

    Attributes:
        symbol: ``"+"``, ``"-"`` or ``"*"``.
        operand: The number applied to the running value.
    """

    symbol: str
    operand: int

    def apply(self, value: int) -> int:
        """The correct result of this operation on ``value``."""
        if self.symbol == "+":
            return value + self.operand
        if self.symbol == "-":
            return value - self.operand
        return value * self.operand


@dataclass(frozen=True)
class Template:
    """A story kind: an opening with the start value, and the question.

    Attributes:
        opening: Sentence with ``{name}``, ``{start}`` and ``{thing}``.
        things: Nouns the story can count.
        question: The final question, with ``{thing}``.
    """

    opening: str
    things: tuple[str, ...]
    question: str


TEMPLATES = (
    Template(
        opening="{name}'s shop has {start} {thing}.", things=("apples", "pens", "books", "cups"), question="How many {thing}?"
    ),
    Template(opening="A bus has {start} {thing}.", things=("people", "kids"), question="How many on the bus?"),
    Template(opening="{name} has {start} {thing}.", things=("coins", "marbles", "beads"), question="How many {thing}?"),
    Template(opening="A farm has {start} {thing}.", things=("hens", "sheep", "goats"), question="How many {thing}?"),
)


def problem_statement(template: Template, name: str, thing: str, start: int, operation: Operation, times: int) -> str:
    """The prompt: ``"Ana has 7 pens. Then +3, 4 times. How many pens?"``."""
    opening = template.opening.format(name=name, start=start, thing=thing)
    question = template.question.format(thing=thing)
    return f"{opening} Then {operation.symbol}{operation.operand}, {times} times. {question}"


def generate_pairs(
    num_pairs: int, seed: int, min_steps: int = 2, max_steps: int = 8, max_value: int = MAX_VALUE
) -> list[dict]:
    """Generate canonical preference pairs of multi-step arithmetic problems.

    Prompts are distinct within one call, and the same arguments always give the
    same pairs.

    Args:
        num_pairs: How many pairs.
        seed: Seed of the random generator.
        min_steps: Fewest steps (operations) per solution, at least 1.
        max_steps: Most steps per solution.
        max_value: Largest number in a problem (correct or wrong); smaller makes the
            arithmetic easier to learn, and leaves fewer distinct problems. At least 10.

    Returns:
        Canonical rows (docs/data.md) with step scores, outcome scores
        (+1 chosen, -1 rejected), an ``id`` and the correct solution as
        ``reference_solution``.

    Raises:
        ValueError: On a bad step range or ``max_value``, or when ``num_pairs`` distinct
            problems are not found in ``10 * num_pairs + 10000`` draws (``max_value`` too
            small for that many).
    """
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps} and {max_steps}")
    if max_value < 10:
        raise ValueError(f"max_value must be at least 10, got {max_value}")
    rng = random.Random(seed)
    rows: list[dict] = []
    prompts: set[str] = set()
    draws_left = 10 * num_pairs + 10_000
    while len(rows) < num_pairs:
        draws_left -= 1
        if draws_left < 0:
            raise ValueError(
                f"found only {len(rows)} distinct problems of {num_pairs} with max_value={max_value} and "
                f"{min_steps}-{max_steps} steps: raise max_value or ask for fewer pairs"
            )
        row = generate_pair(rng, rng.randint(min_steps, max_steps), max_value)
        if row is None or row["prompt"] in prompts:
            continue
        prompts.add(row["prompt"])
        row["id"] = f"synthetic-{seed}-{len(rows)}"
        rows.append(row)
    return rows


def generate_labelled(
    num_responses: int,
    seed: int,
    min_steps: int = 2,
    max_steps: int = 8,
    max_value: int = MAX_VALUE,
    error_fraction: float = 0.5,
) -> list[dict]:
    """Generate labelled solutions (``stepwise_lit.data.labelled``): right ones and ones with a known first error.

    The problems are those of ``generate_pairs(num_responses, seed, min_steps, max_steps,
    max_value)`` (use a seed not used for training data to hold them out). A seeded draw
    of ``round(num_responses * error_fraction)`` of them give their slipped solution
    (scores +1 before the slip, -1 from it on, ``first_error`` the slipped step), the
    others their correct one (all +1, ``first_error`` -1).

    Args:
        num_responses: How many solutions (one per problem).
        seed: Seed of the problems and of the draw.
        min_steps: Fewest steps per solution, at least 1.
        max_steps: Most steps per solution.
        max_value: Largest number in a problem, at least 10.
        error_fraction: Share of solutions with an error, in [0, 1].

    Returns:
        Canonical labelled responses with ``id`` (the pair's) and ``reference_answer``
        (the correct final value).
    """
    if not 0.0 <= error_fraction <= 1.0:
        raise ValueError(f"error_fraction must be in [0, 1], got {error_fraction}")
    pairs = generate_pairs(num_responses, seed, min_steps, max_steps, max_value)
    wrong = set(random.Random(f"{seed}:labelled").sample(range(num_responses), round(num_responses * error_fraction)))
    return [labelled_solution(pair, "rejected" if index in wrong else "chosen") for index, pair in enumerate(pairs)]


def labelled_solution(pair: dict, side: str) -> dict:
    """One side of a generated pair as a labelled response (its first -1 score is its first error)."""
    scores = pair[f"{side}_step_scores"]
    return {
        "prompt": pair["prompt"],
        "steps": pair[f"{side}_steps"],
        "step_scores": scores,
        "first_error": scores.index(-1.0) if -1.0 in scores else -1,
        "id": pair["id"],
        "reference_answer": extract_embedded(pair["reference_solution"]),
    }


def generate_pair(rng: random.Random, num_steps: int, max_value: int = MAX_VALUE) -> dict | None:
    """One problem with a correct and a slipped solution (``id`` not set); None if no operation or slip fits."""
    template = rng.choice(TEMPLATES)
    name, thing = rng.choice(NAMES), rng.choice(template.things)
    start = rng.randint(1, max_value)
    operation = draw_operation(rng, start, num_steps, max_value)
    if operation is None:
        return None
    operations = [operation] * num_steps
    prompt = problem_statement(template, name, thing, start, operation, num_steps)
    error_step = rng.randrange(num_steps)
    slip = draw_slip(rng, start, operations, error_step, max_value)
    if slip is None:
        return None
    chosen_steps = solution_steps(start, operations, error_step=num_steps, slip=0)
    rejected_steps = solution_steps(start, operations, error_step=error_step, slip=slip)
    return {
        "prompt": prompt,
        "chosen_steps": chosen_steps,
        "rejected_steps": rejected_steps,
        "chosen_step_scores": [1.0] * num_steps,
        "rejected_step_scores": [1.0] * error_step + [-1.0] * (num_steps - error_step),
        "chosen_score": 1.0,
        "rejected_score": -1.0,
        "reference_solution": "".join(chosen_steps),
    }


def draw_operation(rng: random.Random, start: int, times: int, max_value: int = MAX_VALUE) -> Operation | None:
    """An operation that, applied ``times`` times to ``start``, keeps every value in [1, max_value]; None if none does.

    The symbol is drawn among those that fit, then the operand: 2..9 for ``+`` and ``-``
    (at most 3/10 of ``max_value``), 2..5 for ``*``.
    """
    largest_operand = min(9, max(2, max_value * 3 // 10))
    operands = {
        "+": range(2, min(largest_operand, (max_value - start) // times) + 1),
        "-": range(2, min(largest_operand, (start - 1) // times) + 1),
        "*": [factor for factor in range(2, 6) if start * factor**times <= max_value],
    }
    symbols = [symbol for symbol, choices in operands.items() if choices]
    if not symbols:
        return None
    symbol = rng.choice(symbols)
    return Operation(symbol, rng.choice(operands[symbol]))


def draw_slip(
    rng: random.Random, start: int, operations: list[Operation], error_step: int, max_value: int = MAX_VALUE
) -> int | None:
    """A random offset in ±1..9 that keeps every wrong result in [0, max_value], or None if none does.

    Keeping wrong numbers as short as right ones leaves the arithmetic as the only cue.
    """
    slips = [slip for size in range(1, 10) for slip in (size, -size)]
    rng.shuffle(slips)
    return next(
        (slip for slip in slips if all(0 <= v <= max_value for v in running_values(start, operations, error_step, slip))),
        None,
    )


def running_values(start: int, operations: list[Operation], error_step: int, slip: int) -> list[int]:
    """Each step's result when steps from ``error_step`` on add ``slip`` to their result."""
    values = []
    value = start
    for position, operation in enumerate(operations):
        value = operation.apply(value) + (slip if position >= error_step else 0)
        values.append(value)
    return values


def solution_steps(start: int, operations: list[Operation], error_step: int, slip: int) -> list[str]:
    """``"Step t: a + b = c\\n"`` lines; the last also states the answer."""
    values = running_values(start, operations, error_step, slip)
    inputs = [start] + values[:-1]
    steps = [
        f"Step {position + 1}: {left} {operation.symbol} {operation.operand} = {result}"
        for position, (left, operation, result) in enumerate(zip(inputs, operations, values))
    ]
    steps[-1] += f". The answer is {values[-1]}."
    return [step + "\n" for step in steps]
