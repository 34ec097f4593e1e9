"""The command line: ``stepwise-lit <command>``, one console script for the seven commands.

    stepwise-lit fit --config configs/tiny.yaml        # also: python train.py fit --config configs/tiny.yaml
    stepwise-lit prepare --data.path synthetic --num_pairs 100 --output pairs.jsonl
    stepwise-lit score --config configs/score_tiny.yaml --input pairs.jsonl --output scored.jsonl
    stepwise-lit evaluate --config configs/tiny.yaml --ckpt_path last.ckpt --output eval

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's (`StepwiseCLI`); ``prepare``,
``score`` and ``evaluate`` are the `main` of `stepwise_lit.prepare`, `stepwise_lit.score` and
`stepwise_lit.evaluate` (also ``python -m stepwise_lit.<command>``). Shared settings are spelled the
same in each: ``--config``, ``--seed_everything``, ``--trainer.accelerator``/``--trainer.devices``,
``--data.*``, ``--model.*``, ``--show_traceback``.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
from pathlib import Path

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from stepwise_lit import evaluate, prepare, score
from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.errors import (
    TRACEBACK_FLAG,
    TRACEBACK_HELP,
    RefusalNamer,
    SettingError,
    check_writable_folder,
    exit_on_user_error,
)
from stepwise_lit.evaluation.generation import SolveRateEvaluation
from stepwise_lit.evaluation.report import StepRewardReport
from stepwise_lit.imports import import_callable
from stepwise_lit.models.export import HuggingFaceExport
from stepwise_lit.module import StepwiseDPOModule
from stepwise_lit.online.training import OnlineRounds
from stepwise_lit.rewards.base import StepScorer

logger = logging.getLogger("stepwise_lit")

PROG = "stepwise-lit"
"""The console script (pyproject.toml); the commands' usage lines read ``stepwise-lit <command>``."""
COMMANDS = {
    "fit": "train the policy with the stepwise DPO losses (LightningCLI: --config, --model.*, --data.*, --trainer.*)",
    "validate": "losses and preference metrics on the validation split, with the evaluation report",
    "test": "losses and preference metrics on the test split, with the evaluation report",
    "predict": "implicit rewards of each pair and each step of the validation split",
    "prepare": "convert a raw source (or the embedded task) to canonical preference pairs on disk",
    "score": "fill the step scores of canonical pairs with a step scorer (resumable)",
    "evaluate": "solve rates of a policy and/or ProcessBench error localisation of a step scorer",
}
"""Each command and its line in ``stepwise-lit --help``."""
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
"""The commands LightningCLI runs (the Trainer's methods)."""
CHECKPOINT_FOLDER = "checkpoints"  # under trainer.default_root_dir, unless a ModelCheckpoint names its dirpath
RESOLVED_BY_LIGHTNING = ("best", "hpc")  # special --ckpt_path values Lightning checks itself


class StepwiseCLI(LightningCLI):
    """LightningCLI with the tokenizer settings linked from the model to the data module,
    CSV + TensorBoard loggers under `trainer.default_root_dir` unless the config names loggers,
    the evaluation report of `validate`/`test` (`StepRewardReport`, settings under `report`;
    `--report.enabled=false` switches it off), the generation evaluation (`SolveRateEvaluation`,
    settings under `evaluation`, off by default) and the Hugging Face export at the end of `fit`
    (`HuggingFaceExport`, settings under `export`), and online rounds of generate → verify → pair → train
    (`OnlineRounds`, settings under `online`, off by default).

    Before any model is loaded it checks what a user names: the `--config` files (valid YAML,
    in `main`), `--ckpt_path` (a readable checkpoint; `last` must find one where this CLI's
    checkpoints land), `trainer.default_root_dir` (writable) and the optimizer and scheduler
    settings; see `parse_arguments` and `before_instantiate_classes`. `validate`/`test`/`predict`
    of the embedded model without `--ckpt_path` run (an untrained baseline is a fair question)
    but log a warning that the model is random. A step scorer (``model.reward_model``,
    ``evaluation.verifier``, ``online.verifier``) that refuses its settings while it is built (a checkpoint
    without its head, a missing folder) ends with one message naming that setting (`RefusalNamer`)."""

    def __init__(self, *args, **kwargs) -> None:
        self.refusals = RefusalNamer()
        super().__init__(*args, **kwargs)

    def add_default_arguments_to_parser(self, parser) -> None:
        super().add_default_arguments_to_parser(parser)
        parser.add_argument(TRACEBACK_FLAG, action="store_true", help=TRACEBACK_HELP)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            ("model.tokenizer_name_or_path", "model.model_name_or_path"),
            "data.tokenizer_name_or_path",
            compute_fn=lambda tokenizer, model: tokenizer or model,
        )
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.add_instantiator(self.refusals, StepScorer)
        parser.add_argument(
            "--num_threads",
            type=int | None,
            default=None,
            help="Intra-op CPU threads for torch (torch.set_num_threads); null keeps torch's default. "
            "1 is fastest for tiny models, whose matrices are too small to split across cores.",
        )
        parser.add_lightning_class_args(SolveRateEvaluation, "evaluation")
        parser.add_lightning_class_args(StepRewardReport, "report")
        parser.add_lightning_class_args(HuggingFaceExport, "export")
        parser.add_lightning_class_args(OnlineRounds, "online")

    def parse_arguments(self, parser, args) -> None:
        """Parses, points checkpoints at one folder, then checks `--ckpt_path` before Lightning reads
        it (LightningCLI loads the checkpoint's hyperparameters right after parsing).

        Raises:
            SettingError: For a `--ckpt_path` that does not exist, cannot be read, or is `last`
                with no last checkpoint in the checkpoint folder.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        folder = os.path.join(config.trainer.default_root_dir or os.getcwd(), CHECKPOINT_FOLDER)
        if config.trainer.enable_checkpointing is not False:
            config.trainer.callbacks = with_checkpoint_callback(config.trainer.callbacks, folder)
        check_ckpt_path(config.get("ckpt_path"), checkpoint_folders(config.trainer.callbacks))

    def instantiate_classes(self) -> None:
        """LightningCLI's; a step scorer that refuses its settings raises `SettingError` naming them."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.refusals.instantiate(super().instantiate_classes, config)

    def before_instantiate_classes(self) -> None:
        """Applies `num_threads`, checks that `trainer.default_root_dir` can be written and that
        the optimizer and scheduler accept their settings, adds the default loggers, and warns
        when `validate`/`test`/`predict` would evaluate a randomly initialised model.

        Raises:
            SettingError: If `trainer.default_root_dir` cannot be created or written, or the
                optimizer or scheduler rejects its settings.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        # The module's hparams name the tokenizer it uses, as the link gave it to the data module.
        config.model.tokenizer_name_or_path = config.data.tokenizer_name_or_path
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        root = config.trainer.default_root_dir or os.getcwd()
        check_writable_folder(root, "trainer.default_root_dir")
        if config.trainer.logger in (None, True):
            config.trainer.logger = [
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": root, "name": "csv"}},
                {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": root, "name": "tensorboard"}},
            ]
        check_optimizer(config.model.optimizer, config.model.scheduler)
        evaluates = self.subcommand in ("validate", "test", "predict")
        if evaluates and config.ckpt_path is None and config.model.model_name_or_path is None and rank_zero_only.rank == 0:
            logger.warning(
                "%s without --ckpt_path and without model.model_name_or_path evaluates the randomly "
                "initialised embedded model; pass --ckpt_path to evaluate a trained one",
                self.subcommand,
            )


def is_checkpoint_callback(callback: Namespace) -> bool:
    """Whether a parsed callback (`class_path` + `init_args`) is a `ModelCheckpoint`."""
    return issubclass(import_callable(callback.class_path, "trainer.callbacks"), ModelCheckpoint)


def with_checkpoint_callback(callbacks, folder: str) -> list[Namespace]:
    """The parsed `trainer.callbacks` as a list in which every `ModelCheckpoint` writes to a known
    folder: one that names no `dirpath` gets `folder`, and with no `ModelCheckpoint` at all one
    is added there (with `save_last: true`, so `--ckpt_path last` resumes). Without this,
    Lightning's default folder changes with each logger version and `last` never finds it.

    Args:
        callbacks: The parsed `trainer.callbacks`: None, one callback or a list.
        folder: `<default_root_dir>/checkpoints`.
    """
    callbacks = [] if callbacks is None else callbacks if isinstance(callbacks, list) else [callbacks]
    checkpoints = [callback for callback in callbacks if is_checkpoint_callback(callback)]
    for callback in checkpoints:
        if callback.init_args.get("dirpath") is None:
            callback.init_args.dirpath = folder
    if not checkpoints:
        default = Namespace(dirpath=folder, save_last=True)
        callbacks.append(Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=default))
    return callbacks


def checkpoint_folders(callbacks) -> list[str]:
    """The `dirpath` of every parsed `ModelCheckpoint` in `callbacks` (None, one or a list)."""
    callbacks = [] if callbacks is None else callbacks if isinstance(callbacks, list) else [callbacks]
    return [callback.init_args.dirpath for callback in callbacks if is_checkpoint_callback(callback)]


def check_ckpt_path(ckpt_path: str | None, folders: list[str]) -> None:
    """Fails on a `--ckpt_path` Lightning would not load, before anything is built.

    `last` must find a `last*.ckpt` in one of `folders` (Lightning would otherwise start from
    scratch without a word); a path must exist, and a file must open as a checkpoint
    (memory-mapped, so only its index is read). `best`, `hpc`, registry names and remote URLs are
    left to Lightning.

    Args:
        ckpt_path: The `--ckpt_path` setting.
        folders: Where the run's `ModelCheckpoint` callbacks write.

    Raises:
        SettingError: Naming `ckpt_path`, the file or folders, and the problem.
    """
    if ckpt_path is None or ckpt_path in RESOLVED_BY_LIGHTNING or str(ckpt_path).startswith("registry"):
        return
    if "://" in str(ckpt_path):  # a remote file system (s3://, gs://...): Lightning's fsspec reads it
        return
    if ckpt_path == "last":
        if not any(any(Path(folder).glob("last*.ckpt")) for folder in folders):
            searched = ", ".join(folders) or "nowhere: checkpointing is off (trainer.enable_checkpointing)"
            raise SettingError(
                f"ckpt_path: 'last' found no last checkpoint (last*.ckpt) in {searched}; "
                "leave --ckpt_path out to start a new run, or name a checkpoint file"
            )
        return
    path = Path(ckpt_path)
    if not path.exists():
        raise SettingError(f"ckpt_path: {ckpt_path} does not exist")
    if path.is_file():
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as error:
            raise SettingError(
                f"ckpt_path: {ckpt_path} cannot be read as a checkpoint (truncated or corrupt?): {error}"
            ) from error


def check_optimizer(optimizer, scheduler) -> None:
    """Builds the configured optimizer and scheduler over one dummy parameter, so a value they
    reject (a negative learning rate, an unknown argument) stops before any model is loaded.

    Args:
        optimizer: The parsed `model.optimizer` (`class_path` + `init_args`, or a default callable).
        scheduler: The parsed `model.scheduler`, or None.

    Raises:
        SettingError: Naming `model.optimizer` or `model.scheduler` and the problem.
    """
    if not isinstance(optimizer, Namespace):
        return
    optimizer_class = import_callable(optimizer.class_path, "model.optimizer")
    try:
        built = optimizer_class([torch.nn.Parameter(torch.zeros(1))], **optimizer.get("init_args", {}))
    except (ValueError, TypeError) as error:
        raise SettingError(f"model.optimizer: {optimizer.class_path}: {error}") from error
    if not isinstance(scheduler, Namespace):
        return
    scheduler_class = import_callable(scheduler.class_path, "model.scheduler")
    try:
        scheduler_class(built, **scheduler.get("init_args", {}))
    except (ValueError, TypeError) as error:
        raise SettingError(f"model.scheduler: {scheduler.class_path}: {error}") from error


def check_config_files(argv: list[str]) -> None:
    """Fails on a `--config` file that is not valid YAML, naming the file and the line (the
    parser's own message names neither the file nor, for some errors, the right line).

    Raises:
        SettingError: Naming `--config`, the file and the YAML problem.
    """
    paths = [value for flag, value in zip(argv, argv[1:]) if flag in ("--config", "-c")]
    paths += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    for path in paths:
        if Path(path).is_file():
            try:
                yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                problem = " ".join(str(error).split())  # one paragraph
                raise SettingError(f"--config: {path} is not valid YAML: {problem}") from error


def run_cli(args: list[str] | None, argv: list[str]) -> StepwiseCLI:
    """Checks the config files of `argv`, then parses, builds and runs the subcommand."""
    check_config_files(argv)
    return StepwiseCLI(
        StepwiseDPOModule,
        StepwiseDataModule,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": PROG},
        args=args,  # None: LightningCLI reads sys.argv (passing it again would warn)
    )


class CurrentStderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever `sys.stderr` is when a record is emitted (not the
    stream of the moment it was made), so a caller that swaps stderr still sees the messages."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_package_log() -> None:
    """Prints the ``stepwise_lit`` logger's INFO and above on stderr (once per process), without
    changing what other libraries log."""
    if not logger.handlers:
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def command_help() -> str:
    """What ``stepwise-lit --help`` prints: the commands, one line each."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, summary in COMMANDS.items()]
    return "\n".join([
        f"usage: {PROG} <command> [options]", "",
        "Stepwise DPO with PyTorch Lightning: training, data preparation, step scoring, evaluation.", "",
        "commands:", *lines, "",
        f"`{PROG} <command> --help` lists the options of a command.",
    ])


def unknown_command(command: str | None) -> SystemExit:
    """Prints which commands there are (on stderr) for a missing or unknown one; exit code 2."""
    problem = "no command given" if command is None else f"unknown command {command!r}"
    print(f"{PROG}: error: {problem}; choose one of {', '.join(COMMANDS)} ({PROG} --help describes them)",
          file=sys.stderr)
    return SystemExit(2)


def main(args: list[str] | None = None) -> None:
    """Runs ``stepwise-lit <command> [options]`` (`args`: the command line without the program name;
    None reads `sys.argv`): ``prepare``, ``score`` and ``evaluate`` go to those modules' `main` with
    the rest of the line; ``fit``, ``validate``, ``test``, ``predict`` (and top-level options such as
    LightningCLI's ``--config`` before the command) to `StepwiseCLI`. ``--help`` (or ``-h``) alone
    lists the commands; a missing or unknown command exits with code 2, naming the commands.

    Data and setting errors end with their one-paragraph message and exit code 2 (see
    `stepwise_lit.errors.exit_on_user_error`); `--show_traceback` shows the traceback instead.
    A run stopped by SIGTERM exits with 143 once its checkpoint is saved. The package's own
    messages (``stepwise_lit`` logger: rows cut or skipped by count, the online rounds' figures)
    are shown from INFO up, on stderr."""
    argv = sys.argv[1:] if args is None else list(args)
    command = argv[0] if argv else None
    tools = {"prepare": prepare.main, "score": score.main, "evaluate": evaluate.main}
    if command in tools:
        return tools[command](argv[1:])
    if command in ("-h", "--help"):
        print(command_help())
        return
    if command is None or not (command in TRAINER_COMMANDS or command.startswith("-")):
        raise unknown_command(command)
    show_package_log()
    try:
        exit_on_user_error(lambda: run_cli(args, argv), argv)
    except SIGTERMException:
        raise SystemExit(128 + signal.SIGTERM) from None


if __name__ == "__main__":
    main()
