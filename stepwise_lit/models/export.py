"""Hugging Face export of the policy at the end of fit, as a callback (settings `--export.*`).

An export folder holds the weights (safetensors), the tokenizer and `stepwise_config.json`
(the marker that tells a folder written by this package). An export replaces a previous
export of ours, atomically, and nothing else: a folder that holds anything else, or one that
is or contains the run's `default_root_dir` or a checkpoint folder, is refused before training
starts. Files and folders get the permissions the user's umask gives.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from stepwise_lit.errors import SettingError
from stepwise_lit.models.distributed import full_state_dict, is_sharded
from stepwise_lit.models.loading import apply_lora

log = logging.getLogger("stepwise_lit")

MARKER = "stepwise_config.json"
"""Written into every export; a folder with it is an export of ours, which a new export may replace."""


class HuggingFaceExport(L.Callback):
    """Exports the policy as a Hugging Face folder when `fit` finishes (see `export_policy`).

    Args:
        enabled: Export at the end of fit.
        dirpath: The export folder; None: ``<trainer.default_root_dir>/export``. It must not
            exist, be empty, or hold an earlier export of this package.
    """

    def __init__(self, enabled: bool = True, dirpath: str | None = None) -> None:
        self.enabled = enabled
        self.dirpath = dirpath

    def target(self, trainer: L.Trainer) -> Path:
        """The export folder of this run."""
        return Path(self.dirpath or os.path.join(trainer.default_root_dir, "export")).expanduser()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuses, before the first step, a folder the export must not replace."""
        if self.enabled:
            protected = [trainer.default_root_dir] + [cb.dirpath for cb in trainer.checkpoint_callbacks if cb.dirpath]
            check_export_target(self.target(trainer), protected)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            export_policy(pl_module, self.target(trainer), trainer)


def check_export_target(target: Path, protected: list[str | os.PathLike]) -> None:
    """Fails, naming ``export.dirpath``, unless `target` is free or an export of ours and
    neither is nor contains any of the `protected` folders (run root, checkpoint folders).

    Raises:
        SettingError: On a folder the export would wrongly replace.
    """
    resolved = target.resolve()
    for folder in protected:
        kept = Path(folder).expanduser().resolve()
        if kept == resolved or resolved in kept.parents:
            raise SettingError(
                f"export.dirpath: {target} is or contains {folder}, which holds this run's checkpoints or "
                "logs and an export replaces its folder; choose a folder of its own (e.g. <default_root_dir>/export)"
            )
    if target.exists() and not target.is_dir():
        raise SettingError(f"export.dirpath: {target} is a file, not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / MARKER).is_file():
        raise SettingError(
            f"export.dirpath: {target} holds files that are not an export of stepwise_lit (no {MARKER}), "
            "which an export would replace; choose an empty or new folder"
        )


def export_policy(module: L.LightningModule, target: str | os.PathLike, trainer: L.Trainer | None = None) -> Path:
    """Writes the policy of a `StepwiseDPOModule` as a Hugging Face folder: weights
    (safetensors), tokenizer, `stepwise_config.json` and `stepwise_config.pt`.

    Written to a staging folder beside `target` and renamed into place, so an interrupted export
    never leaves a folder that looks complete and keeps any previous export whole. With LoRA the
    adapter goes to `adapter/` and, when `lora.merge_on_export`, merged full weights to the root
    (loadable with `AutoModelForCausalLM.from_pretrained`). Under FSDP every rank gathers the
    weights; rank 0 writes.

    Args:
        module: The module whose policy is exported.
        target: The export folder.
        trainer: The run's trainer (needed under FSDP and on several ranks); None outside a run.

    Raises:
        SettingError: If `target` holds anything but an earlier export of ours.
    """
    target = Path(target)
    state_dict = gathered_policy_state_dict(module, trainer)
    if trainer is not None and not trainer.is_global_zero:
        return target
    check_export_target(target, [])
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_export(module, staging, state_dict, trainer)
        apply_umask(staging)
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("exported the policy to %s", target)
    return target


def gathered_policy_state_dict(module: L.LightningModule, trainer: L.Trainer | None) -> dict[str, torch.Tensor] | None:
    """The policy's full weights gathered on rank 0 when FSDP shards them (a collective: every
    rank calls it); None when every rank holds them whole."""
    return full_state_dict(trainer.strategy.model, prefix="policy.") if is_sharded(module.policy) else None


def write_export(
    module: L.LightningModule, folder: Path, state_dict: dict[str, torch.Tensor] | None, trainer: L.Trainer | None
) -> None:
    """Writes the export's files into `folder`; `state_dict` is the gathered policy under FSDP, else None."""
    lora = module.lora
    if lora is None:
        module.policy.save_pretrained(folder, state_dict=state_dict)
    else:
        module.policy.save_pretrained(folder / "adapter", state_dict=state_dict)
        if lora.merge_on_export:
            whole_policy(module, state_dict).merge_and_unload().save_pretrained(folder)
    module.tokenizer.save_pretrained(folder)
    config = stepwise_config(module, trainer)
    (folder / MARKER).write_text(json.dumps(config, indent=2, default=str))
    torch.save(json.loads(json.dumps(config, default=str)), folder / "stepwise_config.pt")


def stepwise_config(module: L.LightningModule, trainer: L.Trainer | None = None) -> dict:
    """The stepwise settings of the run: the module's and, with a trainer, its data module's."""
    config = {k: v for k, v in module.hparams.items() if k not in ("tiny_model", "lora")}
    config["tiny_model"] = asdict(module.tiny_model)
    config["lora"] = asdict(module.lora) if module.lora is not None else None
    datamodule = trainer.datamodule if trainer is not None else None
    if datamodule is not None:
        config["data"] = dict(datamodule.hparams)
    return config


def whole_policy(module: L.LightningModule, state_dict: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """An unsharded copy of the (PEFT) policy: a deep copy, or, when FSDP shards it, the policy
    rebuilt from its settings and loaded with the gathered `state_dict`."""
    if state_dict is None:
        return copy.deepcopy(module.policy)
    policy = apply_lora(module.build_base_model(module.hparams.model_name_or_path), module.lora)
    policy.load_state_dict(state_dict)
    return policy


def apply_umask(folder: Path) -> None:
    """Gives `folder` and everything in it the permissions the umask gives new files and folders
    (`tempfile.mkdtemp` makes a 0700 folder)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
