"""`stepwise_lit.logprobs.reference`, `reference: precomputed`: the reference pass inside the run, its cache,
and the same losses as a live frozen copy; under DDP and FSDP2 (2 CPU processes) as in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.logprobs.precomputed import PrecomputedReference
from stepwise_lit.models.loading import TinyModelConfig
from stepwise_lit.module import StepwiseDPOModule
from tests.helpers.loss_probe import LossProbe
from tests.helpers.paths import REPO

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
STEPS = 3
TRAIN_PAIRS, VAL_PAIRS, BATCH = 12, 4, 4  # even shares: DDP pads no row
LR = 1e-3


def data_and_module(reference: str, cache: Path) -> tuple[StepwiseDataModule, StepwiseDPOModule]:
    """The synthetic pairs and the tiny module, seeded as every run here is."""
    L.seed_everything(0)
    datamodule = StepwiseDataModule(path="synthetic", synthetic_train_size=TRAIN_PAIRS, synthetic_val_size=VAL_PAIRS,
                                    batch_size=BATCH, max_length=1024, cache_dir=str(cache))
    module = StepwiseDPOModule(tiny_model=TinyModelConfig(**TINY), reference=reference,
                               optimizer=lambda params: torch.optim.AdamW(params, lr=LR))
    return datamodule, module


def train(reference: str, cache: Path, root: Path, max_steps: int = STEPS, ckpt_path: str | None = None):
    """Fit the tiny model on synthetic pairs; returns the loss probe and the precomputed reference (or None)."""
    datamodule, module = data_and_module(reference, cache)
    probe = LossProbe()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=STEPS,
                        default_root_dir=str(root), callbacks=[probe, L.pytorch.callbacks.ModelCheckpoint(
                            dirpath=str(root / "checkpoints"), save_last=True, every_n_train_steps=1)])
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)  # our config dataclasses are registered safe globals
    precomputed = module.reference if isinstance(module.reference, PrecomputedReference) else None
    assert (not module.reference.models()) == (reference == "precomputed")
    return probe, precomputed


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def live(tmp_path_factory, cache) -> LossProbe:
    return train("copy", cache, tmp_path_factory.mktemp("copy"))[0]


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory, cache):
    return train("precomputed", cache, tmp_path_factory.mktemp("precomputed"))


def test_precomputed_gives_the_live_reference_losses(live, precomputed):
    """Step 1 (policy = reference), the later steps (policy moved, reference fixed) and validation:
    the same losses as a frozen copy, and no reference model is held."""
    probe, callback = precomputed
    assert callback.computed == ["train", "val"]
    assert len(probe.losses) == len(live.losses) == STEPS
    torch.testing.assert_close(torch.tensor(probe.losses), torch.tensor(live.losses), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(probe.val_loss), torch.tensor(live.val_loss), rtol=0, atol=1e-5)


def test_second_run_reuses_the_cache(tmp_path, cache, precomputed):
    probe, callback = train("precomputed", cache, tmp_path)
    assert callback.computed == []
    assert probe.losses == precomputed[0].losses


def test_resumed_run_reads_the_cache_it_cannot_recompute(tmp_path, cache, precomputed):
    """The policy has moved at a resume; the reference fingerprint in the checkpoint finds the
    starting point's cache. Without that cache the run stops instead of using the moved policy."""
    train("precomputed", cache, tmp_path / "first", max_steps=1)
    last = str(tmp_path / "first" / "checkpoints" / "last.ckpt")
    probe, callback = train("precomputed", cache, tmp_path / "resumed", ckpt_path=last)
    assert callback.computed == []
    torch.testing.assert_close(torch.tensor(probe.losses), torch.tensor(precomputed[0].losses[1:]), rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="no cached reference log-probs"):
        train("precomputed", tmp_path / "empty-cache", tmp_path / "again", ckpt_path=last)


def test_standalone_validate_and_predict_use_the_cached_reference(tmp_path, cache, live, precomputed):
    """`validate` and `predict` of a checkpoint written by a precomputed run read the cached
    validation table (nothing recomputed): the validation loss equals the live copy's, and the
    predicted implicit rewards equal those of a live frozen copy on the same checkpoint."""
    train("precomputed", cache, tmp_path / "fit")
    last = str(tmp_path / "fit" / "checkpoints" / "last.ckpt")

    def evaluate(reference: str):
        datamodule, module = data_and_module(reference, cache)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=str(tmp_path / reference))
        (metrics,) = trainer.validate(module, datamodule=datamodule, ckpt_path=last, weights_only=True, verbose=False)
        predictions = trainer.predict(module, datamodule=datamodule, ckpt_path=last, weights_only=True)
        return metrics, predictions, module.reference, module

    metrics, predictions, callback, module = evaluate("precomputed")
    assert callback.computed == [] and not module.reference.models()
    torch.testing.assert_close(torch.tensor(metrics["val/loss"]), torch.tensor(live.val_loss), rtol=0, atol=1e-5)
    _, live_predictions, _, _ = evaluate("copy")
    assert any(p["chosen_rewards"].abs().max() > 0 for p in live_predictions), "rewards all 0: nothing was trained"
    for cached, copied in zip(predictions, live_predictions, strict=True):
        for key, value in copied.items():
            torch.testing.assert_close(cached[key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_ddp_and_fsdp2_precomputed_match_one_process(tmp_path, cache, live, strategy):
    """2 CPU processes (gloo), batch 2 per rank: the pass shares rows out and all-gathers them;
    losses equal the one-process live-reference run's (to 1e-4, as for DDP vs one process with a
    live reference: two ranks' gradients sum in another order, and steps carry that on)."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": "ddp" if strategy == "ddp" else "auto",
            "max_steps": STEPS, "val_check_interval": STEPS, "num_sanity_val_steps": 0, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "tests.helpers.loss_probe.LossProbe", "init_args": {"out_dir": str(tmp_path / "probe")}}],
        },
        "export": {"enabled": False},
        "model": {"tiny_model": TINY, "reference": "precomputed",
                  "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": LR}}},
        "data": {"path": "synthetic", "synthetic_train_size": TRAIN_PAIRS, "synthetic_val_size": VAL_PAIRS,
                 "batch_size": BATCH // 2, "max_length": 1024, "cache_dir": str(cache)},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    extra = ["--config", str(REPO / "configs" / "fsdp.yaml")] if strategy == "fsdp2" else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(tmp_path / "config.yaml"), *extra]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in range(2)]
    assert not any(rank["reference_model"] for rank in ranks)
    losses = torch.tensor([rank["losses"] for rank in ranks]).mean(0)  # each rank's loss is its half's mean
    torch.testing.assert_close(losses, torch.tensor(live.losses), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(ranks[0]["val_loss"]), torch.tensor(live.val_loss), rtol=0, atol=1e-4)
