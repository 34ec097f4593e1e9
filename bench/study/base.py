"""The study's base, built once and cached by its settings (`base_folder`): SFT on gold solutions with
a validation curve, then the pool of its own samples on the training prompts and its labelled samples
on the held-out problems (`build_base`)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from bench.study.data import labelled_rows, pool_pairs, pool_summary, right_rows, split_problems, step_dpo_rows, write
from bench.study.methods import Setup
from bench.study.run import adamw, data_module, printed_to, quiet, trainer
from bench.study.scoring import generator_of, problems_of, sampling, solve_rates

FILES = ("base", "val", "test", "gold", "pairs", "step_dpo", "right", "labelled_val", "labelled_test")
"""The base folder's data files (``data/<name>.jsonl``)."""


def base_folder(cache: Path, setup: Setup) -> Path:
    """``<cache>/base-<12 hex digits of the hash of setup.base_key()>``."""
    key = hashlib.sha256(json.dumps(setup.base_key(), sort_keys=True).encode()).hexdigest()[:12]
    return cache / f"base-{key}"


def curve_callback(problems: list, setup: Setup, points: list[dict]):
    """Appends ``{"step", "solve_rate", "seconds"}`` to `points` every `setup.curve_every` steps (greedy, `problems`)."""
    import lightning as L

    class Curve(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % setup.curve_every == 0:
                generator = generator_of(pl_module, trainer.datamodule)
                rate = solve_rates(generator, problems, setup, seed=None)["solve_rate"]
                points.append({"step": trainer.global_step, "solve_rate": rate, "seconds": time.perf_counter() - start})
                print(f"[study] base step {trainer.global_step}: validation solve rate {rate:.3f}", flush=True)

    start = time.perf_counter()
    return Curve()


def cosine(steps: int):
    """A scheduler factory: the learning rate times (1 + cos(π min(t, steps) / steps)) / 2 at step t."""
    import math

    import torch

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def sample_round(generator, rows: list[dict], setup: Setup, num_samples: int, seed: int, ids: list[str]):
    """`num_samples` samples of each row's prompt, every step scored by the rule verifier given the gold
    solution, graded, paired at the first error (`stepwise_lit.online.solutions.generate_round`)."""
    from stepwise_lit.online.pairs import PairSettings
    from stepwise_lit.online.solutions import RoundSettings, generate_round
    from stepwise_lit.rewards.rules import ArithmeticStepVerifier

    settings = RoundSettings(generation=sampling(setup, seed, num_samples),
                             pairs=PairSettings(correctness="answer_and_steps"), answer_source="embedded")
    return generate_round(generator, ArithmeticStepVerifier(), [row["prompt"] for row in rows],
                          [row["reference_solution"] for row in rows], settings, prompt_ids=ids)


def build_base(setup: Setup, folder: Path, threads: int) -> dict:
    """Trains the base and samples its pool into `folder`: ``export/``, ``data/<FILES>.jsonl`` and, written
    last, ``base.json`` (the curve, the test solve rates, the pool's summary, the seconds).

    Returns:
        ``base.json``'s content.
    """
    import lightning as L

    from stepwise_lit.models.export import export_policy
    from stepwise_lit.models.loading import TinyModelConfig
    from stepwise_lit.module import StepwiseDPOModule

    quiet(threads)
    start = time.perf_counter()
    splits = split_problems(setup)
    files = {name: folder / "data" / f"{name}.jsonl" for name in FILES}
    for name in ("base", "val", "test"):
        write(splits[name], files[name])
    write(splits["pool"], files["gold"])
    points: list[dict] = []
    with printed_to(folder / "base.log"):
        L.seed_everything(0, verbose=False)
        shape = TinyModelConfig(hidden_size=setup.hidden_size, num_layers=setup.num_layers, num_heads=setup.num_heads,
                                intermediate_size=3 * setup.hidden_size)
        module = StepwiseDPOModule(tiny_model=shape, sft_warmup_steps=setup.base_steps, optimizer=adamw(setup.base_lr),
                                   scheduler=cosine(setup.base_steps), **setup.model)
        datamodule = data_module(setup, files["base"], 0, folder / "cache", setup.base_batch_size)
        run = trainer(folder, [curve_callback(problems_of(splits["val"]), setup, points)], setup.base_steps)
        run.fit(module, datamodule=datamodule)
        trained = time.perf_counter()
        export_policy(module, folder / "export")
        test = solve_rates(generator_of(module, datamodule), problems_of(splits["test"]), setup, seed=1000)
        generator = generator_of(module, datamodule, setup.sampler)
        pool = sample_round(generator, splits["pool"], setup, setup.samples, seed=0, ids=[row["id"] for row in splits["pool"]])
        labelled = {split: sample_round(generator, splits[split], setup, setup.labelled_samples, seed=1,
                                        ids=[row["id"] for row in splits[split]]) for split in ("val", "test")}
    pairs, pair_counts = pool_pairs(pool)
    layout, layout_left_out = step_dpo_rows(pairs)
    right = right_rows(pool, {row["id"]: row for row in splits["pool"]})
    responses = {split: labelled_rows(record) for split, record in labelled.items()}
    for name, rows in (("pairs", pairs), ("step_dpo", layout), ("right", right),
                       ("labelled_val", responses["val"]), ("labelled_test", responses["test"])):
        write(rows, files[name])
    summary = {
        "setup": setup.base_key(), "curve": points, "test": test,
        "pool": {**pool_summary(pool), "pairs": pair_counts, "right_rows": len(right), "step_dpo_rows": len(layout),
                 "step_dpo_left_out": layout_left_out, "sampling": asdict(sampling(setup, 0))},
        "labelled": {split: {"responses": len(rows), "with_error": sum(row["first_error"] >= 0 for row in rows)}
                     for split, rows in responses.items()},
        "seconds": {"training": trained - start, "total": time.perf_counter() - start},
    }
    (folder / "base.json").write_text(json.dumps(summary, indent=2))
    return summary
