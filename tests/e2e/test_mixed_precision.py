"""``--trainer.precision=bf16-mixed`` with the shipped configs, whose fused AdamW and
``gradient_clip_val`` Lightning's mixed-precision plugin refuses to clip (before: "The current
optimizer, AdamW, does not allow for gradient clipping because it performs unscaling"). The
clipping itself, on the fp16 scaler path too: tests/unit/models/test_clipping.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stepwise_lit.cli import main
from tests.helpers.entry import TINY_ARGS, logged_losses, run_entry
from tests.helpers.paths import REPO

SHORT = ["--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--trainer.val_check_interval=1.0",
         "--evaluation.enabled=false", "--trainer.log_every_n_steps=1"]
# val_check_interval 1.0: the configs' 50 steps exceed the shrunk epoch, which Lightning's floor (2.6.0) refuses


def fit(tmp_path: Path, capsys, name: str, *args: str) -> list[float]:
    """`train.py fit` in-process under `tmp_path / name`; the per-step losses it logged."""
    root = tmp_path / name
    result = run_entry(main, ["fit", *args, *SHORT, f"--trainer.default_root_dir={root}",
                              f"--data.cache_dir={tmp_path / 'cache'}"], capsys)
    assert result.code == 0, result.err[-3000:]
    return logged_losses(root, ("train/loss", "train/sft_loss"))


def test_tiny_yaml_trains_under_bf16_mixed(tmp_path, capsys):
    """configs/tiny.yaml (shrunk: 1 SFT step, then 2 stepwise DPO steps) under bf16-mixed: exit 0, every
    loss finite and changing, and within 0.05 of the float32 run's but not equal to it (autocast ran)."""
    bf16 = fit(tmp_path, capsys, "bf16", *TINY_ARGS, "--trainer.precision=bf16-mixed")
    fp32 = fit(tmp_path, capsys, "fp32", *TINY_ARGS, "--trainer.precision=32")
    assert len(bf16) == len(fp32) == 3
    assert all(math.isfinite(loss) for loss in bf16)
    assert bf16[1] != bf16[2] and bf16[0] != bf16[1]
    assert bf16 == pytest.approx(fp32, abs=0.05) and bf16 != fp32


def test_online_tiny_yaml_trains_under_bf16_mixed(tmp_path, capsys):
    """configs/online_tiny.yaml's warm-up epoch (SFT, fused AdamW, gradient_clip_val 1) under bf16-mixed."""
    args = ["--config", str(REPO / "configs" / "online_tiny.yaml"), *TINY_ARGS[2:], "--online.prompts_per_round=4",
            "--online.pairs.reference_fallback=true", "--online.generation.max_new_tokens=8",
            "--trainer.precision=bf16-mixed"]
    losses = fit(tmp_path, capsys, "online", *args)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses) and len(set(losses)) == 3
