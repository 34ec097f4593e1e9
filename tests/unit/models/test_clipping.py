"""`clip_unscaled_gradients`: what the module clips with for a fused optimizer under mixed precision
(the fp16 GradScaler path, and bf16's, which has no scaler), against the float32 path by hand."""

from __future__ import annotations

import pytest
import torch

from stepwise_lit.models.clipping import clip_unscaled_gradients


def gradients(scaler: torch.amp.GradScaler | None = None, inf: bool = False) -> torch.nn.Linear:
    """A 4->3 linear layer (seed 0) with the gradients of a fixed loss, scaled by `scaler` (one made inf with `inf`)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    loss = (layer(torch.arange(8.0).reshape(2, 4)) ** 2).sum()
    (loss if scaler is None else scaler.scale(loss)).backward()
    if inf:
        layer.weight.grad[0, 0] = float("inf")
    return layer


def test_clip_unscaled_gradients_unscales_then_clips_for_the_fused_step():
    """The fp16 path (a GradScaler at 2**10, fused AdamW, as Lightning's 16-mixed on a GPU): the
    step equals the float32 one (clip_grad_norm_ on the true gradients, then the same fused step),
    the clipped total norm is 1; an inf gradient skips the step and leaves the weights."""
    reference = gradients()
    true_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    assert true_norm > 10, "the bound must bite"
    plain = torch.optim.AdamW(reference.parameters(), lr=0.1, fused=True)
    plain.step()

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = gradients(scaler)
    assert scaled.weight.grad.abs().max() > 100 * reference.weight.grad.abs().max(), "the gradients are scaled"
    optimizer = torch.optim.AdamW(scaled.parameters(), lr=0.1, fused=True)
    clip_unscaled_gradients(optimizer, 1.0, "norm", scaler)
    clipped_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in scaled.parameters()]))
    assert clipped_norm.item() == pytest.approx(1.0, abs=1e-5)
    scaler.step(optimizer)
    scaler.update()
    for after, expected in zip(scaled.parameters(), reference.parameters()):
        torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    broken = gradients(scaler, inf=True)
    before = [p.detach().clone() for p in broken.parameters()]
    optimizer = torch.optim.AdamW(broken.parameters(), lr=0.1, fused=True)
    clip_unscaled_gradients(optimizer, 1.0, "norm", scaler)
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(broken.parameters(), before))
    assert scaler.get_scale() == 2.0**9


def test_clip_unscaled_gradients_by_value_without_a_scaler():
    """bf16-mixed (no scaler): each gradient element clamped to [-0.5, 0.5], nothing rescaled."""
    layer = gradients()
    expected = [p.grad.clamp(-0.5, 0.5) for p in layer.parameters()]
    clip_unscaled_gradients(torch.optim.AdamW(layer.parameters(), fused=True), 0.5, "value", None)
    assert all(torch.equal(p.grad, e) for p, e in zip(layer.parameters(), expected))
