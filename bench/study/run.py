"""One run of the study, in a worker process: an SFT warm-up (`run_sft`) or a method's preference
stage from that warm-up's export (`run_method`), each evaluated with the package's callbacks."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from pathlib import Path

from bench.study.methods import METHODS, METRICS, SFT_START, Task


def quiet(threads: int = 1) -> None:
    """Worker set-up: one torch thread, no warnings or Lightning chatter."""
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "stepwise_lit"):
        logging.getLogger(name).setLevel(logging.ERROR)


def data_module(task: Task, path: Path, val_path: Path | None, seed: int, cache: Path, batch_size: int | None = None):
    """The task's data module for `path` (training) and `val_path` (validate/test); `batch_size`:
    pairs per training step (None: the warm-up's)."""
    from stepwise_lit.data.datamodule import StepwiseDataModule

    return StepwiseDataModule(
        path=str(path), val_path=None if val_path is None else str(val_path), val_fraction=0.0, format="stepwise",
        max_length=task.max_length, max_prompt_length=task.max_prompt_length, batch_size=batch_size or task.batch_size,
        eval_batch_size=64, seed=seed, cache_dir=str(cache),
    )


def trainer(root: Path, callbacks: list, max_steps: int = -1, **settings):
    """A quiet one-process CPU trainer (no logger, no checkpoints); `max_steps` for `fit`; `settings`
    override the trainer's (`max_epochs`, `reload_dataloaders_every_n_epochs`)."""
    import lightning as L

    return L.Trainer(**{
        "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "max_epochs": -1, "logger": False,
        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
        "num_sanity_val_steps": 0, "gradient_clip_val": 1.0, "default_root_dir": str(root), "callbacks": callbacks,
        **settings,
    })


def online_rounds(task: Task, seed: int, generator: str, pairs: dict):
    """The online method's callback and trainer settings: every epoch is a round (from the first),
    `task.online_rounds` of them, sampled from the policy by the backend at import path
    `generator`, scored by the rule verifier, paired at the first wrong step (`pairs`: the
    `PairSettings` arguments), `preference_steps / online_rounds` steps each."""
    from stepwise_lit.models.generate import GenerationSettings
    from stepwise_lit.online.pairs import PairSettings
    from stepwise_lit.online.training import OnlineRounds
    from stepwise_lit.rewards.rules import ArithmeticStepVerifier

    if task.preference_steps % task.online_rounds:
        raise ValueError(f"{task.name}: {task.preference_steps} preference steps do not split into {task.online_rounds} rounds")
    callback = OnlineRounds(
        enabled=True, verifier=ArithmeticStepVerifier(), start_epoch=0, prompts_per_round=task.online_prompts,
        steps_per_round=task.preference_steps // task.online_rounds, answer_source=task.source, generator=generator,
        pairs=PairSettings(**pairs),
        generation=GenerationSettings(do_sample=True, temperature=0.7, num_samples=8, max_new_tokens=task.max_new_tokens,
                                      batch_size=16, seed=seed),
    )
    return callback, {"max_epochs": task.online_rounds, "reload_dataloaders_every_n_epochs": 1}


def solve_rate_callback(task: Task):
    from stepwise_lit.evaluation.generation import SolveRateEvaluation
    from stepwise_lit.models.generate import GenerationSettings

    return SolveRateEvaluation(
        enabled=True, source=task.source, max_prompts=task.max_prompts,
        generation=GenerationSettings(max_new_tokens=task.max_new_tokens, batch_size=64),
    )


def adamw(lr: float):
    import torch

    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)


@contextlib.contextmanager
def printed_to(path: Path):
    """Sends what a run prints (the evaluation reports' tables, the online rounds' progress bars)
    to `path` instead of the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        yield


def run_sft(task: Task, seed: int, paths: dict[str, Path], out: Path) -> dict:
    """The SFT warm-up of one seed: trains, exports to ``<out>/sft/<task>-seed<seed>/export``,
    tests the SFT policy's solve rate; also prepares the seed's preference data for the methods."""
    import lightning as L

    from stepwise_lit.models.export import export_policy
    from stepwise_lit.models.loading import TinyModelConfig
    from stepwise_lit.module import StepwiseDPOModule

    quiet()
    start = time.perf_counter()
    root = out / "sft" / f"{task.name}-seed{seed}"
    with printed_to(out / "logs" / f"{task.name}-sft-seed{seed}.log"):
        L.seed_everything(seed, verbose=False)
        shape = TinyModelConfig(hidden_size=task.hidden_size, num_layers=2, num_heads=4, intermediate_size=3 * task.hidden_size)
        module = StepwiseDPOModule(tiny_model=shape, sft_warmup_steps=task.sft_steps, optimizer=adamw(task.sft_lr), **task.model)
        data_module(task, paths["preference"], None, seed, out / "cache", task.preference_batch_size).prepare_data()
        evaluation = solve_rate_callback(task)
        run = trainer(root, [evaluation], task.sft_steps)
        run.fit(module, datamodule=data_module(task, paths["sft"], None, seed, out / "cache"))
        export_policy(module, root / "export")
        run.test(module, datamodule=data_module(task, paths["val"], paths["test"], 0, out / "cache"), verbose=False)
    return {"task": task.name, "method": SFT_START, "seed": seed, "seconds": time.perf_counter() - start,
            "metrics": {"solve_rate": evaluation.results["solve_rate"]}}


def run_method(task: Task, name: str, seed: int, paths: dict[str, Path], out: Path, generator: str) -> dict:
    """One method's preference stage from the seed's SFT export, then its evaluation (see the module
    docstring); `generator`: the online methods' decoding backend (an import path)."""
    import lightning as L

    from stepwise_lit.module import StepwiseDPOModule
    from stepwise_lit.evaluation.report import StepRewardReport

    quiet()
    start = time.perf_counter()
    method = METHODS[name]
    root = out / "runs" / f"{task.name}-{name}-seed{seed}"
    settings = {**task.model, **method.settings}
    if method.sft_only:
        settings["sft_warmup_steps"] = task.preference_steps
    reports = {kind: root / "report" / kind for kind in ("val", "val_per_token", "test", "test_per_token")}
    evaluation = solve_rate_callback(task)
    with printed_to(out / "logs" / f"{task.name}-{name}-seed{seed}.log"):
        L.seed_everything(seed, verbose=False)
        module = StepwiseDPOModule(
            model_name_or_path=str(out / "sft" / f"{task.name}-seed{seed}" / "export"),
            optimizer=adamw(method.lr or task.preference_lr), **settings,
        )
        callbacks, settings_of_fit = [], {}
        if method.online is not None:
            callback, settings_of_fit = online_rounds(task, seed, generator, method.online)
            callbacks.append(callback)
        trainer(root, callbacks, task.preference_steps, **settings_of_fit).fit(
            module, datamodule=data_module(task, paths["preference"], None, seed, out / "cache", task.preference_batch_size)
        )
        trainer(root, [StepRewardReport(dirpath=str(reports["val"])),
                       StepRewardReport(dirpath=str(reports["val_per_token"]), per_token=True)]).validate(
            module, datamodule=data_module(task, paths["val"], paths["val"], 0, out / "cache"), verbose=False
        )
        thresholds = {kind: json.loads((reports[kind] / "report.json").read_text())["processbench"]["threshold"]
                      for kind in ("val", "val_per_token")}
        trainer(root, [evaluation, StepRewardReport(dirpath=str(reports["test"]), threshold=thresholds["val"]),
                       StepRewardReport(dirpath=str(reports["test_per_token"]), per_token=True,
                                        threshold=thresholds["val_per_token"])]).test(
            module, datamodule=data_module(task, paths["val"], paths["test"], 0, out / "cache"), verbose=False
        )
    test = json.loads((reports["test"] / "report.json").read_text())["metrics"]
    per_token = json.loads((reports["test_per_token"] / "report.json").read_text())["metrics"]
    metrics = {metric: test.get(metric) for metric in METRICS if metric in test}
    metrics["solve_rate"] = evaluation.results["solve_rate"]
    metrics["processbench_f1_per_token"] = per_token.get("processbench_f1")
    result = {"task": task.name, "method": name, "seed": seed, "seconds": time.perf_counter() - start,
              "metrics": metrics, "thresholds": thresholds, "settings": {**settings, "lr": method.lr or task.preference_lr}}
    if method.online is not None:  # per round: pairs, share of right samples, seconds
        summaries = [json.loads(path.read_text()) for path in sorted(
            (root / "online").glob("round-*/summary.json"), key=lambda path: int(path.parent.name.split("-")[1]))]
        result["online"] = {key: [summary[key] for summary in summaries]
                            for key in ("pairs", "reference_pairs", "sample_accuracy", "generation_s", "scoring_s", "training_s")}
    return result

