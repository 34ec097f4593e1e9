"""Collated-batch rows written by hand: token ids and step ids of a chosen and a rejected side."""

from __future__ import annotations

import json
import math

NAN = math.nan


def token_row(chosen_ids, chosen_steps, rejected_ids, rejected_steps, **changes) -> dict:
    row = {
        "chosen_input_ids": chosen_ids,
        "chosen_step_ids": chosen_steps,
        "rejected_input_ids": rejected_ids,
        "rejected_step_ids": rejected_steps,
        "chosen_step_scores": [1.0] * max(chosen_steps),
        "rejected_step_scores": [-1.0] * max(rejected_steps),
        "chosen_score": NAN,
        "rejected_score": NAN,
        "first_divergence": 0,
        "prompt_json": json.dumps("p"),
        "chosen_steps": [f"c{t}" for t in range(1, max(chosen_steps) + 1)],
        "rejected_steps": [f"r{t}" for t in range(1, max(rejected_steps) + 1)],
    }
    row.update(changes)
    return row
