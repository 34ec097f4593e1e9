"""One online round in memory (stepwise_lit.online.solutions.generate_round): sample, score, grade, pair."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stepwise_lit.data.tokenizer import load_tokenizer
from stepwise_lit.errors import SettingError
from stepwise_lit.evaluation.rerank import split_solution
from stepwise_lit.models.generate import GenerationSettings, TransformersGenerator
from stepwise_lit.online.pairs import PairSettings
from stepwise_lit.online.solutions import RoundSettings, generate_round
from stepwise_lit.rewards import ArithmeticStepVerifier
from tests.helpers.online_round import (
    GOATS,
    GOATS_LAST_SLIP,
    GOATS_REFERENCE,
    PROMPTS,
    REFERENCES,
    scripted_generator,
)

SAMPLING = GenerationSettings(do_sample=True, num_samples=4, max_new_tokens=8)


def test_scripted_round_pairs_the_right_solution_with_the_late_slip():
    """Goats: samples 0 (slip in step 2) and 2 (slip in step 4, 76 - 9 = 66) are wrong, 1 is right, 3 blank.
    first_error_branch pairs 1 with 2 (3 shared steps, against 1 with sample 0); the verifier scores
    sample 2's steps [1, 1, 1, -1] (only 76 - 9 = 66 is wrong arithmetic). Hens: every sample right,
    so the prompt is skipped for having no incorrect solution."""
    record = generate_round(scripted_generator(), ArithmeticStepVerifier(), PROMPTS, REFERENCES,
                            RoundSettings(generation=SAMPLING, pairs=PairSettings("first_error_branch")),
                            prompt_ids=["goats", "hens"])
    goats = record.prompts[0]
    assert [solution.correct for solution in goats.solutions] == [False, True, False, False]
    assert [solution.answer for solution in goats.solutions] == ["75", "67", "66", None]
    assert goats.solutions[3].steps == [] and goats.solutions[3].step_scores == []
    assert goats.solutions[2].steps == split_solution(GOATS_LAST_SLIP)
    assert goats.solutions[2].step_scores == [1.0, 1.0, 1.0, -1.0]
    (row,) = record.pairs.rows
    assert row["id"] == "goats/1-2" and row["prompt"] == GOATS and row["reference_solution"] == GOATS_REFERENCE
    assert "".join(row["chosen_steps"]) == GOATS_REFERENCE and "".join(row["rejected_steps"]) == GOATS_LAST_SLIP
    assert row["chosen_step_scores"] == [1.0] * 4 and row["rejected_step_scores"] == [1.0, 1.0, 1.0, -1.0]
    assert record.pairs.skipped == {"no_incorrect": 1}
    assert set(record.seconds) == {"generation", "scoring"}


def test_round_without_references_has_unknown_correctness():
    record = generate_round(scripted_generator(), ArithmeticStepVerifier(), PROMPTS, [None, None],
                            RoundSettings(generation=SAMPLING))
    assert all(solution.correct is None for prompt in record.prompts for solution in prompt.solutions)
    assert record.pairs.rows == [] and record.pairs.skipped == {"correctness_unknown": 2}


def test_round_on_a_tiny_random_policy():
    """A random 2-layer Llama through TransformersGenerator: K = 3 completions per prompt, each split into
    steps that join back to it, one verifier score per step; random bytes state no answer, so no sample is
    correct and both prompts are skipped for having no correct solution."""
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    generator = TransformersGenerator(model, tokenizer, progress=False)
    settings = RoundSettings(generation=GenerationSettings(do_sample=True, num_samples=3, max_new_tokens=12))
    record = generate_round(generator, ArithmeticStepVerifier(), PROMPTS, REFERENCES, settings)
    assert [prompt.id for prompt in record.prompts] == ["0", "1"]
    for prompt in record.prompts:
        assert len(prompt.solutions) == 3
        for solution in prompt.solutions:
            assert "".join(solution.steps) == (solution.completion if solution.completion.strip() else "")
            assert len(solution.step_scores) == len(solution.steps)
            assert solution.correct is False
    assert record.pairs.rows == [] and record.pairs.skipped == {"no_correct": 2}


def test_round_settings_must_sample_several_solutions():
    with pytest.raises(SettingError, match=r"^online\.generation\.num_samples: "):
        RoundSettings(generation=GenerationSettings(do_sample=False))



class CountingVerifier(ArithmeticStepVerifier):
    """The rule verifier, counting the solutions of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.call_sizes: list[int] = []

    def score_steps(self, prompts, steps, reference_solutions=None):
        self.call_sizes.append(len(steps))
        return super().score_steps(prompts, steps, reference_solutions)


def test_scoring_in_chunks_gives_what_one_call_gives():
    """20 goats and 20 hens, 4 samples each: the goats' blank sample is never scored, so 20 x 3 +
    20 x 4 = 140 solutions, scored in calls of 64, 64 and 12; every solution's scores equal one call's."""
    counting = CountingVerifier()
    record = generate_round(scripted_generator(), counting, PROMPTS * 20, REFERENCES * 20,
                            RoundSettings(generation=SAMPLING), progress=True)
    assert counting.call_sizes == [64, 64, 12]
    assert all(0 <= seconds < 60 for seconds in record.seconds.values())  # durations, not clock readings
    scored = [(prompt, s) for prompt in record.prompts for s in prompt.solutions if s.steps]
    expected = ArithmeticStepVerifier().score_steps(
        [prompt.prompt for prompt, _ in scored], [s.steps for _, s in scored],
        [prompt.reference_solution for prompt, _ in scored],
    )
    assert [s.step_scores for _, s in scored] == expected
