"""`ImplicitStepScorer`: h_t = β (log π − log π_ref) of each step against a slow path (one forward
per step prefix), its per-token form, the squashing into [-1, 1], β and the reference from an
export, and the adapter of a LoRA export disabled as the reference."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.data.synthetic import generate_pairs
from stepwise_lit.data.tokenize import TokenizeSettings, tokenize_response, tokenize_row
from stepwise_lit.data.tokenizer import load_tokenizer
from stepwise_lit.models.export import MARKER, export_policy
from stepwise_lit.models.loading import LoraSettings, build_tiny_model
from stepwise_lit.module import StepwiseDPOModule
from stepwise_lit.rewards import ImplicitStepScorer
from tests.helpers.implicit_prm import SHAPE, logp_of, prompt_ids, save_tiny

ROWS = generate_pairs(3, seed=7, max_value=10)
PROMPTS = [ROWS[0]["prompt"], [{"role": "user", "content": ROWS[1]["prompt"]}], ROWS[2]["prompt"]]
STEPS = [ROWS[0]["chosen_steps"], ROWS[1]["rejected_steps"], ROWS[2]["chosen_steps"][:1]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("implicit")
    return {"policy": save_tiny(root / "policy", 0), "reference": save_tiny(root / "reference", 1)}


@torch.no_grad()
def slow_step_rewards(policy, reference, tokenizer, prompt, steps, beta, max_prompt_length=None) -> list[float]:
    """One forward per step prefix and model: β (log π(step t | prefix) − log π_ref(step t | prefix)),
    the step's tokens tokenized alone (exact for the byte tokenizer), EOS with the last step; the
    prompt's last `max_prompt_length` tokens."""
    prefix, rewards = prompt_ids(tokenizer, prompt)[-(max_prompt_length or 0):], []
    for index, step in enumerate(steps):
        tokens = tokenizer(step, add_special_tokens=False)["input_ids"]
        tokens += [tokenizer.eos_token_id] if index == len(steps) - 1 else []
        rewards.append(beta * (logp_of(policy, prefix, tokens) - logp_of(reference, prefix, tokens)))
        prefix = prefix + tokens
    return rewards


def test_policy_equal_to_reference_gives_zero_rewards_and_scores(folders):
    scorer = ImplicitStepScorer(folders["policy"], folders["policy"], step_beta=0.1, progress=False)
    assert scorer.score_steps(PROMPTS, STEPS) == [[0.0] * len(steps) for steps in STEPS]
    assert scorer.raw_step_rewards(PROMPTS, STEPS) == [[0.0] * len(steps) for steps in STEPS]


def test_step_rewards_equal_one_forward_per_step_prefix(folders):
    """Three responses (a chat prompt among them, a one-step response) in batches of two, longest
    first: each h_t equals the slow path's, in the order given."""
    scorer = ImplicitStepScorer(folders["policy"], folders["reference"], step_beta=0.5, batch_size=2, progress=False)
    policy = AutoModelForCausalLM.from_pretrained(folders["policy"])
    reference = AutoModelForCausalLM.from_pretrained(folders["reference"])
    rewards = scorer.raw_step_rewards(PROMPTS, STEPS)
    for got, prompt, steps in zip(rewards, PROMPTS, STEPS):
        expected = slow_step_rewards(policy, reference, scorer.tokenizer, prompt, steps, 0.5)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=1e-4)
    assert all(reward != 0.0 for row in rewards for reward in row)


def test_per_token_rewards_are_h_over_the_steps_token_counts(folders):
    """Byte tokenizer: step t has len(step.encode()) tokens, the last one EOS more; h_t / n_t."""
    whole = ImplicitStepScorer(folders["policy"], folders["reference"], step_beta=0.5, progress=False)
    per_token = ImplicitStepScorer(folders["policy"], folders["reference"], step_beta=0.5, per_token=True,
                                   progress=False)
    for h, h_per_token, steps in zip(whole.raw_step_rewards(PROMPTS, STEPS), per_token.raw_step_rewards(PROMPTS, STEPS),
                                     STEPS):
        counts = [len(step.encode()) + (index == len(steps) - 1) for index, step in enumerate(steps)]
        torch.testing.assert_close(torch.tensor(h_per_token), torch.tensor(h) / torch.tensor(counts, dtype=torch.float))


def test_scores_are_tanh_of_h_over_scale_within_minus_one_one(folders):
    """With scale 0.01 most |h_t| / scale are large: the scores saturate near ±1 but stay inside."""
    scorer = ImplicitStepScorer(folders["policy"], folders["reference"], step_beta=0.5, scale=0.01, progress=False)
    scores, rewards = scorer.score_steps(PROMPTS, STEPS), scorer.raw_step_rewards(PROMPTS, STEPS)
    for row_scores, row_rewards in zip(scores, rewards):
        assert all(-1.0 <= score <= 1.0 for score in row_scores)
        torch.testing.assert_close(torch.tensor(row_scores), torch.tanh(torch.tensor(row_rewards) / 0.01))
    assert max(abs(score) for row in scores for score in row) > 0.9


def fit_and_export(tmp_path, model_name_or_path, **module_settings):
    """Two training steps of the module from `model_name_or_path`, exported to tmp_path/export."""
    torch.manual_seed(0)
    datamodule = StepwiseDataModule(path="synthetic", synthetic_train_size=4, synthetic_val_size=0, batch_size=2,
                                    synthetic_max_value=10, max_length=256, cache_dir=str(tmp_path / "cache"))
    module = StepwiseDPOModule(model_name_or_path=model_name_or_path, tiny_model=SHAPE,
                               optimizer=lambda params: torch.optim.AdamW(params, lr=0.05), **module_settings)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path / "run"))
    trainer.fit(module, datamodule)
    return str(export_policy(module, tmp_path / "export", trainer)), datamodule.hparams["max_prompt_length"]


def test_beta_reference_and_prompt_cut_come_from_the_export(tmp_path, folders):
    export, max_prompt_length = fit_and_export(tmp_path, folders["reference"], step_beta=0.3)
    scorer = ImplicitStepScorer(export, progress=False)
    assert scorer.beta == 0.3 and scorer.max_prompt_length == max_prompt_length
    explicit = ImplicitStepScorer(export, folders["reference"], step_beta=0.3, progress=False)
    assert scorer.raw_step_rewards(PROMPTS, STEPS) == explicit.raw_step_rewards(PROMPTS, STEPS)
    assert any(reward != 0.0 for row in scorer.raw_step_rewards(PROMPTS, STEPS) for reward in row)


def test_an_adapter_only_lora_export_uses_its_base_with_the_adapter_disabled(tmp_path, folders):
    lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"], merge_on_export=False)
    export, max_prompt_length = fit_and_export(tmp_path, folders["reference"], lora=lora, step_beta=0.5)
    scorer = ImplicitStepScorer(export, progress=False)
    assert scorer.reference is None and scorer.max_prompt_length == max_prompt_length
    base = AutoModelForCausalLM.from_pretrained(folders["reference"])
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folders["reference"]), f"{export}/adapter")
    rewards = scorer.raw_step_rewards(PROMPTS, STEPS)
    for got, prompt, steps in zip(rewards, PROMPTS, STEPS):
        expected = slow_step_rewards(policy, base, scorer.tokenizer, prompt, steps, 0.5, scorer.max_prompt_length)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=1e-4)
    assert any(abs(reward) > 1e-3 for row in rewards for reward in row)  # the adapter moved the policy


def test_an_export_of_the_embedded_model_needs_a_reference(tmp_path):
    """The embedded tiny model's initial weights are not saved: the error names the setting."""
    export = tmp_path / "export"
    export.mkdir()
    save_tiny(export, 0)
    (export / MARKER).write_text(json.dumps({"step_beta": 0.1, "model_name_or_path": None}))
    with pytest.raises(ValueError, match=r"^ref_model_name_or_path: .*embedded tiny model"):
        ImplicitStepScorer(str(export))


def test_another_source_needs_step_beta(folders):
    with pytest.raises(ValueError, match=r"^step_beta: .*not an export of stepwise_lit"):
        ImplicitStepScorer(folders["policy"], folders["reference"])


def test_a_reference_with_another_vocabulary_is_refused(tmp_path, folders):
    tokenizer = load_tokenizer(None)
    tokenizer.add_tokens(["<extra>"])
    build_tiny_model(tokenizer, SHAPE).save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"^ref_model_name_or_path: .*260-token vocabulary, the policy 259"):
        ImplicitStepScorer(folders["policy"], str(tmp_path / "other"), step_beta=0.1)


@pytest.mark.parametrize("max_prompt_length", [None, 32])
def test_a_single_response_is_laid_out_as_a_training_side(max_prompt_length):
    """`tokenize_response` gives the ids and step ids `tokenize_row` gives each side of a pair that
    fits whole, with the same prompt cut."""
    tokenizer = load_tokenizer(None)
    row = {**ROWS[0], "prompt": [{"role": "user", "content": ROWS[0]["prompt"]}]}
    token_row = tokenize_row(row, tokenizer, TokenizeSettings(max_prompt_length=max_prompt_length))
    for side in ("chosen", "rejected"):
        input_ids, step_ids, cut = tokenize_response(row["prompt"], row[f"{side}_steps"], tokenizer, max_prompt_length)
        assert (input_ids, step_ids, cut) == (
            token_row[f"{side}_input_ids"], token_row[f"{side}_step_ids"], token_row["prompt_cut"])
