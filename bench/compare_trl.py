"""Side-by-side training benchmark: this package vs TRL's ``DPOTrainer``.

Both train the same ~20M-parameter Llama-architecture model (built from a config,
the package's byte-level tokenizer, same initial weights) on the same GSM8K pairs
(ground truth vs the strongest model's incorrect solution, from
``../shared/data/gsm8k/example_model_solutions.jsonl``; synthetic pairs when the file
is absent), in the same order (no shuffling, so step k sees the same batch in both),
with the same batch size, sequence length limit (pairs that do not fit are left out
on both sides, so neither truncates), fp32 on CPU, AdamW (same hyper-parameters,
torch's fused kernel: TRL's default, ``fused=True`` for the package), gradient clipping at 1.0, no gradient checkpointing (TRL's
default is on; it is switched off here because the package's default is off), a live
frozen reference copy and no logging, evaluation or checkpoints.

What is timed: each side's own full trainer loop (Lightning ``Trainer.fit`` with the
package's ``StepwiseDPOModule``; ``DPOTrainer.train``), step end to step end, so a
step's time covers data loading, both forwards, backward, clipping, the optimizer
and the trainer's own per-step work. The first ``--warmup`` steps are left out. The
package computes more per step (step-level and outcome-level losses, per-step
log-probs, step metrics); TRL computes sigmoid DPO.

Each measurement is a fresh subprocess (clean peak RSS); variants alternate
A B A B; medians and ratios come from this one run.

    python bench/compare_trl.py                   # ours vs trl, training steps
    python bench/compare_trl.py --mode logps      # one-pass per-step log-probs vs prefix forwards

The last stdout line is JSON: ``{"step_time_ratio": ours/TRL, "peak_memory_ratio": ours/TRL, ...}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from functools import partial
from pathlib import Path

import torch

from harness import alternate, matmul_gflops, median, peak_rss_mib, print_table, rss_mib

GSM8K_PATH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"
BENCH_MODEL = {"hidden_size": 512, "num_layers": 6, "num_heads": 8, "intermediate_size": 1376,
               "max_position_embeddings": 1024}
"""About 19.2M parameters with the byte-level vocabulary (259 tokens)."""
LEARNING_RATE = 1e-5
BETA = 0.1


# ----------------------------------------------------------------------------- data
def load_pairs(path: Path, count: int, max_length: int, seed: int = 0) -> list[dict]:
    """The first ``count`` canonical pairs whose chosen and rejected both fit ``max_length`` tokens.

    GSM8K model-solution pairs carry no rejected step scores (the adapter leaves them to
    a verifier); the bench fills -1 for every rejected step (the final answer is wrong),
    so no reward model runs during the timed steps.

    Args:
        path: GSM8K ``example_model_solutions.jsonl``; synthetic pairs when it does not exist.
        count: Pairs wanted.
        max_length: Longest ``<s> prompt response </s>`` allowed, in tokens.
        seed: Seed of the synthetic generator.

    Returns:
        Canonical rows, in file order.
    """
    from stepwise_lit.data.formats import read_records, to_canonical
    from stepwise_lit.tokenizer import load_tokenizer

    if path.exists():
        rows = to_canonical(read_records(path), "gsm8k", source=str(path), require_scores=False)
    else:
        from stepwise_lit.data.synthetic import generate_pairs

        rows = generate_pairs(4 * count, seed)
    tokenizer = load_tokenizer(None)

    def fits(row: dict, side: str) -> bool:
        return len(tokenizer(row["prompt"] + "".join(row[f"{side}_steps"])).input_ids) + 1 <= max_length

    selected = [row for row in rows if fits(row, "chosen") and fits(row, "rejected")][:count]
    if len(selected) < count:
        raise SystemExit(f"only {len(selected)} pairs fit max_length={max_length}; {count} needed")
    for row in selected:
        if row["rejected_step_scores"] is None:
            row["rejected_step_scores"] = [-1.0] * len(row["rejected_steps"])
    return selected


def trl_rows(pairs: list[dict]) -> list[dict]:
    """TRL's ``{prompt, chosen, rejected}`` text rows for the same pairs."""
    return [{"prompt": p["prompt"], "chosen": "".join(p["chosen_steps"]), "rejected": "".join(p["rejected_steps"])}
            for p in pairs]


def build_model():
    """The bench model (fp32, dropout off) from the package's tiny-model builder, seed 0."""
    from stepwise_lit.models import TinyModelConfig, build_tiny_model
    from stepwise_lit.tokenizer import load_tokenizer

    torch.manual_seed(0)
    return build_tiny_model(load_tokenizer(None), TinyModelConfig(**BENCH_MODEL))


# -------------------------------------------------------------------------- workers
class StepClock:
    """Step-end timestamps and the resident size when training starts."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.rss_at_start = 0.0

    def start(self) -> None:
        self.rss_at_start = rss_mib()

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())

    def result(self, warmup: int, tokens: list[int], padded: list[int]) -> dict:
        """Step times after ``warmup`` (end of step k-1 to end of step k) and memory."""
        times = [b - a for a, b in zip(self.ends[warmup - 1 :], self.ends[warmup:])]
        measured = slice(warmup, warmup + len(times))
        return {"step_times": times, "tokens": tokens[measured], "padded_tokens": padded[measured],
                "peak_rss_mib": peak_rss_mib(), "rss_at_train_start_mib": self.rss_at_start}


def trl_worker(args: argparse.Namespace) -> dict:
    """Train with TRL's DPOTrainer; one timestamp per optimizer step."""
    import datasets
    import transformers
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from stepwise_lit.tokenizer import load_tokenizer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock.start()

        def on_step_end(self, *_, **__):
            clock.step_end()

    pairs = load_pairs(args.data, args.pairs_per_batch * args.total_steps, args.max_length)
    model = build_model()
    config = DPOConfig(
        output_dir=os.path.join(args.scratch, "trl"), per_device_train_batch_size=args.pairs_per_batch,
        max_steps=args.total_steps, learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch_fused", weight_decay=0.0, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"],
        max_length=args.max_length, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_strategy="no",
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=0,
    )
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=config,
                         train_dataset=datasets.Dataset.from_list(trl_rows(pairs)),
                         processing_class=load_tokenizer(None), callbacks=[Clock()])
    tokens, padded = [], []
    for batch in trainer.get_train_dataloader():
        tokens.append(int(batch["attention_mask"].sum()))
        padded.append(batch["attention_mask"].numel())
    trainer.train()
    return clock.result(args.warmup, tokens, padded)


def token_rows(pairs: list[dict], max_length: int) -> list[dict]:
    """The package's token rows (``stepwise_lit.data.tokenize.tokenize_row``) for the pairs."""
    from stepwise_lit.data.tokenize import TokenizeSettings, tokenize_row
    from stepwise_lit.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    return [tokenize_row(pair, tokenizer, TokenizeSettings(max_length=max_length)) for pair in pairs]


def ours_worker(args: argparse.Namespace) -> dict:
    """Train with ``StepwiseDPOModule`` under a Lightning ``Trainer``; one timestamp per step."""
    import lightning as L
    from torch.utils.data import DataLoader

    from stepwise_lit.data.collate import StepwiseCollator
    from stepwise_lit.models import TinyModelConfig
    from shared_prefix import SharedPrefixModule
    from stepwise_lit.module import StepwiseDPOModule

    clock = StepClock()

    class Clock(L.Callback):
        def on_train_start(self, *_):
            clock.start()

        def on_train_batch_end(self, *_):
            clock.step_end()

    rows = token_rows(load_pairs(args.data, args.pairs_per_batch * args.total_steps, args.max_length), args.max_length)
    loader = DataLoader(rows, batch_size=args.pairs_per_batch, shuffle=False, collate_fn=StepwiseCollator(0))
    module_class = SharedPrefixModule if args.variant == "ours_shared_prefix" else StepwiseDPOModule
    module = module_class(
        tiny_model=TinyModelConfig(**BENCH_MODEL), reference="copy", export_on_fit_end=False,
        optimizer=partial(torch.optim.AdamW, lr=LEARNING_RATE, weight_decay=0.0, fused=True),
        step_beta=BETA, outcome_beta=BETA,
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=32, max_steps=args.total_steps, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[Clock()], default_root_dir=os.path.join(args.scratch, "ours"),
    )
    tokens = [int(batch["attention_mask"].sum()) for batch in loader]
    padded = [batch["attention_mask"].numel() for batch in loader]
    torch.manual_seed(0)
    trainer.fit(module, train_dataloaders=loader)
    return clock.result(args.warmup, tokens, padded)


def worker(args: argparse.Namespace) -> dict:
    """Dispatch to the variant's worker and add the model size."""
    result = trl_worker(args) if args.variant == "trl" else ours_worker(args)
    result["matmul_gflops"] = median([matmul_gflops(repeats=1) for _ in range(5)])  # under the load of this run
    model = build_model()
    result["params"] = sum(p.numel() for p in model.parameters())
    result["matmul_params"] = result["params"] - model.get_input_embeddings().weight.numel()
    return result


# ------------------------------------------------------------------- mode: logps
def step_token_rows(rows: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """``[chosen; rejected]`` token ids and step ids (``<s>`` prompt, steps, ``</s>`` in the last step).

    The byte-level tokenizer maps every byte to one token, so tokenizing the steps one by
    one gives exactly the tokens of the whole response.
    """
    from stepwise_lit.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    ids, step_ids = [], []
    for side in ("chosen", "rejected"):
        for row in rows:
            row_ids = tokenizer(row["prompt"]).input_ids
            row_steps = [0] * len(row_ids)
            steps = row[f"{side}_steps"]
            for number, step in enumerate(steps, start=1):
                step_tokens = tokenizer(step, add_special_tokens=False).input_ids
                step_tokens += [tokenizer.eos_token_id] if number == len(steps) else []
                row_ids += step_tokens
                row_steps += [number] * len(step_tokens)
            ids.append(row_ids)
            step_ids.append(row_steps)
    return ids, step_ids


def padded(rows: list[list[int]]) -> torch.Tensor:
    """Right-pad with 0 (the pad id and the prompt/pad step id) to a ``[N, L]`` long tensor."""
    out = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.tensor(row)
    return out


def one_pass_step_logps(model, ids: list[list[int]], step_ids: list[list[int]], num_steps: int) -> torch.Tensor:
    """All steps' log-probs from one forward: ``stepwise_lit.logps.step_logps``. ``[N, S]``"""
    from stepwise_lit.logps import step_logps

    input_ids = padded(ids)
    mask = padded([[1] * len(row) for row in ids])
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    return step_logps(logits, input_ids, padded(step_ids), num_steps)


def prefix_step_logps(model, ids: list[list[int]], step_ids: list[list[int]], num_steps: int) -> torch.Tensor:
    """The naive way: for step t, one forward of every row's prefix through step t;
    the step's log-prob is the sum over its tokens. ``[N, S]``"""
    columns = []
    for step in range(1, num_steps + 1):
        ends = [max(j for j, s in enumerate(row) if s <= step) + 1 for row in step_ids]
        input_ids = padded([row[:end] for row, end in zip(ids, ends)])
        mask = padded([[1] * end for end in ends])
        in_step = padded([[int(s == step) for s in row[:end]] for row, end in zip(step_ids, ends)])
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        token_logps = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        columns.append((token_logps * in_step[:, 1:]).sum(-1))
    return torch.stack(columns, dim=1)


def logps_driver(args: argparse.Namespace) -> dict:
    """Time one-pass vs per-prefix step log-probs in one process, alternating, forward-only
    (the reference's work) and forward+backward (the policy's work)."""
    from stepwise_lit.data.synthetic import generate_pairs

    num_steps = args.num_steps
    rows = generate_pairs(args.pairs_per_batch, seed=0, min_steps=num_steps, max_steps=num_steps)
    ids, step_ids = step_token_rows(rows)
    model = build_model()
    methods = {"one_pass": one_pass_step_logps, "per_prefix": prefix_step_logps}
    summary, table = {}, []
    for mode in ("no_grad", "train"):
        times = {name: [] for name in methods}
        values = {}
        for round_index in range(args.warmup + args.steps):
            for name, method in methods.items():
                model.zero_grad(set_to_none=True)
                started = time.perf_counter()
                with torch.set_grad_enabled(mode == "train"):
                    out = method(model, ids, step_ids, num_steps)
                    if mode == "train":
                        out.sum().backward()
                if round_index >= args.warmup:
                    times[name].append(time.perf_counter() - started)
                values[name] = out.detach()
        speedup = median(times["per_prefix"]) / median(times["one_pass"])
        diff = (values["one_pass"] - values["per_prefix"]).abs().max().item()
        table.append([mode, median(times["one_pass"]), median(times["per_prefix"]), speedup, diff])
        summary[f"{mode}_speedup"] = speedup
        summary[f"{mode}_max_abs_diff"] = diff
    tokens = sum(map(len, ids))
    print(f"{len(ids)} rows ({args.pairs_per_batch} synthetic pairs), {num_steps} steps each, "
          f"{tokens / len(ids):.0f} tokens per row on average, model {BENCH_MODEL}")
    print_table(["mode", "one pass (s, median)", "per-prefix forwards (s, median)", "speed-up",
                 "max |Δ step logp|"], table)
    return {"one_pass_speedup": summary["train_speedup"], **summary}


# --------------------------------------------------------------------------- driver
def summarize(results: list[dict], live_reference: bool) -> dict:
    """Medians over all measured steps of all repeats, and model FLOPs per second."""
    times = [t for r in results for t in r["step_times"]]
    tokens = [t for r in results for t in r["tokens"]]
    padded = [t for r in results for t in r["padded_tokens"]]
    step_time = median(times)
    flops_per_token = (6 + (2 if live_reference else 0)) * results[0]["matmul_params"]
    return {
        "step_time_s": step_time,
        "tokens_per_step": median(tokens),
        "padded_tokens_per_step": median(padded),
        "tokens_per_s": sum(tokens) / sum(times),
        "peak_rss_mib": median([r["peak_rss_mib"] for r in results]),
        "rss_at_train_start_mib": median([r["rss_at_train_start_mib"] for r in results]),
        "model_gflops_per_s": flops_per_token * sum(tokens) / sum(times) / 1e9,
    }


def train_driver(args: argparse.Namespace) -> dict:
    """Alternate the variants, print the table, return the ratios (ours / TRL)."""
    common = ["--worker", f"--data={args.data}", f"--pairs-per-batch={args.pairs_per_batch}",
              f"--max-length={args.max_length}", f"--steps={args.steps}", f"--warmup={args.warmup}",
              f"--scratch={args.scratch}"]
    variants = {name: [f"--variant={name}", *common] for name in args.variants}
    results = alternate(variants, __file__, args.repeats)
    peak_gflops = median([r["matmul_gflops"] for rs in results.values() for r in rs])
    stats = {name: summarize(results[name], live_reference=True) for name in variants}
    rows = []
    for name, s in stats.items():
        mfu = s["model_gflops_per_s"] / peak_gflops
        rows.append([name, s["step_time_s"], s["tokens_per_s"], s["tokens_per_step"], s["padded_tokens_per_step"],
                     s["peak_rss_mib"], s["peak_rss_mib"] - s["rss_at_train_start_mib"], mfu])
    print_table(["variant", "step time (s, median)", "tokens/s", "tokens/step", "padded tokens/step",
                 "peak RSS (MiB)", "peak − RSS at train start (MiB)", "MFU"], rows)
    print(f"matmul ceiling: {peak_gflops:.1f} GFLOP/s (fp32 2048² product, median over the workers); params "
          f"{results['ours'][0]['params'] / 1e6:.2f}M")
    ours, trl = stats["ours"], stats["trl"]
    summary = {
        "step_time_ratio": ours["step_time_s"] / trl["step_time_s"],
        "peak_memory_ratio": ours["peak_rss_mib"] / trl["peak_rss_mib"],
        "training_memory_ratio": (ours["peak_rss_mib"] - ours["rss_at_train_start_mib"])
        / (trl["peak_rss_mib"] - trl["rss_at_train_start_mib"]),
        "throughput_ratio": ours["tokens_per_s"] / trl["tokens_per_s"],
    }
    for name in stats.keys() - {"ours", "trl"}:
        summary[f"{name}_step_time_ratio"] = stats[name]["step_time_s"] / trl["step_time_s"]
        summary[f"{name}_peak_memory_ratio"] = stats[name]["peak_rss_mib"] / trl["peak_rss_mib"]
    summary["step_time_s"] = {name: s["step_time_s"] for name, s in stats.items()}
    summary["matmul_gflops"] = peak_gflops
    summary["mfu"] = {name: s["model_gflops_per_s"] / peak_gflops for name, s in stats.items()}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("train", "logps"), default="train")
    parser.add_argument("--data", type=Path, default=GSM8K_PATH)
    parser.add_argument("--pairs-per-batch", type=int, default=4, help="pairs per batch (2B rows)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="steps left out at the start of each run")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of A B")
    parser.add_argument("--variants", nargs="+", default=["ours", "trl", "ours_shared_prefix"],
                        choices=["ours", "trl", "ours_shared_prefix"])
    parser.add_argument("--num-steps", type=int, default=8, help="steps per response (--mode logps)")
    parser.add_argument("--scratch", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "stepwise_bench"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.total_steps = args.warmup + args.steps
    if args.worker:
        print(json.dumps(worker(args)))
    elif args.mode == "logps":
        print(json.dumps(logps_driver(args)))
    else:
        print(json.dumps(train_driver(args)))


if __name__ == "__main__":
    main()
