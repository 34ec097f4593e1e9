"""A scripted generator for the solve-rate tests: on the validation prompts of
`tests.helpers.entry.BASE`, the right answer where it is odd and one more where it is even; and
`ScriptedGeneration`, a callback (class path `tests.helpers.scripted_generation.ScriptedGeneration`)
that puts it in place in runs of other processes and records the prompts each rank generates for."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from stepwise_lit.data.synthetic import generate_pairs
from stepwise_lit.data.heldout import reference_answer
from stepwise_lit.models.generate import TransformersGenerator

# tests.helpers.entry's BASE: synthetic pairs, seed 0, 8 training then 4 validation pairs, numbers up to 10
# (a fifth validation pair, for the distributed test, is the next one the generator draws)
FIVE_VAL_ROWS = generate_pairs(13, seed=0, max_value=10)[8:]
VAL_ROWS = FIVE_VAL_ROWS[:4]


REFERENCES = {row["prompt"]: int(reference_answer(row["reference_solution"], [], "embedded")) for row in FIVE_VAL_ROWS}


def scripted_completion(prompt: str) -> str:
    """The scripted generator's completion: the right answer where it is odd, one more where it is even."""
    answer = REFERENCES[prompt] + (REFERENCES[prompt] % 2 == 0)
    return f"Step 1: 1 + 1 = 2\nThe answer is {answer}.\n"


def scripted_generate(self, prompts, settings):
    return [[scripted_completion(prompt)] * settings.num_samples for prompt in prompts]


class ScriptedGeneration(L.Callback):
    """For runs in other processes: makes every rank's generator scripted (`scripted_generate`)
    and record the prompts it generates for in ``<out_dir>/rank<r>.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        record = self.out_dir / f"rank{trainer.global_rank}.json"
        self.out_dir.mkdir(parents=True, exist_ok=True)

        def generate(generator, prompts, settings):
            record.write_text(json.dumps(json.loads(record.read_text()) + list(prompts) if record.exists() else list(prompts)))
            return scripted_generate(generator, prompts, settings)

        TransformersGenerator.generate = generate
