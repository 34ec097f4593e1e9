"""Hub-style sources: ``data.name``, ``data.revision``, ``data.data_files`` (and the ``val_`` ones)
reach ``datasets.load_dataset`` and the tokenized-data cache key; a local folder with two
configurations stands in for a hub dataset (offline)."""

from __future__ import annotations

import pytest

from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.errors import SettingError
from tests.helpers.hub_folder import write_hub_folder


@pytest.fixture
def hub_folder(tmp_path):
    folder = tmp_path / "owner_name"
    return str(folder), write_hub_folder(folder)


def prompts(rows) -> list:
    return [row["prompt"] for row in rows]


def datamodule(tmp_path, path: str, **settings) -> StepwiseDataModule:
    return StepwiseDataModule(path=path, format="stepwise", val_fraction=0.0, cache_dir=str(tmp_path / "cache"), **settings)


def test_name_picks_the_configuration_and_data_files_the_files(tmp_path, hub_folder):
    folder, files = hub_folder
    assert prompts(datamodule(tmp_path, folder).canonical_splits()[0]) == prompts(files["easy/train"])  # the default
    assert prompts(datamodule(tmp_path, folder, name="hard").canonical_splits()[0]) == prompts(files["hard/train"])
    chosen_files = datamodule(tmp_path, folder, data_files="hard/test.jsonl").canonical_splits()[0]
    assert prompts(chosen_files) == prompts(files["hard/test"])


def test_the_validation_source_has_its_own_name_and_split(tmp_path, hub_folder):
    folder, files = hub_folder
    train, val = datamodule(tmp_path, folder, val_path=folder, val_name="hard", val_split="test").canonical_splits()
    assert (prompts(train), prompts(val)) == (prompts(files["easy/train"]), prompts(files["hard/test"]))


@pytest.mark.parametrize("change", [{"name": "hard"}, {"revision": "v2"}, {"data_files": "easy/*.jsonl"},
                                    {"val_path": "owner/other", "val_revision": "abc123"}])
def test_name_revision_and_data_files_are_part_of_the_cache_key(tmp_path, hub_folder, change):
    folder, _ = hub_folder
    base = {"val_path": "owner/other"} if "val_path" in change else {}
    assert datamodule(tmp_path, folder, **base).cache_path == datamodule(tmp_path, folder, **base).cache_path
    assert datamodule(tmp_path, folder, **change).cache_path != datamodule(tmp_path, folder, **base).cache_path


def test_an_unknown_configuration_names_the_setting(tmp_path, hub_folder):
    folder, _ = hub_folder
    with pytest.raises(SettingError, match=f"^data.path: cannot load '{folder}' \\(split 'train', name 'medium'\\)"):
        datamodule(tmp_path, folder, name="medium").canonical_splits()


def test_hub_options_on_a_local_file_are_refused(tmp_path, hub_folder):
    folder, _ = hub_folder
    with pytest.raises(SettingError, match="^data.val_revision: applies to a data folder or hub dataset, and data.val_path"):
        datamodule(tmp_path, folder, val_path=f"{folder}/easy/train.jsonl", val_revision="main")
