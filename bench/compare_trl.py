"""Side-by-side training benchmark: this package vs TRL's ``DPOTrainer``.

Both train the same ~19M-parameter Llama-architecture model (built from a config with the
package's byte-level tokenizer, same initial weights) on the same GSM8K pairs (ground truth
vs the strongest model's incorrect solution, from
``../shared/data/gsm8k/example_model_solutions.jsonl``; synthetic pairs when it is absent),
in the same order (no shuffling: step k sees the same batch on every side), with the same
batch size and length limit (pairs that do not fit are left out, so nobody truncates),
fp32 on the CPU, AdamW with the same hyper-parameters and torch's fused kernel (TRL's
default), gradient clipping at 1.0, no gradient checkpointing (TRL's default is on, the
package's off), a live frozen reference copy, and no logging, evaluation or checkpoints.

Each side runs its own full trainer: a Lightning ``Trainer.fit`` of ``StepwiseDPOModule``
fed by ``StepwiseDataModule`` (in file order), and ``DPOTrainer.train``. The package does
more per step (per-step log-probs, the step-level and the outcome-level loss, step metrics);
TRL computes sigmoid DPO. Variants:

- ``ours``: the package with its defaults (``data.pack_pairs: true``: each pair is one row,
  ``[shared prefix | chosen rest | rejected rest]``), live frozen copy as reference;
- ``trl``: TRL's ``DPOTrainer``, live reference;
- ``ours_precomputed``: ``ours`` with ``reference: precomputed`` (the reference pass runs
  in the warm-up step; the cache is cleared first so it does);
- ``ours_unpacked``: ``ours`` with ``data.pack_pairs: false`` (``[chosen; rejected]`` rows,
  TRL's layout), to show what packing gains;
- ``ours_compiled`` (only when named in ``--variants``): ``ours`` with ``model.compile: true``
  (the compilation runs in the warm-up step).
- ``ours_budget`` (only when named): ``ours`` with ``data.pack_budget: --pack-budget`` (several
  pairs per row, block-diagonal attention; sdpa's dense mask computes the masked blocks too);
- ``ours_lean`` (only when named): ``ours`` with ``model.lean_logps: true``;
- ``ours_full`` (only when named): ``ours`` with ``model.lean_logps: false`` (full logits);
- ``trl_precomputed`` (only when named): ``trl`` with ``precompute_ref_log_probs=True`` (its
  reference pass runs in the trainer's constructor, before the warm-up step, and no reference
  model is kept), the fair partner of ``ours_precomputed``.

Timing: all workers run at once, but only one computes at a time: each runs a warm-up step,
then the driver releases them one training step each, in turn, round after round (A B C D,
D C B A, ...), so load from other users of the machine falls on all of them alike. A step's
time runs from its release to the end of the optimizer step (data loading included). Step k
is the same batch for every variant, so the step-time ratio is the median over steps of the
per-step ratios (batches differ in length); the throughput ratio is total tokens over total time. After
each round the driver times an fp32 2048² matmul, the machine's ceiling under the same load,
for the model FLOPs utilisation (MFU): 6·N·T FLOPs per step for the policy (forward and
backward) plus 2·N·T for a live reference forward, N the parameters outside the input
embedding, T the real (non-pad) tokens the variant's forward passes run (packed rows run
fewer than the pairs hold). Throughput counts every variant's pairs alike: the real tokens of
the pairs as ``[chosen; rejected]`` rows, prompt on both sides (TRL's count). Peak resident memory is each worker's
``VmHWM`` (see ``bench.common.peak_rss_mib``).

Real vocabularies: ``--vocab-size N`` pads the model's embedding and LM head to N rows (new rows
drawn from a fixed generator, the same on every side; the byte tokenizer's ids are unchanged,
the extra rows are never targets but enter every softmax, as a real model's unused tokens do).
``--pack-budget N`` adds ``ours_budget``: ``ours`` with ``data.pack_budget: N`` (several pairs
per row); the table's padding column is the share of the tokens run that are padding.

    python bench/compare_trl.py                   # ours vs trl (+ precomputed, unpacked)
    python bench/compare_trl.py --vocab-size 128000 --steps 8
    python bench/compare_trl.py --mode logps      # one-pass per-step log-probs vs prefix forwards
    python bench/compare_trl.py --write           # ... and docs/results/compare_trl.md (+ .json)

The last stdout line is JSON: ``{"step_time_ratio": ours/TRL, "peak_memory_ratio": ours/TRL, ...}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/compare_trl.py`: this checkout's bench

from bench.common import (  # noqa: E402
    BENCH_MODEL, GSM8K_PATH, LEARNING_RATE, Report, StepGate, add_write_option, build_model, load_pairs, lockstep,
    matmul_gflops, median, pad_vocabulary, peak_rss_mib, rss_mib, token_rows,
)

BETA = 0.1
VARIANTS = ("ours", "trl", "ours_precomputed", "ours_unpacked", "ours_compiled", "ours_budget", "ours_lean",
            "ours_full", "trl_precomputed")
DEFAULT_VARIANTS = VARIANTS[:4]
LIVE_REFERENCE = {"ours": True, "trl": True, "ours_precomputed": False, "ours_unpacked": True, "ours_compiled": True,
                  "ours_budget": True, "ours_lean": True, "ours_full": True, "trl_precomputed": False}
LEAN_LOGPS = {"ours_lean": True, "ours_full": False}
"""``model.lean_logps`` per variant; the others keep the module's default."""


# -------------------------------------------------------------------------- workers
def trl_worker(args: argparse.Namespace, gate: StepGate) -> dict:
    """Train with TRL's ``DPOTrainer`` (sequential sampler), pausing at every step end; with
    ``trl_precomputed``, its reference log-probs are precomputed and no reference model kept."""
    import datasets
    import transformers
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from stepwise_lit.data.tokenizer import load_tokenizer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    memory = {}

    class Gate(TrainerCallback):
        def on_train_begin(self, *_, **__):
            memory["rss_at_train_start_mib"] = rss_mib()

        def on_step_end(self, *_, **__):
            gate.step_end()

    pairs = load_pairs(args.data, args.pairs_per_batch * args.total_steps, args.max_length)
    rows = [{"prompt": p["prompt"], "chosen": "".join(p["chosen_steps"]), "rejected": "".join(p["rejected_steps"])}
            for p in pairs]
    model = build_model(args.vocab_size)
    precompute = args.variant == "trl_precomputed"
    config = DPOConfig(
        output_dir=os.path.join(args.scratch, "trl"), per_device_train_batch_size=args.pairs_per_batch,
        max_steps=args.total_steps, learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch_fused", weight_decay=0.0, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"],
        max_length=args.max_length, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_strategy="no",
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        precompute_ref_log_probs=precompute,
    )
    trainer = DPOTrainer(model=model, ref_model=None if precompute else copy.deepcopy(model), args=config,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=load_tokenizer(None),
                         callbacks=[Gate()])
    masks = [batch["attention_mask"] for batch in trainer.get_train_dataloader()]
    trainer.train()
    tokens = [int(m.sum()) for m in masks]
    return {"tokens": tokens, "computed_tokens": tokens, "padded_tokens": [m.numel() for m in masks], **memory}


def ours_datamodule(args: argparse.Namespace, pack_pairs: bool = True, pack_budget: int | None = None):
    """``StepwiseDataModule`` over the bench pairs (written as a ``stepwise`` jsonl file), with
    the training rows in file order, as TRL's sequential sampler gives them."""
    from torch.utils.data import DataLoader

    from stepwise_lit.data.datamodule import StepwiseDataModule

    class SequentialDataModule(StepwiseDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.train_dataset, batch_size=self.hparams.batch_size, shuffle=False,
                              collate_fn=self.collator())

    path = Path(args.scratch) / f"pairs-{args.pairs_per_batch * args.total_steps}-{args.max_length}.jsonl"
    if not path.exists():
        pairs = load_pairs(args.data, args.pairs_per_batch * args.total_steps, args.max_length)
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
        os.replace(staging, path)
    return SequentialDataModule(path=str(path), format="stepwise", val_fraction=0.0, max_length=args.max_length,
                                max_prompt_length=None, batch_size=args.pairs_per_batch, pack_pairs=pack_pairs,
                                pack_budget=pack_budget, cache_dir=os.path.join(args.scratch, "cache"))


def ours_worker(args: argparse.Namespace, gate: StepGate) -> dict:
    """Train ``StepwiseDPOModule`` under a Lightning ``Trainer``, pausing at every step end."""
    import lightning as L
    from torch.utils.data import DataLoader

    from stepwise_lit.data.collate import StepwiseCollator
    from stepwise_lit.models.loading import TinyModelConfig
    from stepwise_lit.module import StepwiseDPOModule

    memory = {}

    class Gate(L.Callback):
        def on_train_start(self, *_):
            memory["rss_at_train_start_mib"] = rss_mib()

        def on_train_batch_end(self, *_):
            gate.step_end()

    datamodule = ours_datamodule(args, pack_pairs=args.variant != "ours_unpacked",
                                 pack_budget=args.pack_budget if args.variant == "ours_budget" else None)
    datamodule.prepare_data()
    datamodule.setup("fit")
    computed = [batch["attention_mask"] for batch in datamodule.train_dataloader()]
    unpacked = DataLoader(datamodule.train_dataset, batch_size=datamodule.hparams.batch_size,
                          collate_fn=StepwiseCollator(datamodule.tokenizer.pad_token_id, pack_pairs=False))
    masks = [batch["attention_mask"] for batch in unpacked]  # the pairs as [chosen; rejected] rows, TRL's count
    class PaddedVocabularyModule(StepwiseDPOModule):
        def build_base_model(self, *model_args, **model_kwargs):
            return pad_vocabulary(super().build_base_model(*model_args, **model_kwargs), args.vocab_size)

    module = PaddedVocabularyModule(
        tiny_model=TinyModelConfig(**BENCH_MODEL),
        reference="precomputed" if args.variant == "ours_precomputed" else "copy",
        optimizer=partial(torch.optim.AdamW, lr=LEARNING_RATE, weight_decay=0.0, fused=True),
        step_beta=BETA, outcome_beta=BETA, compile=args.variant == "ours_compiled",
        **({"lean_logps": LEAN_LOGPS[args.variant]} if args.variant in LEAN_LOGPS else {}),
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=32, max_steps=args.total_steps, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[Gate()], default_root_dir=os.path.join(args.scratch, args.variant),
    )
    torch.manual_seed(0)
    trainer.fit(module, datamodule=datamodule)
    return {"tokens": [int(m.sum()) for m in masks], "computed_tokens": [int(m.sum()) for m in computed],
            "padded_tokens": [m.numel() for m in computed], **memory}


def worker(args: argparse.Namespace) -> dict:
    """One variant's training run, paced by the driver; its memory, tokens and model size."""
    gate = StepGate()
    result = trl_worker(args, gate) if args.variant.startswith("trl") else ours_worker(args, gate)
    model = build_model(args.vocab_size)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["matmul_params"] = result["params"] - model.get_input_embeddings().weight.numel()
    result["peak_rss_mib"] = peak_rss_mib()
    return result


# ------------------------------------------------------------------- mode: train
def train_driver(args: argparse.Namespace, report: Report) -> dict:
    """Run the variants in lockstep; print the table; return the ratios."""
    shutil.rmtree(os.path.join(args.scratch, "cache", "reference"), ignore_errors=True)
    ours_datamodule(args)  # writes the pairs file once, before the workers start
    if "ours_budget" in args.variants and args.pack_budget is None:
        raise SystemExit("the ours_budget variant needs --pack-budget")
    common = ["--worker", f"--data={args.data}", f"--pairs-per-batch={args.pairs_per_batch}",
              f"--max-length={args.max_length}", f"--steps={args.steps}", f"--scratch={args.scratch}"]
    common += [f"--{name}={value}" for name, value in (("vocab-size", args.vocab_size), ("pack-budget", args.pack_budget))
               if value is not None]
    variants = {name: [f"--variant={name}", *common] for name in args.variants}
    times, warmup, results, ceilings = lockstep(variants, __file__, args.steps, os.path.join(args.scratch, "logs"),
                                                between=partial(matmul_gflops, repeats=1))
    ceiling = median(ceilings)
    stats = {}
    for name, result in results.items():
        tokens = result["tokens"][1 : 1 + args.steps]
        computed_tokens = result["computed_tokens"][1 : 1 + args.steps]
        flops_per_token = (8 if LIVE_REFERENCE[name] else 6) * result["matmul_params"]
        stats[name] = {
            "step_time_s": median(times[name]),
            "paired_vs_trl": median([t / r for t, r in zip(times[name], times["trl"])]),
            "tokens_per_s": sum(tokens) / sum(times[name]),
            "peak_rss_mib": result["peak_rss_mib"],
            "train_rss_mib": result["peak_rss_mib"] - result["rss_at_train_start_mib"],
            "computed_tokens": median(computed_tokens),
            "padded_tokens": median(result["padded_tokens"][1 : 1 + args.steps]),
            "padding_share": 1 - sum(computed_tokens) / sum(result["padded_tokens"][1 : 1 + args.steps]),
            "mfu": flops_per_token * sum(computed_tokens) / sum(times[name]) / 1e9 / ceiling,
            "warmup_step_s": warmup[name],
        }
    first = results[args.variants[0]]
    report.say(f"{first['params'] / 1e6:.2f}M parameters ({args.vocab_size or 259} vocabulary rows), {args.pairs_per_batch} pairs per batch, "
          f"{median(first['tokens'])} real / {median(first['padded_tokens'])} padded tokens per step (median), "
          f"{args.steps} steps per variant; matmul ceiling {ceiling:.1f} GFLOP/s (median over rounds)")
    report.table(
        ["variant", "tokens run per step (real / padded)", "padding share", "step time (s, median)",
         "step time vs trl (median of per-step ratios)", "pair tokens/s", "throughput vs trl", "peak RSS (MiB)",
         "vs trl", "peak − RSS at train start (MiB)", "MFU", "warm-up step (s)"],
        [[name, f"{s['computed_tokens']} / {s['padded_tokens']}", s["padding_share"], s["step_time_s"],
          s["paired_vs_trl"],
          s["tokens_per_s"], s["tokens_per_s"] / stats["trl"]["tokens_per_s"],
          s["peak_rss_mib"], s["peak_rss_mib"] / stats["trl"]["peak_rss_mib"], s["train_rss_mib"], s["mfu"],
          s["warmup_step_s"]] for name, s in stats.items()],
    )
    ours, trl = stats["ours"], stats["trl"]
    summary = {
        "step_time_ratio": ours["paired_vs_trl"],
        "peak_memory_ratio": ours["peak_rss_mib"] / trl["peak_rss_mib"],
        "throughput_ratio": ours["tokens_per_s"] / trl["tokens_per_s"],
        "training_memory_ratio": ours["train_rss_mib"] / trl["train_rss_mib"],
    }
    if "ours_precomputed" in stats:
        summary["precomputed_throughput_vs_ours"] = stats["ours_precomputed"]["tokens_per_s"] / ours["tokens_per_s"]
    if "ours_unpacked" in stats:
        summary["unpacked_step_time_ratio"] = stats["ours_unpacked"]["paired_vs_trl"]
        summary["unpacked_peak_memory_ratio"] = stats["ours_unpacked"]["peak_rss_mib"] / trl["peak_rss_mib"]
    if "ours_precomputed" in stats and "trl_precomputed" in stats:
        pre, trl_pre = stats["ours_precomputed"], stats["trl_precomputed"]
        summary["precomputed_vs_trl_precomputed_step_time"] = median(
            [a / b for a, b in zip(times["ours_precomputed"], times["trl_precomputed"])])
        summary["precomputed_vs_trl_precomputed_peak_memory"] = pre["peak_rss_mib"] / trl_pre["peak_rss_mib"]
    for name in ("ours_budget", "ours_lean", "ours_full", "trl_precomputed"):
        if name in stats:
            summary[f"{name}_step_time_ratio"] = stats[name]["paired_vs_trl"]
            summary[f"{name}_peak_memory_ratio"] = stats[name]["peak_rss_mib"] / trl["peak_rss_mib"]
    summary["padding_share"] = ours["padding_share"]
    summary["matmul_gflops"] = ceiling
    summary["variants"] = stats
    return summary


# ------------------------------------------------------------------- mode: logps
def padded(rows: list[list[int]]) -> torch.Tensor:
    """Right-pad with 0 (the pad id and the prompt/pad step id) to a ``[N, L]`` long tensor."""
    out = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.tensor(row)
    return out


def one_pass_step_logps(model, ids: list[list[int]], step_ids: list[list[int]], num_steps: int) -> torch.Tensor:
    """All steps' log-probs from one forward: ``stepwise_lit.logprobs.logps.step_logps``. ``[N, S]``"""
    from stepwise_lit.logprobs.logps import step_logps

    input_ids = padded(ids)
    logits = model(input_ids=input_ids, attention_mask=padded([[1] * len(row) for row in ids]), use_cache=False).logits
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


def logps_driver(args: argparse.Namespace, report: Report) -> dict:
    """Time one-pass vs per-prefix step log-probs in one process, alternating, forward-only
    (the reference's work) and forward+backward (the policy's work)."""
    from stepwise_lit.data.synthetic import generate_pairs

    num_steps = args.num_steps
    rows = token_rows(generate_pairs(args.pairs_per_batch, seed=0, min_steps=num_steps, max_steps=num_steps), 1024)
    ids = [row[f"{side}_input_ids"] for side in ("chosen", "rejected") for row in rows]
    step_ids = [row[f"{side}_step_ids"] for side in ("chosen", "rejected") for row in rows]
    model = build_model(args.vocab_size)
    methods = {"one_pass": one_pass_step_logps, "per_prefix": prefix_step_logps}
    summary, table = {}, []
    for mode in ("no_grad", "train"):
        times = {name: [] for name in methods}
        values = {}
        for round_index in range(1 + args.steps):
            for name, method in methods.items():
                model.zero_grad(set_to_none=True)
                started = time.perf_counter()
                with torch.set_grad_enabled(mode == "train"):
                    out = method(model, ids, step_ids, num_steps)
                    if mode == "train":
                        out.sum().backward()
                if round_index:  # the first round warms up
                    times[name].append(time.perf_counter() - started)
                values[name] = out.detach()
        speedup = median(times["per_prefix"]) / median(times["one_pass"])
        diff = (values["one_pass"] - values["per_prefix"]).abs().max().item()
        table.append([mode, median(times["one_pass"]), median(times["per_prefix"]), speedup, diff])
        summary[f"{mode}_speedup"] = speedup
        summary[f"{mode}_max_abs_diff"] = diff
    report.say(f"{len(ids)} rows ({args.pairs_per_batch} synthetic pairs), {num_steps} steps each, "
          f"{sum(map(len, ids)) / len(ids):.0f} tokens per row on average, model {BENCH_MODEL}")
    report.table(["mode", "one pass (s, median)", "per-prefix forwards (s, median)", "speed-up",
                 "max |Δ step logp|"], table)
    return {"one_pass_speedup": summary["train_speedup"], **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("train", "logps"), default="train")
    parser.add_argument("--data", type=Path, default=GSM8K_PATH)
    parser.add_argument("--pairs-per-batch", type=int, default=4, help="pairs per batch (2B rows)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per variant (after one warm-up step)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--num-steps", type=int, default=8, help="steps per response (--mode logps)")
    parser.add_argument("--vocab-size", type=int, help="pad the model's embedding and LM head to this many rows")
    parser.add_argument("--pack-budget", type=int, help="data.pack_budget of the ours_budget variant")
    parser.add_argument("--scratch", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "stepwise_bench"))
    add_write_option(parser, "compare_trl")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.total_steps = 1 + args.steps
    os.makedirs(args.scratch, exist_ok=True)  # $TMPDIR/stepwise_bench does not exist on a fresh machine
    if args.worker:
        print(json.dumps(worker(args)))
    else:
        report = Report(__doc__, "0 (the model's initial weights; the pairs are in file order)")
        report.finish((logps_driver if args.mode == "logps" else train_driver)(args, report), args.write)


if __name__ == "__main__":
    main()
