"""Where the time of a training step goes (the bench model and GSM8K pairs of bench/common.py).

A Lightning ``Trainer.fit`` of ``StepwiseDPOModule`` (fp32, CPU) with a callback that
splits each step, using only public hooks, into:

- data: end of the previous step to ``on_train_batch_start`` (fetching and collating
  the batch, moving it to the device);
- policy forward, reference forward: forward hooks on the two models;
- losses and metrics: the rest of ``training_step`` (up to ``on_before_backward``);
- backward: ``on_before_backward`` to ``on_after_backward``;
- optimizer: ``on_after_backward`` to ``on_train_batch_end`` (gradient clipping,
  AdamW, the trainer's bookkeeping).

The last step also runs under ``torch.profiler``, for the operators that take the time.

    python bench/profile_step.py [--steps 3] [--reference copy|none] [--unpacked]

The last stdout line is JSON: the median seconds of every phase.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/profile_step.py`: this checkout's bench

from bench.common import (  # noqa: E402
    BENCH_MODEL, GSM8K_PATH, LEARNING_RATE, Report, add_write_option, load_pairs, median, token_rows,
)
from stepwise_lit.data.collate import StepwiseCollator  # noqa: E402
from stepwise_lit.models.loading import TinyModelConfig  # noqa: E402
from stepwise_lit.module import StepwiseDPOModule  # noqa: E402

PHASES = ("data", "policy forward", "reference forward", "losses and metrics", "backward", "optimizer")


class PhaseTimer(L.Callback):
    """Per-step seconds of every phase in :data:`PHASES`; profiles the last step.

    Args:
        profile_step: Index of the step run under ``torch.profiler``.
    """

    def __init__(self, profile_step: int) -> None:
        self.profile_step = profile_step
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = defaultdict(float)
        self.mark = 0.0
        self.profiler: profile | None = None

    def time_forwards(self, model: torch.nn.Module, phase: str) -> None:
        """Add the wall time of every forward of ``model`` to the current step's ``phase``."""
        started = {}
        model.register_forward_pre_hook(lambda *_: started.update(t=time.perf_counter()))
        model.register_forward_hook(lambda *_: self.current.__setitem__(
            phase, self.current[phase] + time.perf_counter() - started["t"]))

    def lap(self, phase: str) -> None:
        """Charge the time since the last mark to ``phase``."""
        now = time.perf_counter()
        self.current[phase] += now - self.mark
        self.mark = now

    def on_train_start(self, trainer, module) -> None:
        self.time_forwards(module.policy, "policy forward")
        for reference in module.reference.models():
            self.time_forwards(reference, "reference forward")
        self.mark = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.profile_step:
            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()
        self.lap("data")

    def on_before_backward(self, trainer, module, loss) -> None:
        self.lap("losses and metrics")
        self.current["losses and metrics"] -= self.current["policy forward"] + self.current["reference forward"]

    def on_after_backward(self, trainer, module) -> None:
        self.lap("backward")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.lap("optimizer")
        self.steps.append(dict(self.current))
        self.current = defaultdict(float)
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs-per-batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--reference", choices=("copy", "none"), default="copy")
    parser.add_argument("--unpacked", action="store_true", help="[chosen; rejected] rows (data.pack_pairs: false)")
    add_write_option(parser, "profile_step")
    args = parser.parse_args()

    total_steps = args.steps + 2  # a warm-up step, the timed steps, a profiled step
    rows = token_rows(load_pairs(GSM8K_PATH, args.pairs_per_batch * total_steps, args.max_length), args.max_length)
    loader = DataLoader(rows, batch_size=args.pairs_per_batch, shuffle=False, collate_fn=StepwiseCollator(0, pack_pairs=not args.unpacked))
    module = StepwiseDPOModule(tiny_model=TinyModelConfig(**BENCH_MODEL), reference=args.reference,
                               optimizer=partial(torch.optim.AdamW, lr=LEARNING_RATE, weight_decay=0.0, fused=True))
    timer = PhaseTimer(profile_step=total_steps - 1)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=32, max_steps=total_steps, gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer])
    torch.manual_seed(0)
    trainer.fit(module, train_dataloaders=loader)

    timed = timer.steps[1:-1]
    medians = {phase: median([step.get(phase, 0.0) for step in timed]) for phase in PHASES}
    total = sum(medians.values())
    report = Report(__doc__, "0 (the model's initial weights; the pairs are in file order)")
    report.say(f"{args.pairs_per_batch} pairs per batch ({'unpacked' if args.unpacked else 'packed'}), "
          f"model {BENCH_MODEL}, reference {args.reference}, "
          f"median of {len(timed)} steps")
    report.table(["phase", "seconds", "share"],
                [[p, medians[p], f"{medians[p] / total:.0%}"] for p in PHASES] + [["total", total, "100%"]])
    report.say("\n```\n" + timer.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12) + "\n```")
    report.finish(medians, args.write)


if __name__ == "__main__":
    main()
