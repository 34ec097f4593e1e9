"""`LossProbe`: training losses per step and the validation loss of a run, kept in this process or
written per rank (class path `tests.helpers.loss_probe.LossProbe` for runs in other processes)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class LossProbe(L.Callback):
    """Training losses per step and the validation loss, in this process or written to
    `<out_dir>/rank<r>.json` at the end of fit (for runs in other processes)."""

    def __init__(self, out_dir: str | None = None) -> None:
        self.out_dir = out_dir
        self.losses: list[float] = []
        self.val_loss: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.val_loss = float(trainer.callback_metrics["val/loss"])

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.out_dir is not None:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            record = {"losses": self.losses, "val_loss": self.val_loss,
                      "reference_model": bool(pl_module.reference.models())}
            (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
