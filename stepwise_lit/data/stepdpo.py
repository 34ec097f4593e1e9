"""The Step-DPO adapter: one shared prefix of correct steps, then a correct and a wrong next step.

Layout of Step-DPO's data (Lai et al. 2024, "Step-DPO: Step-wise Preference Optimization
for Long-chain Reasoning of LLMs", arXiv:2406.18629; data set ``xinlai/Math-Step-DPO-10K``,
whose dataset card lists the string fields ``dataset``, ``prompt``,
``initial_reason_steps``, ``chosen``, ``rejected``, ``full_chosen``, ``full_rejected`` and
``answer``; code at github.com/dvlab-research/Step-DPO). In the authors' data
construction script a solution ``"...\\nStep 1: ...\\nStep 2: ...\\nStep 3: ..."`` gives
``initial_reason_steps`` = the text up to and including the header of the step where the
two responses part (``"...\\nStep 3:"``, or ``""`` when they differ from the start), and
``chosen`` / ``rejected`` = what follows: that step's text (``" 5 + 4 = 9."``), which may run
on into later steps. Their trainer reads ``prompt + initial_reason_steps`` as the prompt and
``chosen`` / ``rejected`` as the two responses. ``full_chosen`` / ``full_rejected`` (whole
solutions) are not read here.

Here the shared prefix is part of both responses, so the pair has the step structure the
stepwise losses use: each response is ``initial_reason_steps + chosen`` (or ``+ rejected``)
split on ``data.step_delimiter`` (Step-DPO's own steps start ``"\\nStep"``: set
``--data.step_delimiter $'\\nStep'``; with another delimiter the pair is still valid, with
coarser steps). A step that lies wholly inside ``initial_reason_steps`` scores +1; the step
where the texts part and every later step score +1 in the chosen response and -1 in the
rejected one (as in the other sources, a step from the error on is -1). So the first step
whose text differs, the ``first_divergence`` loss's step, is the step that holds the
header of the parting step and its continuation.
"""

from __future__ import annotations

from itertools import accumulate

from stepwise_lit.data.records import SIDES, RecordContext, checked_id, extract_steps, required_text

# Score of the steps from the parting step on, per side.
CONTINUATION_SCORES = {"chosen": 1.0, "rejected": -1.0}


def step_dpo(record: dict, context: RecordContext) -> list[dict]:
    """Step-DPO rows ``{prompt, initial_reason_steps, chosen, rejected}``: one pair each.

    ``initial_reason_steps`` may be empty (responses that differ from their first
    step); ``chosen`` and ``rejected`` must hold text. ``answer`` becomes
    ``reference_solution``; an ``id`` is kept, else one is made from the source and row.
    """
    prefix = required_text(record, "initial_reason_steps", context)
    row = {
        "prompt": required_text(record, "prompt", context),
        "id": checked_id(record, context) or context.default_id(),
        "reference_solution": None if record.get("answer") is None else required_text(record, "answer", context),
    }
    for side in SIDES:
        continuation = required_text(record, side, context)
        if not continuation.strip():
            raise context.error(side, "empty step (the step after initial_reason_steps is blank)")
        steps, scores = continued_steps(prefix, continuation, context.step_delimiter, CONTINUATION_SCORES[side])
        row[f"{side}_steps"] = steps
        row[f"{side}_step_scores"] = scores
    return [row]


def continued_steps(prefix: str, continuation: str, delimiter: str, score: float) -> tuple[list[str], list[float]]:
    """Split ``prefix + continuation`` into steps; +1 for steps inside ``prefix``, ``score`` for the rest.

    Args:
        prefix: The shared text (correct steps).
        continuation: The text that follows it in this response.
        delimiter: Step delimiter (see :func:`~stepwise_lit.data.records.extract_steps`).
        score: Score of every step that reaches into ``continuation``.

    Returns:
        The steps (joined, they give ``prefix + continuation``) and one score per step.
    """

    steps = extract_steps(prefix + continuation, delimiter)
    ends = accumulate(len(step) for step in steps)  # where each step ends in the text
    return steps, [1.0 if end <= len(prefix) else score for end in ends]
