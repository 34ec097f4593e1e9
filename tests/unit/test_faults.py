"""Faults in one process: a NaN loss (stop with a clear message, or skip the step and count it),
SIGTERM and SIGINT (checkpoint, then stop; a second SIGINT stops at once), and an export that
fails mid-write. The multi-process versions (NaN on one rank, SIGTERM under DDP, SIGKILL, SIGINT
to a `train.py` process, then resume) are in tests/e2e/test_distributed.py; RNG state through a
weights-only checkpoint."""

from __future__ import annotations

import io
import os
import random
import signal

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.faults import SignalStop, rng_state, set_rng_state
from stepwise_lit.models.export import export_policy
from stepwise_lit.models.loading import TinyModelConfig
from stepwise_lit.module import StepwiseDPOModule

TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


class Recorder(L.Callback):
    """Policy weights and optimizer step counts after each step; a NaN step score on `nan_step`
    (1-based), which makes that step's loss NaN; `signals` to this process before `signal_step`."""

    def __init__(self, nan_step: int | None = None, signal_step: int | None = None,
                 signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.nan_step, self.signal_step, self.signals = nan_step, signal_step, signals
        self.weights: list[dict[str, torch.Tensor]] = []
        self.optimizer_steps: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.weights.append({k: v.clone() for k, v in pl_module.policy.state_dict().items()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.nan_step:
            batch["step_scores"][0, 0] = float("nan")
        if trainer.global_step + 1 == self.signal_step:
            for signum in self.signals:
                os.kill(os.getpid(), signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append({k: v.clone() for k, v in pl_module.policy.state_dict().items()})
        state = trainer.optimizers[0].state.values()
        self.optimizer_steps.append(max((int(s["step"]) for s in state), default=0))


def train(tmp_path, max_steps: int, recorder: Recorder, **settings) -> tuple[L.Trainer, StepwiseDPOModule]:
    torch.manual_seed(0)
    module = StepwiseDPOModule(tiny_model=TINY, **settings)
    data = StepwiseDataModule(path="synthetic", synthetic_train_size=16, synthetic_val_size=0, batch_size=4,
                              max_length=1024, cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[recorder, ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=100)],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    return trainer, module


def test_nan_loss_stops_with_a_message_naming_the_setting(tmp_path):
    recorder = Recorder(nan_step=2)
    with pytest.raises(FloatingPointError, match=r"global step 1, batch 1 .*nonfinite_loss: skip"):
        train(tmp_path, max_steps=3, recorder=recorder)
    assert len(recorder.weights) == 2  # the start and step 1: step 2 never finished


def test_nan_loss_is_skipped_and_counted(tmp_path):
    """Step 2's loss is NaN: no weight and no optimizer state changes at that step, the count is
    1 and logged, and steps 1 and 3 train as usual."""
    recorder = Recorder(nan_step=2)
    trainer, module = train(tmp_path, max_steps=4, recorder=recorder, nonfinite_loss="skip")
    start, step1, step2, step3, _ = recorder.weights

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert not same(start, step1) and same(step1, step2) and not same(step2, step3)
    assert recorder.optimizer_steps == [1, 1, 2, 3]
    assert module.nonfinite_steps == 1
    assert trainer.callback_metrics["train/nonfinite_steps"] == 1.0
    assert all(torch.isfinite(v).all() for v in recorder.weights[-1].values())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_last_checkpoint_then_stops(tmp_path, signum):
    """The signal before step 3: step 3 finishes, `last.ckpt` holds it (the periodic checkpoint
    is every 100 steps, so this is the signal's one), fit ends with `SignalStop` naming the
    signal with exit code 128 + signum, and the previous handlers are back."""
    recorder = Recorder(signal_step=3, signals=(signum,))
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(SignalStop) as stop:
        train(tmp_path, max_steps=10, recorder=recorder)
    assert stop.value.signum == signum and stop.value.code == 128 + signum
    assert {s: signal.getsignal(s) for s in previous} == previous
    assert len(recorder.weights) == 4
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    saved = {k.removeprefix("policy."): v for k, v in checkpoint["state_dict"].items()}
    assert all(torch.equal(saved[k], v) for k, v in recorder.weights[3].items())


def test_second_sigint_stops_at_once_without_a_checkpoint(tmp_path):
    """Ctrl-C twice before step 3: the second raises KeyboardInterrupt inside step 3, which
    Lightning answers with its graceful shutdown (exit code 1); step 3 never ends, nothing is
    saved, and Python's SIGINT handler is back."""
    recorder = Recorder(signal_step=3, signals=(signal.SIGINT, signal.SIGINT))
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stop:
        train(tmp_path, max_steps=10, recorder=recorder)
    assert type(stop.value) is SystemExit and stop.value.code == 1
    assert signal.getsignal(signal.SIGINT) == previous
    assert len(recorder.weights) == 3
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


@pytest.fixture
def module() -> StepwiseDPOModule:
    torch.manual_seed(0)
    module = StepwiseDPOModule(tiny_model=TINY)
    module.configure_model()
    return module


def fail_after_weights(module: StepwiseDPOModule, monkeypatch) -> None:
    """The export writes the weights, then fails before the tokenizer and config files."""

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module.tokenizer, "save_pretrained", fail)


def test_export_failing_mid_write_leaves_no_folder(module, tmp_path, monkeypatch):
    fail_after_weights(module, monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        export_policy(module, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_export_failing_mid_write_keeps_the_previous_export(module, tmp_path, monkeypatch):
    previous = export_policy(module, tmp_path / "export")
    files = {p.name: p.read_bytes() for p in previous.iterdir() if p.is_file()}
    with torch.no_grad():
        next(module.policy.parameters()).add_(1.0)
    fail_after_weights(module, monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        export_policy(module, tmp_path / "export")
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert {p.name: p.read_bytes() for p in previous.iterdir() if p.is_file()} == files


def test_rng_state_round_trips_through_a_weights_only_checkpoint():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    buffer = io.BytesIO()
    torch.save({"rng_states": [rng_state()]}, buffer)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True)["rng_states"][0])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]
