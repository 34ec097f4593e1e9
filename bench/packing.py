"""Padding share and forward/backward time of the batch layouts and attention backends.

On the bench's GSM8K pairs and model (``bench/common.py``, as ``bench/compare_trl.py``; batches in file order), each batch is
collated three ways: ``unpacked`` (``[chosen; rejected]`` rows, TRL's layout), ``packed``
(one pair per row, ``data.pack_pairs``) and ``budget N`` (several pairs per row up to N
tokens, ``data.pack_budget``). The padding share is the padding's part of the token slots
the model runs (rows x longest row), summed over the batches.

Then ``stepwise_lit.logprobs.forward.step_logps`` runs on every layout with every attention backend
the device supports, in one process, round-robin over the layouts batch after batch (so load
from other users of the machine falls on all alike): ``no_grad`` (the reference's pass) and
``train`` (forward and backward of the log-probs' sum, the policy's pass). Backends: ``sdpa``
(boolean 4D mask for packed rows), ``eager`` (additive mask) and ``flex_attention``
(FlexAttention with a ``BlockMask``, which skips the blocks no query sees: the pairs of a
budget row, the chosen rest for the rejected rest). torch has no FlexAttention backward on the
CPU, so flex's ``train`` column is only measured on CUDA. transformers compiles FlexAttention
with ``torch.compile``; on the CPU (torch 2.13) the kernel that dynamo's automatic dynamic shapes
produce after a second batch length fails to compile in C++, so this script compiles one static
kernel per length instead (``automatic_dynamic_shapes`` off), and a cell whose backend fails
prints the error's class. Times are medians over batches of the per-batch ratio to
``unpacked sdpa``; the first round warms up (and compiles flex).

    python bench/packing.py                                # CPU, budgets 1024 2048 4096
    python bench/packing.py --device cuda --vocab-size 128000 --rounds 8

The last stdout line is JSON: padding share per layout, time ratios per layout and backend.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/packing.py`: this checkout's bench

from bench.common import GSM8K_PATH, Report, add_write_option, build_model, load_pairs, median, token_rows  # noqa: E402


def layouts(budgets: list[int]) -> dict[str, dict]:
    """Collator settings of each layout, by name."""
    named = {"unpacked": {"pack_pairs": False}, "packed": {"pack_pairs": True}}
    named.update({f"budget {budget}": {"pack_pairs": True, "pack_budget": budget} for budget in budgets})
    return named


BACKENDS = ("sdpa", "eager", "flex_attention")
"""The attention implementations timed (transformers' ``attn_implementation`` names)."""


def timed(model, batch: dict, attention: str, train: bool) -> float | None:
    """Seconds for one `step_logps` pass (and backward when `train`); None where the device
    cannot run it (FlexAttention backward on the CPU). Raises what the backend raises."""
    from stepwise_lit.logprobs.forward import step_logps

    if train and attention == "flex_attention" and batch["input_ids"].device.type == "cpu":
        return None
    model.set_attn_implementation(attention)
    model.zero_grad(set_to_none=True)
    if batch["input_ids"].device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.set_grad_enabled(train):
        logps = step_logps(model, batch, batch["step_mask"].shape[1])
        if train:
            logps.sum().backward()
    if batch["input_ids"].device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=GSM8K_PATH)
    parser.add_argument("--pairs-per-batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=4, help="batches timed per layout (after one warm-up)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--vocab-size", type=int)
    parser.add_argument("--device", default="cpu")
    add_write_option(parser, "packing")
    args = parser.parse_args()
    report = Report(__doc__, "0 (the model's initial weights; the pairs are in file order)")

    from stepwise_lit.data.collate import StepwiseCollator

    count = args.pairs_per_batch * (1 + args.rounds)
    rows = token_rows(load_pairs(Path(args.data), count, args.max_length), args.max_length)
    chunks = [rows[start : start + args.pairs_per_batch] for start in range(0, count, args.pairs_per_batch)]
    named = layouts(args.budgets)
    batches = {name: [StepwiseCollator(0, **settings)(chunk) for chunk in chunks] for name, settings in named.items()}

    padding = {}
    table = []
    for name, collated in batches.items():
        real = sum(int(batch["attention_mask"].sum()) for batch in collated)
        slots = sum(batch["input_ids"].numel() for batch in collated)
        padding[name] = 1 - real / slots
        table.append([name, sum(batch["input_ids"].shape[0] for batch in collated) / len(collated), real, slots,
                      padding[name]])
    report.say(f"{len(chunks)} batches of {args.pairs_per_batch} pairs (max_length {args.max_length})")
    report.table(["layout", "rows per batch", "real tokens", "token slots run", "padding share"], table)

    torch._dynamo.config.automatic_dynamic_shapes = False  # see the module doc
    torch._dynamo.config.recompile_limit = 64
    model = build_model(args.vocab_size).to(args.device)
    failures = {}
    times = {(name, attention, train): [] for name in batches for attention in BACKENDS
             for train in (False, True)}
    for index in range(len(chunks)):
        for key in times:
            name, attention, train = key
            if key in failures:
                continue
            batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batches[name][index].items()}
            try:
                seconds = timed(model, batch, attention, train)
            except Exception as error:  # a backend the device cannot run: reported in the table
                failures[key] = type(error).__name__
                continue
            if index and seconds is not None:  # batch 0 warms up
                times[key].append(seconds)
    ratios, table = {}, []
    for name in batches:
        for attention in BACKENDS:
            row = [name, attention]
            for train in (False, True):
                measured, base = times[(name, attention, train)], times[("unpacked", "sdpa", train)]
                ratio = median([t / b for t, b in zip(measured, base)]) if measured and base else None
                ratios[f"{name} {attention} {'train' if train else 'no_grad'}"] = ratio
                missing = failures.get((name, attention, train), "n/a")
                row += [median(measured) if measured else missing, missing if ratio is None else ratio]
            table.append(row)
    report.say(f"device {args.device}, vocabulary {model.config.vocab_size}, {args.rounds} timed batches per cell")
    report.table(["layout", "attention", "no_grad (s, median)", "vs unpacked sdpa", "train (s, median)",
                 "vs unpacked sdpa"], table)
    report.finish({"padding_share": padding, "time_ratio_vs_unpacked_sdpa": ratios}, args.write)


if __name__ == "__main__":
    main()
