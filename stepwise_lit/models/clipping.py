"""Gradient clipping for fused optimizers under mixed precision (docs/performance.md, "Mixed
precision").

Lightning's `MixedPrecision` plugin (``bf16-mixed``, ``16-mixed``) refuses to clip for an optimizer
that unscales inside its step (``fused=True`` AdamW, as the shipped configs use): for ``16-mixed``
Lightning skips its own ``scaler.unscale_`` for such an optimizer, so it would clip scaled
gradients. :func:`clip_unscaled_gradients` unscales first itself (``GradScaler.unscale_``, which
torch supports for fused optimizers: their step then takes the gradients as unscaled and still
skips on the inf/NaN that ``unscale_`` found) and then clips as Lightning does; under ``bf16-mixed``
there is no scaler and nothing to unscale. The fused kernel stays.
"""

from __future__ import annotations

import torch


def clip_unscaled_gradients(
    optimizer: torch.optim.Optimizer,
    clip_val: float,
    algorithm: str,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Unscales the gradients of ``optimizer``'s parameters (when ``scaler`` is given) and clips them.

    Args:
        optimizer: The optimizer whose ``param_groups`` hold the parameters.
        clip_val: The bound: the total 2-norm (``"norm"``) or each element's magnitude (``"value"``).
        algorithm: ``"norm"`` or ``"value"`` (Lightning's ``gradient_clip_algorithm``).
        scaler: The precision plugin's gradient scaler (``16-mixed``), or None (``bf16-mixed``).
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(parameters, clip_val)
    else:
        torch.nn.utils.clip_grad_norm_(parameters, clip_val)
