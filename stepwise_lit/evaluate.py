"""``stepwise-lit evaluate``: solve rates of a policy and error localisation of a step scorer
(``python -m stepwise_lit.evaluate`` is the same command).

Two evaluations, either or both in one run, into ``<output>/report.json``:

- **Generation** (when a policy is named): greedy (or sampled) solutions to the prompts of
  ``data.path``, graded by the final answer (``solve_rate``, ``pass_at_k``, ``maj_at_k``; with
  ``evaluation.verifier`` the share of generated steps it flags). The policy is an exported or
  Hugging Face folder (``model.model_name_or_path``), or the weights of a training checkpoint
  (``ckpt_path``) in the model a train.py config describes (``model.*``).
- **Error localisation** (when ``labelled.path`` is set): any ``scorer`` (a
  :class:`~stepwise_lit.rewards.base.StepScorer`) scores labelled responses; ProcessBench
  ``error_acc``, ``correct_acc``, ``processbench_f1`` and ``within_response_auroc`` at a threshold
  given or chosen on a validation part (:mod:`stepwise_lit.evaluation.localisation`).

Settings carry train.py's names (``model.*``, ``data.*``, ``evaluation.*``, ``trainer.accelerator``
and ``trainer.devices``), so ``--config`` takes a train.py YAML as it is, or the config LightningCLI
saved in a run (its ``report``, ``export`` and ``online`` sections, the rest of ``trainer``,
``model.reward_model``, ``evaluation.enabled`` and ``during_fit`` are not used), or a YAML of this
command's own settings; flags after it override it. The command runs on one device: the first
that ``trainer.accelerator`` and ``trainer.devices`` select, as the Trainer reads them. An export's
``stepwise_config.json`` gives the ``data.*`` defaults (the run's data, prompt template and
length). The prompts are every row of ``data.path`` (a file, data folder or hub id, read with
``data.format``); ``data.path`` null or ``synthetic`` means the embedded task's held-out problems
(the data module's validation split: the ``synthetic_val_size`` pairs after the training ones).
Prompts are formatted and cut as training formats them (``data.use_step_wise_prompt``,
``data.step_wise_prompt_template``, ``data.apply_chat_template``, ``data.system_prompt``,
``data.max_prompt_length`` from the left).

Bad options or data end with one paragraph naming the setting, file and line, exit code 2, before
any model is loaded where that can be known by then.
"""

from __future__ import annotations

import json
import logging
import pickle
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.fabric import Fabric
from lightning.fabric.utilities.exceptions import MisconfigurationException

from stepwise_lit.data.chat import check_prompt_format, prompt_format_of
from stepwise_lit.data.datamodule import StepwiseDataModule, check_data_settings
from stepwise_lit.data.heldout import held_out_problems
from stepwise_lit.data.sources import SYNTHETIC
from stepwise_lit.data.tokenizer import load_tokenizer
from stepwise_lit.errors import (
    TRACEBACK_FLAG,
    TRACEBACK_HELP,
    SettingError,
    check_writable_folder,
    exit_on_user_error,
    instantiate_naming_refusals,
)
from stepwise_lit.evaluation.generation import (
    GenerationMetrics,
    SolveRateEvaluation,
    evaluate_problems,
    examples,
)
from stepwise_lit.evaluation.localisation import (
    LabelledSettings,
    check_labelled_settings,
    localise,
    read_responses,
)
from stepwise_lit.evaluation.report import REPORT_FILE
from stepwise_lit.models.export import MARKER
from stepwise_lit.models.generate import generator_class
from stepwise_lit.models.loading import (
    DTYPES,
    TINY_MODEL_RNG_KEY,
    TinyModelConfig,
    apply_lora,
    frozen_state_keys,
    load_causal_lm,
)
from stepwise_lit.module import POLICY_PREFIX, StepwiseDPOModule
from stepwise_lit.rewards.base import StepScorer

log = logging.getLogger("stepwise_lit")

EXPORT_DATA_SKIPPED = ("tokenizer_name_or_path", "cache_dir")  # the exporting machine's, not this one's
IGNORED_SECTIONS = ("report", "export", "online")  # train.py config sections this command does not use


def build_parser() -> ArgumentParser:
    """The options of ``stepwise-lit evaluate``: train.py's ``model``, ``data`` and
    ``evaluation`` settings, ``ckpt_path``, and the command's own (``scorer``, ``labelled``, ``output``)."""
    parser = ArgumentParser(
        prog="stepwise-lit evaluate",
        description="Solve rate of a policy on a data file's prompts and/or ProcessBench error localisation of a "
        "step scorer on labelled responses; writes <output>/report.json.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a train.py YAML config, or one of these options")
    parser.add_class_arguments(StepwiseDPOModule, "model", instantiate=False, fail_untyped=False, sub_configs=True)
    parser.add_class_arguments(StepwiseDataModule, "data", instantiate=False)
    parser.set_defaults({"data.require_scores": False})
    parser.add_class_arguments(SolveRateEvaluation, "evaluation", sub_configs=True)
    parser.add_argument("--ckpt_path", type=str | None, default=None,
                        help="a training checkpoint (.ckpt) whose policy weights go into the model that model.* describes")
    parser.add_subclass_arguments(StepScorer, "scorer", required=False, help="step scorer for labelled.path")
    parser.add_class_arguments(LabelledSettings, "labelled")
    parser.add_argument("--output", type=str, required=True, help="folder for report.json (created; never overwritten)")
    parser.add_argument("--trainer", type=dict | None, default=None,
                        help="train.py's trainer section; only --trainer.accelerator (default auto) and "
                        "--trainer.devices (default auto) are used, as the Trainer reads them: evaluate runs on "
                        "the first device they select")
    parser.add_argument("--num_threads", type=int | None, default=None, help="torch.set_num_threads; null: torch's default")
    parser.add_argument("--seed_everything", type=int | bool | None, default=None,
                        help="ignored (train.py's); see evaluation.generation.seed")
    parser.add_argument("--weights_only", type=bool | None, default=None,
                        help="ignored: checkpoints are always read with weights_only")
    for section in IGNORED_SECTIONS:
        parser.add_argument(f"--{section}", type=dict | None, default=None, help=f"ignored (train.py's {section} section)")
    parser.add_argument(TRACEBACK_FLAG, action="store_true", help=TRACEBACK_HELP)
    return parser


def exported_data_settings(model: str | None) -> dict:
    """The data settings of the run an export came from (its ``stepwise_config.json``), without the
    machine-specific ones; {} for any other model source."""
    marker = Path(model).expanduser() / MARKER if model else None
    if marker is None or not marker.is_file():
        return {}
    data = json.loads(marker.read_text()).get("data") or {}
    return {key: value for key, value in data.items() if key not in EXPORT_DATA_SKIPPED}


def parse_options(parser: ArgumentParser, args: Sequence[str]) -> Namespace:
    """Parses the options; an export named by ``model.model_name_or_path`` (without ``ckpt_path``)
    gives the ``data.*`` defaults, which a config and flags override."""
    config = parser.parse_args(args)
    trained = {} if config.ckpt_path else exported_data_settings(config.model.model_name_or_path)
    known = {key: value for key, value in trained.items() if key in config.data}
    if not known:
        return config
    parser.set_defaults({f"data.{key}": value for key, value in known.items()})
    return parser.parse_args(args)


def check_options(config: Namespace) -> None:
    """Fails on options that cannot work, before anything is read or loaded.

    Raises:
        SettingError: Naming the option.
    """
    generates, localises = names_policy(config), config.labelled.path is not None
    if localises and config.scorer is None:
        raise SettingError(
            f"scorer: labelled.path {config.labelled.path} is set but no step scorer is (e.g. --scorer ArithmeticStepVerifier)"
        )
    if config.scorer is not None and not localises:
        raise SettingError("labelled.path: a scorer is set but no labelled responses to score")
    if not generates and not localises:
        raise SettingError(
            "model.model_name_or_path: nothing to evaluate; name a policy (model.model_name_or_path, or a train.py "
            "config with ckpt_path) for solve rates, and/or labelled.path with a scorer for error localisation"
        )
    if localises:
        check_labelled_settings(config.labelled)
        if not Path(config.labelled.path).is_file():
            raise SettingError(f"labelled.path: {config.labelled.path} is not a file")
    if generates:
        check_data_settings(config.data)
    path = config.ckpt_path
    if path is not None and not Path(path).is_file():
        raise SettingError(f"ckpt_path: {path} {'is not a file' if Path(path).exists() else 'does not exist'}")
    report = Path(config.output) / REPORT_FILE
    if report.exists():
        raise SettingError(f"output: {report} exists; name a new folder (evaluate never overwrites a report)")
    check_writable_folder(config.output, "output")


def names_policy(config: Namespace) -> bool:
    """Whether the options name a policy to generate with (a model source or a checkpoint)."""
    return config.ckpt_path is not None or config.model.model_name_or_path is not None


def problem_rows(data: Namespace) -> tuple[list[dict], str]:
    """The canonical rows whose prompts are evaluated, and where they come from.

    ``data.path`` a file, folder or hub id: every row (read as the data module reads it); null or
    ``synthetic``: the embedded validation split (as ``StepwiseDataModule.canonical_splits``).
    Rows only: the prompts are rendered later with the policy's tokenizer, so the data module here
    has the byte tokenizer and no system prompt to check against it.
    """
    settings = {**data.as_dict(), "require_scores": False, "tokenizer_name_or_path": None, "system_prompt": None}
    datamodule = StepwiseDataModule(**settings)
    if data.path in (None, SYNTHETIC):
        return datamodule.canonical_splits()[1], f"synthetic validation split (seed {data.seed})"
    return datamodule.canonical_rows(datamodule.sources[0]), data.path


def checkpoint_policy_weights(path: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The policy's tensors of a StepwiseDPOModule checkpoint (``state_dict`` keys ``policy.*``, prefix
    removed; a LoRA checkpoint's hold only the adapter) and the RNG state its embedded model was built
    from (`TINY_MODEL_RNG_KEY`, or None), read with ``weights_only=True`` and memory-mapped, so only
    these tensors are read.

    Raises:
        SettingError: Naming ``ckpt_path`` for a file that is not such a checkpoint.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as error:
        raise SettingError(f"ckpt_path: {path} cannot be read as a checkpoint (truncated or corrupt?): {error}") from error
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    weights = {key[len(POLICY_PREFIX):]: value for key, value in (state or {}).items() if key.startswith(POLICY_PREFIX)}
    if not weights:
        raise SettingError(
            f"ckpt_path: {path} holds no policy weights (no 'policy.*' in its state_dict): not a checkpoint of train.py"
        )
    return weights, checkpoint.get(TINY_MODEL_RNG_KEY)


def load_policy(model: Namespace, ckpt_path: str | None) -> tuple[torch.nn.Module, object]:
    """The policy and its tokenizer: ``model.*`` builds the model (an export, a hub model, or the embedded
    tiny model), then a checkpoint's policy weights replace its own (LoRA adapters merged after loading).
    A LoRA checkpoint holds only the adapter: the base is the model ``model.*`` describes (the embedded
    one built from the RNG state the checkpoint keeps, as in training).

    Raises:
        SettingError: Naming ``model.model_name_or_path`` for a source that cannot be loaded, or
            ``ckpt_path`` for weights that do not fit the model ``model.*`` describes.
    """
    source = model.tokenizer_name_or_path or model.model_name_or_path
    setting = "model.tokenizer_name_or_path" if model.tokenizer_name_or_path else "model.model_name_or_path"
    tokenizer = load_tokenizer(source, model.trust_remote_code, setting=setting)
    dtype = DTYPES[model.dtype] if model.dtype else None
    tiny = model.tiny_model or TinyModelConfig()
    weights, rng_state = checkpoint_policy_weights(ckpt_path) if ckpt_path is not None else ({}, None)
    policy = load_causal_lm(model.model_name_or_path, tokenizer, tiny, model.trust_remote_code, dtype, rng_state=rng_state)
    if ckpt_path is None:
        return policy.eval(), tokenizer
    if model.lora is not None:
        policy = apply_lora(policy, model.lora)
    try:
        missing, unexpected = policy.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        raise SettingError(f"ckpt_path: {ckpt_path} does not fit the model model.* describes: {error}") from error
    missing = [key for key in missing if key not in frozen_state_keys(policy)] if model.lora is not None else missing
    if missing or unexpected:
        raise SettingError(
            f"ckpt_path: {ckpt_path} does not fit the model model.* describes ({len(missing)} weights missing, "
            f"e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); give the config it was trained with"
        )
    if model.lora is not None:
        policy = policy.merge_and_unload()
    return policy.eval(), tokenizer


def generation_report(
    settings: Namespace, rows: Sequence[dict], data_source: str, evaluation: SolveRateEvaluation, device: torch.device
) -> dict:
    """Generates for the distinct prompts of `rows` and grades them (the report's top level).

    Args:
        settings: The instantiated options (``model``, ``ckpt_path``, ``data``).
        rows: Canonical rows (:func:`problem_rows`).
        data_source: Where they come from, for the report.
        evaluation: Answer source, prompt cap, generation settings, backend (``evaluation.generator``) and verifier.
        device: Where the policy generates (:func:`evaluation_device`).
    """
    backend = generator_class(evaluation.generator_name, "evaluation.generator")
    problems, without_reference = held_out_problems(
        [row["prompt"] for row in rows], [row["reference_solution"] for row in rows], [row["chosen_steps"] for row in rows],
        evaluation.source, evaluation.max_prompts,
    )
    if not problems:
        raise SettingError(f"data.path: none of the {len(rows)} rows of {data_source} has a reference solution or chosen steps")
    data = settings.data
    prompt_format = prompt_format_of(data.as_dict())
    policy, tokenizer = load_policy(settings.model, settings.ckpt_path)
    check_prompt_format(tokenizer, prompt_format)
    generator = backend(policy.to(device), tokenizer, prompt_format, data.max_prompt_length)
    generation = evaluation.generation
    metrics = GenerationMetrics(evaluation.source, generation.num_samples)
    verifier = evaluation.verifier
    completions = evaluate_problems(generator, problems, torch.ones(len(problems)), generation, metrics, verifier)
    return {
        "model": settings.model.model_name_or_path or "embedded",
        "checkpoint": settings.ckpt_path,
        "data": data_source,
        "source": evaluation.source,
        **metrics.compute(with_flags=verifier is not None),
        "rows_without_reference": without_reference,
        "generation": asdict(generation),
        "prompt": {**asdict(prompt_format), "max_prompt_length": data.max_prompt_length},
        "examples": examples(problems, completions, evaluation.source),
    }


def evaluation_device(trainer: dict | None) -> torch.device:
    """The device `trainer` (``accelerator`` and ``devices``, each ``auto`` when missing) selects, as
    `lightning.fabric.Fabric` (and the Trainer) read them; of several, the first.

    Raises:
        SettingError: Naming ``trainer.accelerator`` for a selection this machine cannot give.
    """
    trainer = trainer or {}
    accelerator, devices = trainer.get("accelerator", "auto"), trainer.get("devices", "auto")
    try:
        return Fabric(accelerator=accelerator, devices=devices).device
    except (MisconfigurationException, RuntimeError, ValueError, TypeError, ImportError) as error:
        raise SettingError(f"trainer.accelerator: {accelerator!r} with trainer.devices {devices!r}: {error}") from error


def run(parser: ArgumentParser, config: Namespace) -> dict:
    """Runs the evaluations the options ask for and writes ``<output>/report.json``; returns the report.

    Settings and data are checked and read before any model (scorer, verifier, policy) is loaded.
    """
    generates, localises = names_policy(config), config.labelled.path is not None
    device = evaluation_device(config.trainer) if generates else None
    check_options(config)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    rows, data_source = problem_rows(config.data) if generates else ([], None)
    responses = read_responses(config.labelled) if localises else []
    config.model.reward_model = None  # train.py's online scorer: not used here, never loaded
    settings = instantiate_naming_refusals(parser, config, StepScorer)
    report: dict = {}
    if generates:
        report.update(generation_report(settings, rows, data_source, settings.evaluation, device))
    if localises:
        report["processbench"] = localise(settings.scorer, responses, settings.labelled)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2))
    print(summary(report, output / REPORT_FILE))
    return report


def summary(report: dict, path: Path) -> str:
    """One line per evaluation for the terminal."""
    lines = []
    if "solve_rate" in report:
        rates = ", ".join(
            f"{name} {report[name]:.4f}" for name in ("solve_rate", "pass_at_k", "maj_at_k") if report[name] is not None
        )
        lines.append(f"evaluate: {report['num_prompts']:g} prompts, {rates}")
    if "processbench" in report:
        values = report["processbench"]
        scores = ", ".join(
            f"{name} {values[name]:.4f}" for name in ("processbench_f1", "error_acc", "correct_acc", "within_response_auroc")
            if values[name] is not None
        )
        lines.append(f"evaluate: {values['num_responses']} labelled responses, threshold {values['threshold']:g} "
                     f"({values['threshold_source']}): {scores}")
    return "\n".join([*lines, f"written to {path}"])


def main(args: Sequence[str] | None = None) -> None:
    """Runs ``stepwise-lit evaluate`` (`args`: without the program name; None reads
    ``sys.argv``). Bad options or data end with a one-paragraph message and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if args is None else list(args)
    parser = build_parser()
    exit_on_user_error(lambda: run(parser, parse_options(parser, argv)), argv)


if __name__ == "__main__":
    main()
