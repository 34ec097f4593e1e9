"""A callback for user-path tests: counts the runs of the policy's first decoder layer in each
training step and writes them, with the policy's and the reference's modes, to a JSON file at the
end of fit. A hook on the layer itself would not see a recompute (transformers checkpoints the
layer's `forward`, inside its hooks), so the count is of its attention's calls, made by every run
of the layer's `forward`, the one gradient checkpointing repeats in backward included."""

from __future__ import annotations

import json

import lightning as L

from stepwise_lit.models.distributed import decoder_layers


class LayerCallCounter(L.Callback):
    """Args:
        output: Where `on_train_end` writes ``{"calls": [...], "policy_training": [...],
            "reference_training": [...]}``, one entry per training step.
    """

    def __init__(self, output: str) -> None:
        self.output = output
        self.calls, self.policy_training, self.reference_training = [], [], []
        self.count = 0

    def on_train_start(self, trainer, pl_module) -> None:
        decoder_layers(pl_module.policy)[0].self_attn.register_forward_hook(self.count_call)

    def count_call(self, module, args, output) -> None:
        self.count += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.count = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.calls.append(self.count)
        self.policy_training.append(pl_module.policy.training)
        self.reference_training.append(pl_module.reference.model.training)

    def on_train_end(self, trainer, pl_module) -> None:
        with open(self.output, "w") as file:
            json.dump({"calls": self.calls, "policy_training": self.policy_training,
                       "reference_training": self.reference_training}, file)
