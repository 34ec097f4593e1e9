"""One run of the study's preference stage, in a worker process: a method from the base's export on
its data, then its measurements (`run_method`)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from pathlib import Path

from bench.study.data import read
from bench.study.methods import METHODS, Setup
from bench.study.scoring import generator_of, localisation, problems_of, sampling, solve_rates

DATA = {"gold": "gold", "right": "right", "pairs": "pairs", "step_dpo": "step_dpo", "online": "gold"}
"""The base folder's file (``data/<file>.jsonl``) each kind of `Method.data` trains on (the online
rounds take their prompts and gold solutions from ``gold``)."""


def quiet(threads: int = 1) -> None:
    """Worker set-up: `threads` torch threads, no warnings or Lightning chatter."""
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "stepwise_lit"):
        logging.getLogger(name).setLevel(logging.ERROR)


def data_module(setup: Setup, path: Path, seed: int, cache: Path, batch_size: int, format: str = "stepwise"):
    """The study's data module of one training file (no validation split); ``step_dpo`` rows split at ``"Step "``."""
    from stepwise_lit.data.datamodule import StepwiseDataModule

    return StepwiseDataModule(
        path=str(path), val_fraction=0.0, format=format, step_delimiter="Step ", max_length=setup.max_length,
        max_prompt_length=setup.max_prompt_length, batch_size=batch_size, eval_batch_size=64, seed=seed, cache_dir=str(cache),
    )


def trainer(root: Path, callbacks: list, max_steps: int = -1, **settings):
    """A quiet one-process CPU trainer (no logger, checkpoints or validation); `settings` override
    the trainer's (`max_epochs`, `reload_dataloaders_every_n_epochs`)."""
    import lightning as L

    return L.Trainer(**{
        "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "max_epochs": -1, "logger": False,
        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
        "num_sanity_val_steps": 0, "limit_val_batches": 0, "gradient_clip_val": 1.0, "default_root_dir": str(root),
        "callbacks": callbacks, **settings,
    })


def adamw(lr: float):
    import torch

    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)


@contextlib.contextmanager
def printed_to(path: Path):
    """Sends what a run prints to `path` instead of the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        yield


def online_rounds(setup: Setup, seed: int):
    """``online_nll``'s callback and trainer settings: every epoch a round (from the first),
    `setup.online_rounds` of them, each sampling `setup.samples` solutions of `setup.online_prompts`
    prompts from the policy, scored by the rule verifier, paired at the first error (right = right
    answer and every step passed), `steps / online_rounds` steps each."""
    from stepwise_lit.online.pairs import PairSettings
    from stepwise_lit.online.training import OnlineRounds
    from stepwise_lit.rewards.rules import ArithmeticStepVerifier

    if setup.steps % setup.online_rounds:
        raise ValueError(f"{setup.steps} steps do not split into {setup.online_rounds} rounds")
    callback = OnlineRounds(
        enabled=True, verifier=ArithmeticStepVerifier(), start_epoch=0, prompts_per_round=setup.online_prompts,
        steps_per_round=setup.steps // setup.online_rounds, answer_source="embedded",
        pairs=PairSettings(correctness="answer_and_steps"), generation=sampling(setup, seed), generator=setup.sampler,
    )
    return callback, {"max_epochs": setup.online_rounds, "reload_dataloaders_every_n_epochs": 1}


def run_method(setup: Setup, name: str, seed: int, base: Path, root: Path, lr: float, nll_weight: float,
               split: str) -> dict:
    """Method `name` from the base's export (`base`: the base folder) with seed `seed` (batch order,
    sampling), at `lr` and `sft_weight` `nll_weight`, for `setup.steps` steps of `setup.batch_size` rows;
    measured on `split`: ``val`` (greedy solve rate only: the sweep) or ``test`` (every metric).

    Returns:
        ``method``, ``seed``, ``split``, ``lr``, ``nll_weight``, ``seconds``, ``metrics`` and, online,
        the rounds' ``online`` summary.
    """
    import lightning as L

    from stepwise_lit.models.export import export_policy
    from stepwise_lit.module import StepwiseDPOModule

    quiet()
    start = time.perf_counter()
    method = METHODS[name]
    settings = {**setup.model, **method.settings, "sft_weight": nll_weight}
    if method.sft_only:
        settings["sft_warmup_steps"] = setup.steps
    with printed_to(root / "run.log"):
        L.seed_everything(seed, verbose=False)
        module = StepwiseDPOModule(model_name_or_path=str(base / "export"), optimizer=adamw(lr), **settings)
        callbacks, fit_settings = [], {}
        if method.data == "online":
            callback, fit_settings = online_rounds(setup, seed)
            callbacks.append(callback)
        datamodule = data_module(setup, base / "data" / f"{DATA[method.data]}.jsonl", seed, base / "cache",
                                 setup.batch_size, "step_dpo" if method.data == "step_dpo" else "stepwise")
        trainer(root, callbacks, setup.steps, **fit_settings).fit(module, datamodule=datamodule)
        trained = time.perf_counter()
        problems = problems_of(read(base / "data" / f"{split}.jsonl"))
        metrics = solve_rates(generator_of(module, datamodule), problems, setup, seed=1000 + seed if split == "test" else None)
        if split == "test":
            export_policy(module, root / "export")
            labelled = {part: read(base / "data" / f"labelled_{part}.jsonl") for part in ("val", "test")}
            metrics.update(localisation(root / "export", base / "export", labelled["val"], labelled["test"],
                                        setup.model["step_beta"]))
    result = {"method": name, "seed": seed, "split": split, "lr": lr, "nll_weight": nll_weight,
              "seconds": {"training": trained - start, "total": time.perf_counter() - start}, "metrics": metrics}
    if method.data == "online":
        summaries = [json.loads(path.read_text()) for path in sorted(
            (root / "online").glob("round-*/summary.json"), key=lambda path: int(path.parent.name.split("-")[1]))]
        result["online"] = {key: [summary[key] for summary in summaries] for key in ("pairs", "sample_accuracy")}
    return result
