"""Golden runs: two optimizer steps and one validation of the tiny module on fixed synthetic
pairs, for each layout and each reference mode that runs on CPU, with and without LoRA.

What a run records (through a Trainer and a callback only, so it survives any internal move):
the training loss of each step, every metric Lightning holds at the end (`callback_metrics`:
train and val losses and epoch metrics), and the policy's gradients at the first optimizer step.

    python tests/golden.py     # (re)writes tests/golden/<case>.safetensors from the current code

The files were written from the code before the architecture move (issue 12); `test_golden.py`
checks the code of today against them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.models import LoraSettings, TinyModelConfig
from stepwise_lit.module import StepwiseDPOModule

GOLDEN = Path(__file__).resolve().parent / "golden"
TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
CASES: dict[str, dict] = {
    "copy": {},
    "copy_sft_warmup": {"sft_warmup_steps": 1, "sft_weight": 0.5},
    "none": {"reference": "none"},
    "precomputed": {"reference": "precomputed"},
    "copy_lora": {"lora": LORA},
    "adapter_lora": {"reference": "adapter", "lora": LORA},
    "step_bce_sum": {"step_loss_type": "step_bce", "aggregation_strategy": "sum", "outcome_loss_type": "margin"},
    "first_divergence": {"step_loss_type": "first_divergence", "outcome_loss_type": "sigmoid"},
}
LAYOUTS = {"unpacked": False, "packed": True}


class Recorder(L.Callback):
    """Losses per step, the first step's policy gradients."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.gradients: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.gradients:
            self.gradients = {
                f"grad/{name}": parameter.grad.detach().clone()
                for name, parameter in pl_module.policy.named_parameters()
                if parameter.requires_grad
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())


def run_case(case: str, layout: str, root: Path) -> dict[str, torch.Tensor]:
    """One golden run; returns every recorded tensor by name."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    datamodule = StepwiseDataModule(
        path="synthetic", synthetic_train_size=6, synthetic_val_size=4, batch_size=3, max_length=256,
        pack_pairs=LAYOUTS[layout], cache_dir=str(root / "cache"),
    )
    module = StepwiseDPOModule(
        tiny_model=TINY, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        **CASES[case],
    )
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[recorder], default_root_dir=str(root),
    )
    trainer.fit(module, datamodule)
    record = {f"metric/{name}": value.detach().float().reshape(()) for name, value in trainer.callback_metrics.items()}
    record["losses"] = torch.stack(recorder.losses)
    record.update(recorder.gradients)
    return record


def main() -> None:
    import tempfile

    GOLDEN.mkdir(exist_ok=True)
    for case in CASES:
        for layout in LAYOUTS:
            with tempfile.TemporaryDirectory() as root:
                record = run_case(case, layout, Path(root))
            save_file({k: v.contiguous() for k, v in record.items()}, GOLDEN / f"{case}-{layout}.safetensors")
            print(case, layout, "loss", record["losses"].tolist(), file=sys.stderr)


if __name__ == "__main__":
    main()
