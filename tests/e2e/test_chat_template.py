"""Chat templates from the user's seat: `train.py fit` from YAML with a model folder whose tokenizer
carries a Qwen2.5-style template (tests/helpers/chat.py). One prompt's token ids are compared, in
the training batch, in the generation input (the evaluation callback during fit and
``python -m stepwise_lit.evaluate`` on the export) and in implicit scoring of the export, with the
template rendered by hand; with ``data.apply_chat_template: false`` they are the raw prompt's."""

from __future__ import annotations

import pytest

from stepwise_lit import evaluate
from stepwise_lit.cli import main
from stepwise_lit.data.collate import StepwiseCollator
from stepwise_lit.models.generate import TransformersGenerator
from stepwise_lit.rewards.implicit import ImplicitStepScorer
from tests.helpers.chat import (
    QWEN_STYLE_TEMPLATE,
    RecordingSolvingGenerator,
    byte_ids,
    qwen_style_text,
    save_model_folder,
)
from tests.helpers.entry import merged, run_entry, write_config, write_pairs

SYSTEM = "Answer in steps."


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return save_model_folder(tmp_path_factory.mktemp("qwen_style"), QWEN_STYLE_TEMPLATE)


class Spies:
    """Records the prompt ids of every training batch, generation batch and implicit-scoring batch."""

    def __init__(self, monkeypatch) -> None:
        self.training, self.generated, self.scored = [], [], []
        collate, generate, side_batch = StepwiseCollator.__call__, TransformersGenerator.generate, ImplicitStepScorer.side_batch

        def spy_collate(collator, rows):
            batch = collate(collator, rows)
            for row, prompt in enumerate(batch["prompts"]):  # unpacked: rows 0..B-1 are the chosen sides
                first_step = int((batch["step_ids"][row] != 0).nonzero()[0])
                self.training.append((prompt, batch["input_ids"][row, :first_step].tolist()))
            return batch

        def spy_generate(generator, prompts, settings):
            ids = []
            original = generator.generate_batch
            generator.generate_batch = lambda batch, *rest, **options: ids.extend(batch) or original(batch, *rest, **options)
            completions = generate(generator, prompts, settings)
            self.generated += list(zip(prompts, ids))
            return completions

        def spy_side_batch(scorer, encoded):
            self.scored += [(ids, step_ids) for ids, step_ids, _ in encoded]
            return side_batch(scorer, encoded)

        monkeypatch.setattr(StepwiseCollator, "__call__", spy_collate)
        monkeypatch.setattr(TransformersGenerator, "generate", spy_generate)
        monkeypatch.setattr(ImplicitStepScorer, "side_batch", spy_side_batch)


def fit(tmp_path, chat_model, data: dict, capsys, changes: dict | None = None):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    write_pairs(train, 8)
    write_pairs(val, 2)
    settings = {
        "model": {"tiny_model": None, "model_name_or_path": chat_model},
        "data": {"path": str(train), "val_path": str(val), "format": "stepwise", "pack_pairs": False,
                 "max_length": 512, "max_prompt_length": 256, **data},
        "evaluation": {"enabled": True, "during_fit": True, "max_prompts": 2, "generation": {"max_new_tokens": 2}},
    }
    config = write_config(tmp_path / "fit", merged(settings, changes or {}), tmp_path / "cache")
    outcome = run_entry(main, ["fit", "--config", str(config)], capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    return tmp_path / "fit" / "run" / "export", val


def test_one_prompt_has_the_template_ids_in_training_generation_and_scoring(tmp_path, chat_model, monkeypatch, capsys):
    spies = Spies(monkeypatch)
    export, val = fit(tmp_path, chat_model, {"system_prompt": SYSTEM}, capsys)  # apply_chat_template: default
    prompt, training_ids = spies.training[0]
    expected = byte_ids(qwen_style_text(prompt, SYSTEM))
    assert training_ids == expected and expected != byte_ids(prompt)
    assert all(ids == byte_ids(qwen_style_text(text, SYSTEM)) for text, ids in spies.training)
    during_fit = dict(spies.generated)
    assert len(during_fit) == 2 and all(ids == byte_ids(qwen_style_text(text, SYSTEM)) for text, ids in during_fit.items())

    spies.generated.clear()
    argv = ["--model.model_name_or_path", str(export), "--data.path", str(val), "--data.format", "stepwise",
            "--evaluation.generation.max_new_tokens", "2", "--output", str(tmp_path / "eval")]
    outcome = run_entry(evaluate.main, argv, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    assert dict(spies.generated) == during_fit

    scorer = ImplicitStepScorer(str(export))
    scorer.step_log_probs([prompt], [["Step 1: 2 + 3 = 5.\n", "The answer is 5."]])
    ((scored_ids, step_ids),) = spies.scored
    assert scored_ids[: step_ids.index(1)] == expected


def test_online_rounds_sample_from_the_rendered_prompts(tmp_path, chat_model, capsys):
    """One online round (epoch 1) after an epoch on the file's pairs: the backend the loop builds renders
    each prompt with the template and the system prompt."""
    RecordingSolvingGenerator.calls.clear()
    online = {
        "trainer": {"max_steps": -1, "max_epochs": 2, "reload_dataloaders_every_n_epochs": 1, "val_check_interval": None},
        "online": {"enabled": True, "verifier": {"class_path": "stepwise_lit.rewards.ArithmeticStepVerifier"},
                   "prompts_per_round": 2, "steps_per_round": 1, "generator": "tests.helpers.chat.RecordingSolvingGenerator",
                   "generation": {"do_sample": True, "num_samples": 2, "max_new_tokens": 2}},
    }
    fit(tmp_path, chat_model, {"system_prompt": SYSTEM}, capsys, online)
    calls = RecordingSolvingGenerator.calls
    assert len(calls) == 2 and all(ids == byte_ids(qwen_style_text(text, SYSTEM)) for text, ids in calls)


def test_off_the_prompts_stay_raw_text(tmp_path, chat_model, monkeypatch, capsys):
    spies = Spies(monkeypatch)
    fit(tmp_path, chat_model, {"apply_chat_template": False}, capsys)
    assert spies.training and all(ids == byte_ids(text) for text, ids in spies.training)
    assert spies.generated and all(ids == byte_ids(text) for text, ids in spies.generated)


def test_chat_messages_with_a_tokenizer_without_a_template_exit_2_naming_the_row_and_the_setting(tmp_path, capsys):
    folder = save_model_folder(tmp_path / "plain", chat_template=None)
    train = tmp_path / "train.jsonl"
    write_pairs(train, 4, prompt=[{"role": "user", "content": "What is 2 + 3?"}])
    changes = {"model": {"tiny_model": None, "model_name_or_path": folder},
               "data": {"path": str(train), "format": "stepwise", "val_fraction": 0}}
    outcome = run_entry(main, ["fit", "--config", str(write_config(tmp_path / "fit", changes, tmp_path / "cache"))], capsys)
    assert outcome.code == 2, outcome.err[-3000:]
    assert f"error: train.jsonl line 1: data.tokenizer_name_or_path (train.py: model.tokenizer_name_or_path, else " \
           f"model.model_name_or_path): the tokenizer ('{folder}') has no chat template, and a prompt is chat messages" \
           in outcome.err
    assert "Traceback" not in outcome.err
