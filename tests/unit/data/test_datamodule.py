"""StepwiseDataModule in one process: sources, splits, caching, shuffling, errors."""

import json
import logging
import math
from pathlib import Path

import pytest

from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.data.formats import DataFormatError
from stepwise_lit.data.synthetic import generate_pairs
from stepwise_lit.errors import SettingError
from tests.helpers.paths import SHARED_DATA

GSM8K = SHARED_DATA / "gsm8k"
needs_gsm8k = pytest.mark.skipif(not GSM8K.is_dir(), reason=f"GSM8K data not found at {GSM8K}")
BATCH_KEYS = {
    "input_ids", "attention_mask", "step_scores", "step_mask", "has_step_scores",
    "outcome_scores", "has_outcome_scores", "first_divergence", "prompts", "reference_solutions", "steps",
    "row_index",
}
PACKED_KEYS = {"position_ids", "segment_ids", "slot_ids", "target_ids", "target_step_ids", "response_targets"}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def prompts(dataset) -> list:
    return [json.loads(prompt) for prompt in dataset["prompt_json"]]


def test_synthetic_default(tmp_path):
    datamodule = StepwiseDataModule(synthetic_train_size=12, synthetic_val_size=4, batch_size=3, cache_dir=str(tmp_path))
    assert datamodule.tokenizer.pad_token_id == 0
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert (len(datamodule.train_dataset), len(datamodule.val_dataset)) == (12, 4)
    assert not set(prompts(datamodule.train_dataset)) & set(prompts(datamodule.val_dataset))
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == BATCH_KEYS | PACKED_KEYS  # pack_pairs is on by default: one row per pair
    assert batch["input_ids"].shape[0] == 3 and batch["first_divergence"].shape == (3,)
    assert batch["target_ids"].shape == (*batch["input_ids"].shape, 2)
    assert batch["has_step_scores"].all()
    assert len(list(datamodule.val_dataloader())) == 2  # 4 rows, eval batch size 3


def test_local_file_with_val_fraction_and_seeded_shuffling(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", generate_pairs(20, seed=2))
    options = dict(path=path, format="stepwise", val_fraction=0.25, batch_size=4, cache_dir=str(tmp_path / "cache"))
    datamodule = StepwiseDataModule(**options)
    datamodule.setup("fit")
    train, val = prompts(datamodule.train_dataset), prompts(datamodule.val_dataset)
    assert (len(train), len(val)) == (15, 5) and not set(train) & set(val)

    def epoch_order(module):
        return [prompt for batch in module.train_dataloader() for prompt in batch["prompts"]]

    again = StepwiseDataModule(**options)
    again.setup("fit")
    assert epoch_order(datamodule) == epoch_order(again)
    assert sorted(epoch_order(datamodule)) == sorted(train)
    other_seed = StepwiseDataModule(**{**options, "seed": 1})
    other_seed.setup("fit")
    assert epoch_order(other_seed) != epoch_order(datamodule)


def test_val_path_and_no_validation(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", generate_pairs(6, seed=1))
    val_path = write_jsonl(tmp_path / "val.jsonl", generate_pairs(3, seed=9))
    datamodule = StepwiseDataModule(path=train_path, val_path=val_path, format="stepwise", cache_dir=str(tmp_path))
    datamodule.setup("fit")
    assert (len(datamodule.train_dataset), len(datamodule.val_dataset)) == (6, 3)
    no_val = StepwiseDataModule(path=train_path, format="stepwise", val_fraction=0.0, cache_dir=str(tmp_path))
    no_val.setup("fit")
    assert no_val.val_dataset is None and no_val.val_dataloader() == []


def test_data_folder_read_through_datasets(tmp_path):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", generate_pairs(5, seed=3))
    datamodule = StepwiseDataModule(path=str(folder), format="stepwise", val_fraction=0.0, cache_dir=str(tmp_path))
    datamodule.setup("fit")
    assert len(datamodule.train_dataset) == 5


def test_prepared_data_is_reused_and_options_change_the_cache(tmp_path, caplog):
    path = write_jsonl(tmp_path / "pairs.jsonl", generate_pairs(8, seed=2))
    options = dict(path=path, format="stepwise", val_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    first = StepwiseDataModule(**options)
    first.prepare_data()
    with caplog.at_level(logging.INFO, logger="stepwise_lit"):
        StepwiseDataModule(**options).prepare_data()
    assert f"using tokenized data cached at {first.cache_path}" in caplog.text
    assert StepwiseDataModule(**options, max_length=300).cache_path != first.cache_path
    Path(path).write_text(Path(path).read_text().replace("Step 1", "Step one"))
    assert StepwiseDataModule(**options).cache_path != first.cache_path  # contents changed


@needs_gsm8k
def test_missing_scores_fail_at_preparation_unless_a_scorer_fills_them(tmp_path):
    path = str(GSM8K / "example_model_solutions.jsonl")
    strict = StepwiseDataModule(path=path, format="gsm8k", cache_dir=str(tmp_path))
    with pytest.raises(DataFormatError, match=r"python -m stepwise_lit\.score"):
        strict.prepare_data()
    lenient = StepwiseDataModule(path=path, format="gsm8k", require_scores=False, val_fraction=0.0,
                                 max_length=None, cache_dir=str(tmp_path))
    lenient.setup("fit")
    assert len(lenient.train_dataset) == 1163
    batch = next(iter(lenient.train_dataloader()))
    assert batch["has_step_scores"][:8].all() and not batch["has_step_scores"][8:].any()


@needs_gsm8k
def test_group_by_length_cuts_padding_on_gsm8k(tmp_path):
    options = dict(path=str(GSM8K / "example_model_solutions.jsonl"), format="gsm8k", require_scores=False,
                   val_fraction=0.0, max_length=None, batch_size=8, cache_dir=str(tmp_path))

    def padding_fraction(module):
        module.setup("fit")
        masks = [batch["attention_mask"] for batch in module.train_dataloader()]
        return 1 - sum(int(mask.sum()) for mask in masks) / sum(mask.numel() for mask in masks)

    plain = padding_fraction(StepwiseDataModule(**options))
    grouped = padding_fraction(StepwiseDataModule(**options, group_by_length=True))
    assert grouped < plain / 2


def test_bad_settings_fail_at_construction(tmp_path):
    with pytest.raises(SettingError, match="^data.format: unknown value 'xml'"):
        StepwiseDataModule(path="data.jsonl", format="xml")
    with pytest.raises(SettingError, match="^data.truncation: unknown value 'cut'"):
        StepwiseDataModule(truncation="cut")
    with pytest.raises(SettingError, match="^data.step_wise_prompt_template: must contain '\\{prompt\\}'"):
        StepwiseDataModule(use_step_wise_prompt=True, step_wise_prompt_template="no placeholder")
    with pytest.raises(SettingError, match="^data.path: no such file or folder: '.*nope.jsonl'"):
        StepwiseDataModule(path=str(tmp_path / "nope.jsonl"), cache_dir=str(tmp_path))


@pytest.mark.skipif(not (GSM8K.parent / "prm800k").is_dir(), reason="PRM800K data not found")
def test_val_fraction_holds_out_whole_problems(tmp_path):
    """PRM800K records give several pairs each (one per step with a +1 and a −1 completion):
    the held-out share is counted in problems, and no problem has pairs on both sides."""
    path = str(GSM8K.parent / "prm800k" / "prm800k_found_records.jsonl")
    everything = StepwiseDataModule(path=path, format="prm800k", val_fraction=0.0, cache_dir=str(tmp_path))
    everything.setup("fit")
    all_prompts = list(map(json.dumps, prompts(everything.train_dataset)))
    assert len(set(all_prompts)) < len(all_prompts), "some problem should give several pairs"
    datamodule = StepwiseDataModule(path=path, format="prm800k", val_fraction=0.3, cache_dir=str(tmp_path))
    datamodule.setup("fit")
    train = list(map(json.dumps, prompts(datamodule.train_dataset)))
    val = list(map(json.dumps, prompts(datamodule.val_dataset)))
    assert sorted(train + val) == sorted(all_prompts) and not set(train) & set(val)
    assert len(set(val)) == math.ceil(0.3 * len(set(all_prompts)))


def test_val_fraction_with_a_single_prompt_is_an_error(tmp_path):
    rows = [{**pair, "prompt": "the same problem"} for pair in generate_pairs(4, seed=2)]
    datamodule = StepwiseDataModule(path=write_jsonl(tmp_path / "one.jsonl", rows), format="stepwise",
                                    val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataFormatError, match="val_fraction 0.25.*1 distinct prompt"):
        datamodule.prepare_data()
