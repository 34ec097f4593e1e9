"""Best-of-N reranking: which candidate each rule picks on hand lists (ties to the lowest index),
the report's accuracies, step splitting of generated solutions, and `rerank` with the implicit PRM."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from stepwise_lit.data.synthetic import generate_pairs
from stepwise_lit.evaluation.rerank import (
    choose,
    pick_by_majority,
    rerank,
    rerank_report,
    split_solution,
)
from stepwise_lit.grading.answers import extract_answer
from stepwise_lit.rewards import ImplicitStepScorer
from tests.helpers.implicit_prm import logp_of, prompt_ids, save_tiny

# Prompt 1, three candidates:
#   min of steps: -1.0, 0.1, -0.2 -> 1;  sum: -0.5, 0.3, 0.8 -> 2;
#   log-probs -3, -5, -3: a tie between 0 and 2 -> 0;  answers 7, 8, 8.0: "8" and "8.0" vote together -> 1.
# Prompt 2, two candidates equal under every rule, no answer stated -> 0 everywhere.
STEP_REWARDS = [[[0.5, -1.0], [0.2, 0.1], [0.9, -0.2, 0.1]], [[0.1], [0.1]]]
LOG_PROBS = [[-3.0, -5.0, -3.0], [-1.0, -1.0]]
ANSWERS = [["7", "8", "8.0"], [None, None]]


def test_each_rule_picks_the_hand_computed_candidate():
    assert choose(STEP_REWARDS, LOG_PROBS, ANSWERS, "embedded") == {
        "implicit_min": [1, 0], "implicit_sum": [2, 0], "log_prob": [0, 0], "majority": [1, 0],
    }


def test_a_tied_vote_goes_to_the_answer_seen_first():
    """4, 5, 5, 4: two votes each; 4 occurs first, so the first candidate saying 4 (index 0)."""
    assert pick_by_majority(["4", "5", "5", "4"], "embedded") == 0
    assert pick_by_majority([None, "5", "4", "5"], "embedded") == 1


def test_report_grades_each_rule_next_to_the_first_sample_and_the_oracle():
    """References 8 and 3. Prompt 1: candidates 1 and 2 are right, 0 is wrong; prompt 2: none is.
    implicit_min (1), implicit_sum (2), majority (1) get prompt 1: 1/2; log_prob (0) and first: 0;
    oracle: 1/2."""
    chosen = choose(STEP_REWARDS, LOG_PROBS, ANSWERS, "embedded")
    assert rerank_report(chosen, ANSWERS, ["8", "3"], "embedded") == {
        "implicit_min": 0.5, "implicit_sum": 0.5, "log_prob": 0.0, "majority": 0.5, "first": 0.0, "oracle": 0.5,
    }


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("Step 1: 2 + 3 = 5\nStep 2: 5 * 2 = 10. The answer is 10.\n",
         ["Step 1: 2 + 3 = 5\n", "Step 2: 5 * 2 = 10. The answer is 10.\n"]),
        ("\nStep 1: a\n\nStep 2: b", ["\nStep 1: a\n\n", "Step 2: b"]),  # blank lines join a step
        ("no newline at all", ["no newline at all"]),
        ("", [""]),  # an empty solution: one empty step (its EOS)
    ],
)
def test_split_solution_cuts_after_each_line_and_keeps_the_text(text, steps):
    assert split_solution(text) == steps and "".join(steps) == text


def test_split_solution_gives_back_the_embedded_tasks_steps():
    row = generate_pairs(1, seed=5)[0]
    assert split_solution("".join(row["chosen_steps"])) == row["chosen_steps"]


def test_rerank_with_the_implicit_prm_matches_its_step_rewards_and_the_policy_log_prob(tmp_path):
    """Two prompts, three solutions each, from the embedded task: the implicit picks are those of the
    scorer's own h_t; the log-prob pick is that of log π(solution + EOS | prompt) from one unpadded
    forward per solution."""
    policy_folder, reference_folder = save_tiny(tmp_path / "policy", 0), save_tiny(tmp_path / "reference", 1)
    scorer = ImplicitStepScorer(policy_folder, reference_folder, step_beta=0.5, batch_size=4, progress=False)
    rows = generate_pairs(2, seed=9, max_value=10)
    prompts = [row["prompt"] for row in rows]
    solutions = [["".join(row["chosen_steps"]), "".join(row["rejected_steps"]), row["chosen_steps"][0]] for row in rows]
    chosen, answers = rerank(scorer, prompts, solutions, "embedded")
    rewards = [scorer.raw_step_rewards([prompt] * 3, [split_solution(text) for text in texts])
               for prompt, texts in zip(prompts, solutions)]
    policy = AutoModelForCausalLM.from_pretrained(policy_folder)
    tokenizer = scorer.tokenizer
    with torch.no_grad():
        log_probs = [
            [logp_of(policy, prompt_ids(tokenizer, prompt),
                     tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
             for text in texts]
            for prompt, texts in zip(prompts, solutions)
        ]
    for prompt, texts, expected in zip(prompts, solutions, log_probs):
        totals = scorer.step_log_probs([prompt] * 3, [split_solution(text) for text in texts]).policy.sum(-1)
        torch.testing.assert_close(totals, torch.tensor(expected), atol=1e-4, rtol=1e-4)
    assert chosen == choose(rewards, log_probs, answers, "embedded")
    assert answers == [[extract_answer(text, "embedded") for text in texts] for texts in solutions]
