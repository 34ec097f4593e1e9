"""LoRA checkpoints hold only what trains (issue 21 item 8), through `train.py` (`stepwise_lit.cli.main`):
the state dict is the adapter alone, and `validate`, `fit --ckpt_path` and `python -m stepwise_lit.evaluate`
rebuild the frozen base as at start (the embedded model from the RNG state the checkpoint keeps).
The SIGKILL-and-resume run with LoRA is in tests/e2e/test_distributed.py."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from stepwise_lit.cli import main
from tests.helpers.entry import run_entry, write_config

# BASE's tiny model (32 wide, 1 layer, 2 heads of 16, no grouped keys): q_proj and v_proj are 32 -> 32
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
ADAPTER_KEYS = {
    f"policy.base_model.model.model.layers.0.self_attn.{module}.lora_{matrix}.default.weight"
    for module in ("q_proj", "v_proj") for matrix in ("A", "B")
}
ADAPTER_VALUES = 2 * (4 * 32 + 32 * 4)  # per module: A is [r, 32], B is [32, r]


def val_losses(root: Path) -> list[float]:
    """`val/loss` of every CSV log under `root` (one per command run), in run order."""
    losses = []
    for path in sorted((root / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        losses += [float(row["val/loss"]) for row in csv.DictReader(path.open()) if row.get("val/loss")]
    return losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-step LoRA fit (validation after step 2); its config and run root."""
    folder = tmp_path_factory.mktemp("lora")
    config = write_config(folder, {"model": {"lora": LORA}}, folder / "cache")
    main(["fit", "--config", str(config)])
    return config, folder / "run"


def test_the_checkpoint_holds_the_adapter_and_not_the_base(trained):
    """last.ckpt's state dict is the 4 adapter matrices (512 values, by hand); the frozen base
    (26,912 values) is left out, the embedded model's RNG state is kept to rebuild it."""
    _, root = trained
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"].keys() == ADAPTER_KEYS
    assert sum(value.numel() for value in checkpoint["state_dict"].values()) == ADAPTER_VALUES
    assert checkpoint["tiny_model_rng_state"].dtype == torch.uint8
    assert not any(key.startswith("policy.") for key in checkpoint["state_dict"].keys() - ADAPTER_KEYS)


@pytest.mark.parametrize("seed", [0, 1], ids=["same-seed", "another-seed"])
def test_validate_from_the_checkpoint_sees_the_trained_policy(trained, capsys, seed):
    """`validate --ckpt_path` gives fit's last validation loss (the weights after step 2), also under
    another `seed_everything`, whose embedded base differs: the models are rebuilt from the state
    the checkpoint keeps (with the base taken from this run's model the loss differs)."""
    config, root = trained
    before = val_losses(root)
    argv = ["validate", "--config", str(config), "--ckpt_path", str(root / "checkpoints" / "last.ckpt"),
            f"--seed_everything={seed}", "--report.enabled=false"]
    outcome = run_entry(main, argv, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    assert val_losses(root)[len(before):] == [before[-1]]


def test_a_checkpoint_missing_an_adapter_weight_stops_naming_ckpt_path(trained, tmp_path, capsys):
    """Strict loading still catches a missing adapter weight: exit 2, one message naming
    `ckpt_path` and the weight, before any step."""
    config, root = trained
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    gone = sorted(ADAPTER_KEYS)[0]
    del checkpoint["state_dict"][gone]
    broken = tmp_path / "broken.ckpt"
    torch.save(checkpoint, broken)
    argv = ["fit", "--config", str(config), "--ckpt_path", str(broken), "--trainer.max_steps=3",
            f"--trainer.default_root_dir={tmp_path / 'resumed'}"]
    outcome = run_entry(main, argv, capsys)
    assert outcome.code == 2, outcome.err[-3000:]
    assert "Traceback" not in outcome.err
    (first,) = [line for line in outcome.err.splitlines() if line.startswith("error:")]
    assert first.startswith(f"error: ckpt_path: {broken}") and gone in first, first


def test_a_model_folder_base_is_reloaded_from_the_folder(tmp_path, capsys):
    """LoRA on a saved GPT-2 folder (tied embeddings, Conv1D layers): the checkpoint holds only
    adapter weights (neither name of the tied embedding), and `validate` from it, which reloads the
    base from `model.model_name_or_path`, gives fit's last validation loss."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from stepwise_lit.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=512,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = {"tiny_model": None, "model_name_or_path": str(folder), "lora": {"r": 4, "alpha": 8}}
    config = write_config(tmp_path / "fit", {"model": model}, tmp_path / "cache")
    assert run_entry(main, ["fit", "--config", str(config)], capsys).code == 0
    root = tmp_path / "fit" / "run"
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"] and all("lora_" in key for key in checkpoint["state_dict"])
    assert "tiny_model_rng_state" not in checkpoint
    before = val_losses(root)
    argv = ["validate", "--config", str(config), "--ckpt_path", str(root / "checkpoints" / "last.ckpt"), "--report.enabled=false"]
    outcome = run_entry(main, argv, capsys)
    assert outcome.code == 0, outcome.err[-3000:]
    assert val_losses(root)[len(before):] == [before[-1]]
