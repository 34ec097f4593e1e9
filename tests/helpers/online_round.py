"""Scripted rounds on the embedded task for the online tests: known completions, the rule verifier."""

from __future__ import annotations

from stepwise_lit.models.generate import GenerationSettings

GOATS = ("A farm has 26 goats. The herd grows 2 times. The farmer buys 28. 4 wander off. The farmer sells 9. "
         "How many goats are on the farm?")
GOATS_REFERENCE = ("Step 1: 26 * 2 = 52\nStep 2: 52 + 28 = 80\nStep 3: 80 - 4 = 76\n"
                   "Step 4: 76 - 9 = 67. The answer is 67.\n")
GOATS_LAST_SLIP = GOATS_REFERENCE.replace("76 - 9 = 67. The answer is 67", "76 - 9 = 66. The answer is 66")
GOATS_EARLY_SLIP = ("Step 1: 26 * 2 = 52\nStep 2: 52 + 28 = 88\nStep 3: 88 - 4 = 84\n"
                    "Step 4: 84 - 9 = 75. The answer is 75.\n")
HENS = "A farm has 5 hens. The farmer buys 3. How many hens are on the farm?"
HENS_REFERENCE = "Step 1: 5 + 3 = 8. The answer is 8.\n"

PROMPTS = [GOATS, HENS]
REFERENCES = [GOATS_REFERENCE, HENS_REFERENCE]
COMPLETIONS = [
    # goats: early slip (wrong), right, slip in the last step (wrong), blank
    [GOATS_EARLY_SLIP, GOATS_REFERENCE, GOATS_LAST_SLIP, "  "],
    # hens: right every time, so no incorrect solution
    [HENS_REFERENCE, HENS_REFERENCE, HENS_REFERENCE, HENS_REFERENCE],
]


class ScriptedGenerator:
    """A ``Generator`` that returns fixed completions per prompt and counts its calls."""

    def __init__(self, completions: dict[str, list[str]]) -> None:
        self.completions = completions
        self.calls = 0

    def generate(self, prompts, settings: GenerationSettings) -> list[list[str]]:
        self.calls += 1
        return [self.completions[prompt][: settings.num_samples] for prompt in prompts]


def scripted_generator() -> ScriptedGenerator:
    return ScriptedGenerator(dict(zip(PROMPTS, COMPLETIONS)))
