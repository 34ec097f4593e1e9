"""Memory-lean paths of StepwiseDPOModule: `lean_logps` gives the plain path's losses and
gradients (which models it serves: tests/test_lean_architectures.py); gradients are freed right
after the optimizer step."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.models.loading import LoraSettings, TinyModelConfig
from stepwise_lit.module import StepwiseDPOModule

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def datamodule() -> StepwiseDataModule:
    datamodule = StepwiseDataModule(path="synthetic", synthetic_train_size=6, synthetic_val_size=2, batch_size=3,
                                    max_length=256)
    datamodule.setup("fit")
    return datamodule


def loss_and_grads(batch: dict, **settings) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and trainable gradients of one batch's objective, the policy nudged off the reference."""
    torch.manual_seed(0)
    module = StepwiseDPOModule(tiny_model=TINY, **settings)
    module.configure_model()
    with torch.no_grad():
        for parameter in module.policy.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn_like(parameter))
    out = module.objective(batch, batch["step_scores"])
    out.loss.backward()
    return out.loss.detach(), [p.grad for p in module.policy.parameters() if p.requires_grad]


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4)], ids=["full", "lora"])
def test_lean_logps_give_the_plain_losses_and_gradients(datamodule, lora):
    batch = next(iter(datamodule.train_dataloader()))
    plain_loss, plain_grads = loss_and_grads(batch, lora=lora)
    lean_loss, lean_grads = loss_and_grads(batch, lora=lora, lean_logps=True)
    assert plain_loss.item() != pytest.approx(0.6931, abs=1e-4)  # the policy really differs from the reference
    torch.testing.assert_close(lean_loss, plain_loss, rtol=0, atol=1e-6)
    for lean, plain in zip(lean_grads, plain_grads, strict=True):
        torch.testing.assert_close(lean, plain, rtol=1e-4, atol=1e-6)


class GradientProbe(L.Callback):
    """Whether any policy gradient is still held when a training step has ended."""

    def __init__(self) -> None:
        self.held = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.held.append(any(p.grad is not None for p in pl_module.policy.parameters()))


def test_gradients_are_freed_after_the_optimizer_step(datamodule, tmp_path):
    probe = GradientProbe()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=[probe])
    trainer.fit(StepwiseDPOModule(tiny_model=TINY), datamodule=datamodule)
    assert probe.held == [False, False]
