"""A sampler for the study's smoke run (`python -m bench.study --smoke --sampler
tests.helpers.study_helpers.HalfRightSampler`): it reads a mixed problem
(`bench.study.data.mixed_problem`) and writes sample i right for even i, else slipped by +1 at
step (i // 2 + 1) mod its number of steps, the error carried on."""

from __future__ import annotations

import re

from bench.study.data import steps_of
from stepwise_lit.data.synthetic import Operation

PROBLEM = re.compile(r"has (\d+) .*? Then ((?:[+*-]\d+(?:, )?)+)\.")


class HalfRightSampler:
    """Built as the package builds a backend (`stepwise_lit.models.generate.Backend`'s arguments)."""

    def __init__(self, model, tokenizer, prompt_format=None, max_prompt_length=None, progress=True) -> None:
        self.model = model

    def generate(self, prompts, settings) -> list[list[str]]:
        completions = []
        for prompt in prompts:
            match = PROBLEM.search(prompt)
            start = int(match.group(1))
            operations = [(text[0], int(text[1:])) for text in match.group(2).split(", ")]
            values, value = [], start
            for symbol, operand in operations:
                value = Operation(symbol, operand).apply(value)
                values.append(value)
            samples = []
            for index in range(settings.num_samples):
                slip_at = len(values) if index % 2 == 0 else (index // 2 + 1) % len(values)
                samples.append("".join(steps_of(start, operations, [v + (step >= slip_at) for step, v in enumerate(values)])))
            completions.append(samples)
        return completions
