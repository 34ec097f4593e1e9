"""The command line: `python train.py fit --config configs/tiny.yaml` (LightningCLI)."""

from __future__ import annotations

import importlib
import os
import signal
import sys

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.errors import UserError
from stepwise_lit.export import HuggingFaceExport
from stepwise_lit.module import StepwiseDPOModule
from stepwise_lit.reports import StepRewardReport

TRACEBACK_FLAG = "--show_traceback"
CHECKPOINT_FOLDER = "checkpoints"  # under trainer.default_root_dir, unless a ModelCheckpoint names its dirpath


class StepwiseCLI(LightningCLI):
    """LightningCLI with the tokenizer settings linked from the model to the data module,
    CSV + TensorBoard loggers under `trainer.default_root_dir` unless the config names loggers,
    and the evaluation report of `validate`/`test` (`StepRewardReport`, settings under `report`;
    `--report.enabled=false` switches it off)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            ("model.tokenizer_name_or_path", "model.model_name_or_path"),
            "data.tokenizer_name_or_path",
            compute_fn=lambda tokenizer, model: tokenizer or model,
        )
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.add_argument(
            "--num_threads",
            type=int | None,
            default=None,
            help="Intra-op CPU threads for torch (torch.set_num_threads); null keeps torch's default. "
            "1 is fastest for tiny models, whose matrices are too small to split across cores.",
        )
        parser.add_lightning_class_args(StepRewardReport, "report")
        parser.add_lightning_class_args(HuggingFaceExport, "export")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        root = config.trainer.default_root_dir or os.getcwd()
        _fix_checkpoint_folders(config.trainer.callbacks, os.path.join(root, CHECKPOINT_FOLDER))
        if config.trainer.logger in (None, True):
            config.trainer.logger = [
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": root, "name": "csv"}},
                {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": root, "name": "tensorboard"}},
            ]


def _fix_checkpoint_folders(callbacks, folder: str) -> None:
    """Points every `ModelCheckpoint` that names no `dirpath` at `folder`, so a later run finds
    its `last.ckpt` for `--ckpt_path last` (Lightning's default folder changes with each logger
    version). `callbacks` is the parsed `trainer.callbacks`: None, one callback or a list."""
    if callbacks is None:
        return
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        module_name, _, class_name = callback.class_path.rpartition(".")
        is_checkpoint = issubclass(getattr(importlib.import_module(module_name), class_name), ModelCheckpoint)
        if is_checkpoint and callback.init_args.get("dirpath") is None:
            callback.init_args.dirpath = folder


def main(args: list[str] | None = None) -> None:
    """Runs the CLI. Data and setting errors end with their one-paragraph message and exit
    code 2; pass `--show_traceback` to see the full traceback instead. A run stopped by SIGTERM
    exits with 143 once its checkpoint is saved."""
    argv = list(sys.argv[1:] if args is None else args)
    show_traceback = TRACEBACK_FLAG in argv
    argv = [a for a in argv if a != TRACEBACK_FLAG]
    try:
        StepwiseCLI(
            StepwiseDPOModule,
            StepwiseDataModule,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            args=argv,
        )
    except UserError as error:
        if show_traceback:
            raise
        print(f"error: {error}\n(run again with {TRACEBACK_FLAG} for the full traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:
        raise SystemExit(128 + signal.SIGTERM) from None


if __name__ == "__main__":
    main()
