"""Peak memory and values: lean per-step log-probs vs the plain fp32 ``log_softmax`` way.

Three ways to get per-step log-probs ``[N, S]`` from final hidden states ``[N, L, H]``
and an LM head ``[V, H]``:

- ``plain``: ``logits = hidden @ W.T`` (fp32 ``[N, L, V]``), then
  ``logits[:, :-1].log_softmax(-1).gather(...)`` (a second ``[N, L, V]`` tensor),
  summed per step: what most DPO code does.
- ``chunked``: the same logits, then ``stepwise_lit.logprobs.logps.step_logps`` (gathered
  logit minus a logsumexp over chunks of positions; no second full tensor).
- ``lean``: ``stepwise_lit.logprobs.logps.step_logps_from_hidden``: the LM head is applied
  to completion positions only, a chunk at a time; no ``[N, L, V]`` tensor exists.

Each measurement is a fresh subprocess; its peak is ``VmHWM`` minus the resident
size just before the computation (inputs already built), i.e. the memory the
log-prob computation itself adds. The workers run with ``MALLOC_MMAP_THRESHOLD_=65536``
(see ``bench.common.TENSOR_RSS_ENV``), so RSS follows live tensors: with glibc's default,
freed chunks stay resident and the peak depends on the allocator's history. Mode ``train`` also runs backward to ``hidden`` and
the LM-head weight (the policy case); ``no_grad`` is the reference case.

    python bench/lean_logps.py                       # 32k and 128k, both modes
    python bench/lean_logps.py --vocab 128256 --modes train

The last stdout line is JSON with the ratios (lean / plain) per vocabulary and mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/lean_logps.py`: this checkout's bench

from bench.common import TENSOR_RSS_ENV, Report, add_write_option, alternate, median, peak_rss_mib, rss_mib  # noqa: E402
from stepwise_lit.logprobs.logps import step_logps, step_logps_from_hidden  # noqa: E402

METHODS = ("plain", "chunked", "lean")
NUM_STEPS = 8


def make_inputs(rows: int, length: int, hidden_size: int, vocab: int, seed: int = 0):
    """Deterministic hidden states, LM head and a stepwise batch.

    Each row: a prompt (step 0) of a quarter of the row, then ``NUM_STEPS`` steps of
    equal length; the rows' lengths differ and the tail is padding (step 0).

    Returns:
        ``(hidden [N, L, H], weight [V, H], input_ids [N, L], step_ids [N, L])``.
    """
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, length, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) * (2.0 / hidden_size**0.5)  # logit std ~2
    input_ids = torch.randint(0, vocab, (rows, length), generator=generator)
    step_ids = torch.zeros(rows, length, dtype=torch.long)
    for row in range(rows):
        used = length - row * length // (4 * rows)  # rows get shorter: padding at the end
        prompt = length // 4
        step_length = (used - prompt) // NUM_STEPS
        for step in range(NUM_STEPS):
            step_ids[row, prompt + step * step_length : prompt + (step + 1) * step_length] = step + 1
    return hidden, weight, input_ids, step_ids


def plain_step_logps(hidden, weight, input_ids, step_ids, num_steps):
    """The plain way: full fp32 logits, full ``log_softmax``, gather, per-step sum."""
    logits = hidden @ weight.T
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    sums = token_logps.new_zeros(token_logps.shape[0], num_steps + 1)
    sums.scatter_add_(1, step_ids[:, 1:], token_logps)
    return sums[:, 1:]


def compute(method: str, hidden, weight, input_ids, step_ids, chunk_size: int, num_steps: int = NUM_STEPS):
    """Per-step log-probs ``[N, num_steps]`` by ``method``."""
    if method == "plain":
        return plain_step_logps(hidden, weight, input_ids, step_ids, num_steps)
    if method == "chunked":
        return step_logps(hidden @ weight.T, input_ids, step_ids, num_steps, chunk_size)
    return step_logps_from_hidden(hidden, weight, input_ids, step_ids, num_steps, chunk_size)


def token_level_values(method: str, hidden, weight, input_ids, step_ids, chunk_size: int) -> torch.Tensor:
    """Per-token log-probs ``[N, L]`` by ``method``: every completion token is made its own "step"."""
    positions = torch.arange(step_ids.shape[1]).expand_as(step_ids)
    token_ids = torch.where(step_ids > 0, positions, 0)
    with torch.no_grad():
        return compute(method, hidden, weight, input_ids, token_ids, chunk_size, num_steps=step_ids.shape[1])


def worker(args: argparse.Namespace) -> dict:
    """One measurement: peak memory and time the computation adds; values saved to ``--out``."""
    hidden, weight, input_ids, step_ids = make_inputs(args.rows, args.length, args.hidden, args.vocab)
    train = args.mode == "train"
    hidden.requires_grad_(train)
    weight.requires_grad_(train)
    # Warm the kernels and the thread pool on a tiny slice, so one-time allocations are in the baseline.
    compute(args.method, hidden[:1, :16].detach(), weight[:64].detach(), input_ids[:1, :16] % 64,
            step_ids[:1, :16], args.chunk_size)
    before = rss_mib()
    started = time.perf_counter()
    with torch.set_grad_enabled(train):
        values = compute(args.method, hidden, weight, input_ids, step_ids, args.chunk_size)
        if train:
            values.sum().backward()
    seconds = time.perf_counter() - started
    peak = peak_rss_mib()
    tokens = token_level_values(args.method, hidden.detach(), weight.detach(), input_ids, step_ids, args.chunk_size)
    torch.save({"steps": values.detach(), "tokens": tokens}, args.out)
    return {"method": args.method, "peak_added_mib": peak - before, "baseline_mib": before, "seconds": seconds}


def exact_token_logps(hidden, weight, input_ids, step_ids) -> torch.Tensor:
    """fp64 per-token log-probs ``[N, L]``, column ``j - 1`` for the token at ``j`` (as
    :func:`token_level_values`; 0 off completion positions), one row at a time."""
    rows = []
    for row in range(hidden.shape[0]):
        logits = hidden[row, :-1].double() @ weight.double().T
        logps = logits.log_softmax(-1).gather(-1, input_ids[row, 1:, None]).squeeze(-1)
        rows.append(torch.cat([logps * (step_ids[row, 1:] > 0), logps.new_zeros(1)]))
    return torch.stack(rows)


def driver(args: argparse.Namespace, report: Report) -> dict:
    """Alternate the methods for every vocabulary and mode; print tables; return ratios."""
    summary = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in args.modes:
            for vocab in args.vocab:
                outs = {m: os.path.join(folder, f"{mode}-{vocab}-{m}.pt") for m in METHODS}
                common = [f"--vocab={vocab}", f"--mode={mode}", f"--rows={args.rows}", f"--length={args.length}",
                          f"--hidden={args.hidden}", f"--chunk-size={args.chunk_size}"]
                variants = {m: ["--worker", f"--method={m}", f"--out={outs[m]}", *common] for m in METHODS}
                report.say(f"vocab {vocab}, {mode}:")
                results = alternate(variants, __file__, args.repeats, env=TENSOR_RSS_ENV)
                peaks = {m: median([r["peak_added_mib"] for r in results[m]]) for m in METHODS}
                seconds = {m: median([r["seconds"] for r in results[m]]) for m in METHODS}
                values = {m: torch.load(outs[m], weights_only=True) for m in METHODS}
                hidden, weight, input_ids, step_ids = make_inputs(args.rows, args.length, args.hidden, vocab)
                exact = exact_token_logps(hidden, weight, input_ids, step_ids)
                exact_steps = exact.new_zeros(exact.shape[0], NUM_STEPS + 1).scatter_add_(1, step_ids[:, 1:], exact[:, :-1])
                token_diff = {m: (values[m]["tokens"].double() - exact).abs().max().item() for m in METHODS}
                step_diff = {m: (values[m]["steps"] - values["plain"]["steps"]).abs().max().item() for m in METHODS}
                exact_step_diff = {m: (values[m]["steps"].double() - exact_steps[:, 1:]).abs().max().item()
                                   for m in METHODS}
                report.table(
                    ["method", "peak added (MiB)", "vs plain", "time (s)", "max |Δ token logp| vs fp64",
                     "max |Δ step logp| vs fp64", "max |Δ step logp| vs plain"],
                    [[m, peaks[m], peaks[m] / peaks["plain"], seconds[m], token_diff[m], exact_step_diff[m],
                      step_diff[m]] for m in METHODS],
                )
                report.say(f"(one fp32 [N, L, V] tensor = {args.rows * args.length * vocab * 4 / 2**20:.0f} MiB; "
                      f"|step logp| up to {values['plain']['steps'].abs().max().item():.0f}, "
                      f"fp32 spacing there {torch.finfo(torch.float32).eps * 512:.1e})\n")
                summary[f"{mode}_{vocab}"] = {
                    "lean_peak_ratio": peaks["lean"] / peaks["plain"],
                    "chunked_peak_ratio": peaks["chunked"] / peaks["plain"],
                    "lean_token_max_abs_diff_vs_fp64": token_diff["lean"],
                    "plain_token_max_abs_diff_vs_fp64": token_diff["plain"],
                    "lean_token_max_abs_diff_vs_plain": (values["lean"]["tokens"] - values["plain"]["tokens"]).abs().max().item(),
                    "lean_step_max_abs_diff_vs_plain": step_diff["lean"],
                    "lean_step_max_abs_diff_vs_fp64": exact_step_diff["lean"],
                    "plain_step_max_abs_diff_vs_fp64": exact_step_diff["plain"],
                    "lean_time_ratio": seconds["lean"] / seconds["plain"],
                }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--modes", nargs="+", choices=("train", "no_grad"), default=["no_grad", "train"])
    parser.add_argument("--rows", type=int, default=4, help="rows N (2B for B pairs)")
    parser.add_argument("--length", type=int, default=512, help="sequence length L")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size H")
    parser.add_argument("--chunk-size", type=int, default=256, help="positions per chunk (chunked and lean)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of A B C")
    add_write_option(parser, "lean_logps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("train", "no_grad"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.vocab = args.vocab[0]
        print(json.dumps(worker(args)))
    else:
        report = Report(__doc__, "0 (the inputs and the LM head)")
        report.finish(driver(args, report), args.write)


if __name__ == "__main__":
    main()
