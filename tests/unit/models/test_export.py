"""`stepwise_lit.models.export`: the Hugging Face export callback replaces an earlier export of ours and
nothing else, refuses a folder before training starts, and writes files the umask allows."""

from __future__ import annotations

import os
import stat

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.errors import SettingError
from stepwise_lit.models.export import MARKER, HuggingFaceExport, export_policy
from stepwise_lit.models.loading import TinyModelConfig
from stepwise_lit.module import StepwiseDPOModule

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


class StepCounter(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args) -> None:
        self.steps += 1


def fit(tmp_path, export: HuggingFaceExport, seed: int = 0, **trainer_settings) -> StepCounter:
    """One training step of the tiny module with `export` among the callbacks."""
    torch.manual_seed(seed)
    datamodule = StepwiseDataModule(path="synthetic", synthetic_train_size=2, synthetic_val_size=0, batch_size=2,
                                    max_length=256, cache_dir=str(tmp_path / "cache"))
    counter = StepCounter()
    settings = {"default_root_dir": str(tmp_path / "run"), "enable_checkpointing": False, **trainer_settings}
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[export, counter, *settings.pop("callbacks", [])],
                        **settings)
    trainer.fit(StepwiseDPOModule(tiny_model=TINY), datamodule)
    return counter


def test_export_at_fit_end_loads_back_and_replaces_an_earlier_export(tmp_path):
    fit(tmp_path, HuggingFaceExport())
    export = tmp_path / "run" / "export"
    assert (export / MARKER).is_file()
    first = (export / "model.safetensors").read_bytes()
    AutoModelForCausalLM.from_pretrained(export)
    fit(tmp_path, HuggingFaceExport(), seed=1)  # another model into the same folder: ours, so replaced
    assert (export / MARKER).is_file() and (export / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["export"]  # no staging or retired folder left


def test_disabled_export_writes_nothing(tmp_path):
    fit(tmp_path, HuggingFaceExport(enabled=False))
    assert not (tmp_path / "run" / "export").exists()


def test_a_folder_holding_other_files_is_refused_before_training(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(SettingError, match=r"^export\.dirpath: .*not an export of stepwise_lit"):
        fit(tmp_path, HuggingFaceExport(dirpath=str(target)))
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("where", ["root", "above_root", "checkpoints"])
def test_the_run_root_or_a_checkpoint_folder_is_refused_before_training(tmp_path, where):
    """`export.dirpath` equal to `default_root_dir`, a folder above it, or the checkpoint folder
    stops the run at fit start: no training step is taken (a step would waste the run)."""
    root = tmp_path / "run"
    target = {"root": root, "above_root": tmp_path, "checkpoints": tmp_path / "ckpts"}[where]
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpts"))
    counter = StepCounter()
    with pytest.raises(SettingError, match=r"^export\.dirpath: "):
        counter = fit(tmp_path, HuggingFaceExport(dirpath=str(target)), enable_checkpointing=True,
                      callbacks=[checkpoint])
    assert counter.steps == 0


def test_export_files_and_folders_follow_the_umask(tmp_path):
    """With umask 022 the export folder is 0755 and its files 0644 (a temporary folder is 0700)."""
    torch.manual_seed(0)
    module = StepwiseDPOModule(tiny_model=TINY)
    module.configure_model()
    previous = os.umask(0o022)
    try:
        export = export_policy(module, tmp_path / "export")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(export.stat().st_mode) == 0o755
    files = [p for p in export.rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}
