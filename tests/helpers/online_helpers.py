"""Pieces the online-loop runs load from their YAML files:

- ``SolvingGenerator`` (``online.generator: tests.helpers.online_helpers.SolvingGenerator``): solutions of the
  embedded problems computed from the prompt, half right and half with a slip, so rounds have
  pairs without a trained policy. It records every call (pid, rank, prompts) in
  ``$ONLINE_CALLS_DIR/calls-<pid>.jsonl`` when that variable is set.
- ``SlippingGenerator`` (``online.generator: tests.helpers.online_helpers.SlippingGenerator``): every sample
  slips at some step, so no sample is right (``online.pairs.reference_fallback``).
- ``KillAtStep``: SIGKILL in the middle of a round.
- ``ReferenceProbe``: whether the reference equals the policy at each epoch's first step.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import lightning as L
import torch

from stepwise_lit.models.generate import GenerationSettings

PROBLEM = re.compile(r"has (\d+) [^.]+\. Then ([-+*])(\d+), (\d+) times\.")


def solution(prompt: str, slip_step: int | None) -> str:
    """The steps of an embedded problem, "Step k: a op b = c\\n", the last with "The answer is c.";
    from ``slip_step`` (1-based) on, each result is one too high."""
    start, symbol, operand, times = PROBLEM.search(prompt).groups()
    value, operand = int(start), int(operand)
    steps = []
    for step in range(1, int(times) + 1):
        result = value + operand if symbol == "+" else value - operand if symbol == "-" else value * operand
        result += slip_step is not None and step >= slip_step
        end = f". The answer is {result}.\n" if step == int(times) else "\n"
        steps.append(f"Step {step}: {value} {symbol} {operand} = {result}{end}")
        value = result
    return "".join(steps)


class SolvingGenerator:
    """Built as the online loop builds a backend; sample i is right when i is even, else slips at
    step 1 + (i // 2) mod times."""

    def __init__(self, model, tokenizer, prompt_format=None, max_prompt_length=None, progress=True) -> None:
        self.model = model

    def generate(self, prompts, settings: GenerationSettings) -> list[list[str]]:
        folder = os.environ.get("ONLINE_CALLS_DIR")
        if folder:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            with open(os.path.join(folder, f"calls-{os.getpid()}.jsonl"), "a") as file:
                file.write(json.dumps({"pid": os.getpid(), "rank": rank, "prompts": list(prompts)}) + "\n")
        completions = []
        for prompt in prompts:
            times = int(PROBLEM.search(prompt).group(4))
            completions.append([solution(prompt, None if i % 2 == 0 else 1 + (i // 2) % times)
                                for i in range(settings.num_samples)])
        return completions


class SlippingGenerator(SolvingGenerator):
    """Like `SolvingGenerator`, but sample i slips at step 1 + i mod times: none is right."""

    def generate(self, prompts, settings: GenerationSettings) -> list[list[str]]:
        return [[solution(prompt, 1 + i % int(PROBLEM.search(prompt).group(4))) for i in range(settings.num_samples)]
                for prompt in prompts]


class KillAtStep(L.Callback):
    """SIGKILLs its own process once, at the end of global step ``step`` (before that step's
    checkpoint is written), leaving ``marker`` so the resumed run does not kill again."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


class ReferenceProbe(L.Callback):
    """Appends to ``path``, at the first optimizer step of every epoch (before the weights move),
    the epoch and whether the reference's weights equal the policy's."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.epochs_seen: set[int] = set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.current_epoch in self.epochs_seen:
            return
        self.epochs_seen.add(trainer.current_epoch)
        policy, reference = pl_module.policy.state_dict(), pl_module.reference.model.state_dict()
        same = all(torch.equal(policy[name], reference[name]) for name in policy)
        with self.path.open("a") as file:
            file.write(json.dumps({"epoch": trainer.current_epoch, "reference_is_policy": same}) + "\n")
