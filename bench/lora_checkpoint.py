"""What a LoRA checkpoint holds: a 2-step `train.py fit` of `configs/tiny.yaml` with LoRA, then
`last.ckpt`'s file size and the values it stores (model state dict: adapter and other; optimizer
state), and the base size of configs/zephyr_gsm8k.yaml's model. Run from the repository root:

    python bench/lora_checkpoint.py            # r 4, all-linear (the README's figures)
    python bench/lora_checkpoint.py --r 8
    python bench/lora_checkpoint.py --zephyr   # only the base size of configs/zephyr_gsm8k.yaml's model
    python bench/lora_checkpoint.py --write    # ... and docs/results/lora_checkpoint.md (+ .json)

`--zephyr` counts the parameters of a `MistralForCausalLM` in zephyr-7b-beta's shape, built on the
meta device (nothing is downloaded or allocated): the base a bfloat16 checkpoint no longer holds.

The run uses tiny.yaml's model (64 wide, 2 layers) and seed (0), 64 synthetic pairs, no
validation, no generation evaluation and no export; it writes into a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/lora_checkpoint.py`: this checkout's bench

from bench.common import REPO, Report, add_write_option  # noqa: E402


def tensors(tree) -> list[torch.Tensor]:
    """Every tensor anywhere in a nested dict / list of a checkpoint."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in tensors(value)]
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in tensors(value)]
    return []


def zephyr_base_parameters() -> int:
    """Parameters of zephyr-7b-beta's architecture (Mistral-7B: 32 layers, hidden 4096, MLP 14336,
    8 key/value heads, 32,000-token vocabulary, untied head), counted on the meta device."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        return sum(p.numel() for p in MistralForCausalLM(config).parameters())


def checkpoint_values(r: int) -> dict:
    """The 2-step LoRA fit of tiny.yaml at rank `r` (in a temporary folder); what its last.ckpt holds."""
    from stepwise_lit.cli import main

    with tempfile.TemporaryDirectory() as folder:
        main([
            "fit", "--config", str(REPO / "configs" / "tiny.yaml"), f"--model.lora.r={r}",
            "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={folder}", "--evaluation.enabled=false", "--export.enabled=false",
            "--data.synthetic_train_size=64", "--data.synthetic_val_size=8", f"--data.cache_dir={folder}/cache",
        ])
        path = Path(folder) / "checkpoints" / "last.ckpt"
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint["state_dict"]
        return {
            "r": r, "checkpoint_bytes": os.path.getsize(path), "tensors": len(state),
            "adapter_values": sum(v.numel() for k, v in state.items() if "lora_" in k),
            "other_values": sum(v.numel() for k, v in state.items() if "lora_" not in k),
            "optimizer_values": sum(t.numel() for t in tensors(checkpoint["optimizer_states"])),
            "rng_bytes": sum(t.numel() for t in tensors(checkpoint) if t.dtype == torch.uint8),
        }


def main_(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--zephyr", action="store_true", help="only the zephyr-7b base size (no fit)")
    add_write_option(parser, "lora_checkpoint")
    args = parser.parse_args(argv)
    report = Report(__doc__, "0 (tiny.yaml's seed_everything and data.seed)")
    summary = {} if args.zephyr else checkpoint_values(args.r)
    if summary:
        report.say(f"last.ckpt: {summary['checkpoint_bytes']:,} bytes")
        report.say(f"state_dict: {summary['tensors']} tensors, {summary['adapter_values']:,} adapter (lora_) values, "
                   f"{summary['other_values']:,} other values")
        report.say(f"optimizer state: {summary['optimizer_values']:,} values")
        report.say(f"RNG states (uint8 tensors): {summary['rng_bytes']:,} bytes")
    summary["zephyr_base_parameters"] = count = zephyr_base_parameters()
    report.say(f"zephyr-7b-beta base: {count:,} parameters, {2 * count / 1e9:.2f} GB in bfloat16")
    report.finish(summary, args.write)


if __name__ == "__main__":
    main_()
