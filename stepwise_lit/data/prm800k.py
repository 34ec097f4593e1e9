"""The PRM800K adapter: label records -> pairs at each step rated both +1 and -1.

The record layout is PRM800K's own (docs/data.md, "Formats").
"""

from __future__ import annotations

from typing import Any

from stepwise_lit.data.records import RecordContext, RecordSkipped, checked_id, join_as_lines, required_object


def prm800k(record: dict, context: RecordContext) -> list[dict]:
    """PRM800K label records: one pair per step rated both +1 and -1.

    The labelled trajectory follows each step's ``chosen_completion``, or its
    ``human_completion`` (an object written by the labeler as a correct step,
    scored +1) when no completion was chosen; it ends at the first step with
    neither (labelling stopped), with ``"completions": null``, or with an unrated
    (``"rating": null``) choice. At a step on the trajectory, or the step where it
    ends, that has a +1 option (the trajectory's own choice if it scores +1, else
    the first completion rated +1) and a completion rated -1 (the first one): the
    chosen response is the whole trajectory if the +1 option is the trajectory's
    own, else the shared prefix plus the +1 option; the rejected response is the
    shared prefix plus the -1 completion. Ratings (-1, 0, +1) are the step scores.
    Steps are the texts joined as lines. ``reference_solution`` is the question's
    ``ground_truth_solution`` (phase 2), else its ``ground_truth_answer``.

    Records that give no pair (``finish_reason`` ``bad_problem``, or no step rated
    both ways) are skipped with their reason counted in the log.
    """
    question = required_object(record, "question", context)
    if not isinstance(question.get("problem"), str) or not question["problem"].strip():
        raise context.error("question.problem", "missing or not a non-empty string")
    label = required_object(record, "label", context)
    if not isinstance(label.get("steps"), list):
        raise context.error("label.steps", "expected a list of step objects")
    if label.get("finish_reason") == "bad_problem":
        raise RecordSkipped("finish_reason is bad_problem")
    steps = [checked_prm800k_step(step, position, context) for position, step in enumerate(label["steps"])]
    trajectory = labelled_trajectory(steps)  # [(text, score)] along the labeller's path
    reference = question.get("ground_truth_solution") or question.get("ground_truth_answer")
    base_id = checked_id(record, context) or f"{record.get('labeler', context.default_id())}:{record.get('timestamp', '')}"
    rows = []
    for position, step in enumerate(steps[: len(trajectory) + 1]):
        own_option = trajectory_option(step)
        own_score = trajectory[position][1] if position < len(trajectory) else None
        plus_option = own_option if own_score == 1.0 else first_rated(step, 1)
        minus_option = first_rated(step, -1)
        if plus_option is None or minus_option is None:
            continue
        prefix = trajectory[:position]
        chosen_path = trajectory if plus_option is own_option else [*prefix, (plus_option["text"], 1.0)]
        rejected_path = [*prefix, (minus_option["text"], -1.0)]
        rows.append(
            {
                "prompt": question["problem"],
                "chosen_steps": join_as_lines([text for text, _ in chosen_path]),
                "rejected_steps": join_as_lines([text for text, _ in rejected_path]),
                "chosen_step_scores": [score for _, score in chosen_path],
                "rejected_step_scores": [score for _, score in rejected_path],
                "id": f"{base_id}:step{position + 1}",
                "reference_solution": reference,
            }
        )
    if not rows:
        raise RecordSkipped("no labelled step has both a +1 (or human) and a -1 completion")
    return rows


def checked_prm800k_step(step: Any, position: int, context: RecordContext) -> dict:
    """A label step whose completions (or null) and human completion (or null) are objects with string text."""
    field = f"label.steps[{position}]"
    if not isinstance(step, dict):
        raise context.error(field, f"expected an object, got {type(step).__name__}")
    completions = step.get("completions")
    options = [*(completions if isinstance(completions, list) else []), step.get("human_completion")]
    if completions is not None and not isinstance(completions, list):
        raise context.error(f"{field}.completions", f"expected a list or null, got {type(completions).__name__}")
    for option in options:
        if option is not None and not (isinstance(option, dict) and isinstance(option.get("text"), str)):
            raise context.error(field, f"a completion must be an object with string 'text', got {option!r:.80}")
    return step


def trajectory_option(step: dict) -> dict | None:
    """The option the labeller continued with: the chosen completion, else the human completion, else None."""
    chosen_index = step.get("chosen_completion")
    completions = step.get("completions") or []
    if isinstance(chosen_index, int) and 0 <= chosen_index < len(completions):
        return completions[chosen_index]
    return step.get("human_completion")


def labelled_trajectory(steps: list[dict]) -> list[tuple[str, float]]:
    """``(text, score)`` of the labeller's path, up to the first step without a rated choice.

    The human completion scores +1; a completion scores its rating.
    """
    trajectory = []
    for step in steps:
        option = trajectory_option(step)
        if option is None:
            break
        score = 1.0 if option is step.get("human_completion") else option.get("rating")
        if score is None:
            break
        trajectory.append((option["text"], float(score)))
    return trajectory


def first_rated(step: dict, rating: int) -> dict | None:
    """The step's first completion with this rating, or None."""
    return next((option for option in step.get("completions") or [] if option.get("rating") == rating), None)
