"""Pair packing: the packed layout by hand, and packed log-probs, losses and gradients equal to
the unpacked batch's (module level, plain and lean log-probs, sdpa and eager attention)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stepwise_lit.data.collate import StepwiseCollator
from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.data.packing import pack_pair, packed_attention_mask
from stepwise_lit.models.loading import TinyModelConfig
from stepwise_lit.errors import SettingError
from stepwise_lit.logprobs.forward import chosen_side, chosen_token_counts, packed_mask_for, step_logps
from stepwise_lit.module import StepwiseDPOModule
from stepwise_lit.objective.stepwise import sft_loss

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"


def test_pack_pair_layout_by_hand():
    """chosen  = [5, 6, 10, 11, 12, 9], steps [0, 0, 1, 1, 2, 2]
    rejected = [5, 6, 10, 13, 9],      steps [0, 0, 1, 1, 2]
    They share 3 tokens, so the row is [5 6 10 | 11 12 9 | 13 9]: the rejected rest restarts at
    position 3. Chosen token j is predicted at position j − 1. Rejected tokens 1, 2 are predicted
    at positions 0, 1 (prefix), token 3 (13) at the last prefix position 2, token 4 (9) at the
    position of token 3 in the packed row, 6."""
    packed = pack_pair([5, 6, 10, 11, 12, 9], [0, 0, 1, 1, 2, 2], [5, 6, 10, 13, 9], [0, 0, 1, 1, 2])
    assert packed["input_ids"] == [5, 6, 10, 11, 12, 9, 13, 9]
    assert packed["position_ids"] == [0, 1, 2, 3, 4, 5, 3, 4]
    assert packed["segment_ids"] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert [t[0] for t in packed["target_ids"]] == [6, 10, 11, 12, 9, 0, 0, 0]
    assert [t[0] for t in packed["target_step_ids"]] == [0, 1, 1, 2, 2, 0, 0, 0]
    assert [t[1] for t in packed["target_ids"]] == [6, 10, 13, 0, 0, 0, 9, 0]
    assert [t[1] for t in packed["target_step_ids"]] == [0, 1, 1, 0, 0, 0, 2, 0]


def test_pack_pair_edge_cases():
    """A rejected side that is a prefix of the chosen one has no rest; sides that share no token
    restart positions at 0 and nothing predicts the rejected side's first token."""
    prefix = pack_pair([1, 2, 3, 4], [0, 1, 1, 2], [1, 2, 3], [0, 1, 1])
    assert prefix["input_ids"] == [1, 2, 3, 4] and prefix["segment_ids"] == [0, 0, 0, 1]
    assert [t[1] for t in prefix["target_ids"]] == [2, 3, 0, 0]
    disjoint = pack_pair([1, 2], [0, 1], [7, 8], [0, 1])
    assert disjoint["input_ids"] == [1, 2, 7, 8] and disjoint["position_ids"] == [0, 1, 0, 1]
    assert [t[1] for t in disjoint["target_ids"]] == [0, 0, 8, 0]


def test_packed_attention_mask_by_hand():
    """Segments [0 0 0 1 1 1 2 2 3]: the chosen rest (3..5) sees the prefix and itself causally;
    the rejected rest (6, 7) sees the prefix and itself, never positions 3..5; padding (8) sees
    only itself (its own slot, -1). The additive form is 0 where the boolean one is True."""
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 3]])
    slots = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, -1]])
    mask = packed_attention_mask(segments, slots)
    assert mask.shape == (1, 1, 9, 9) and mask.dtype == torch.bool
    visible = {query: mask[0, 0, query].nonzero().flatten().tolist() for query in range(9)}
    assert visible[2] == [0, 1, 2]
    assert visible[4] == [0, 1, 2, 3, 4]
    assert visible[6] == [0, 1, 2, 6]
    assert visible[7] == [0, 1, 2, 6, 7]
    assert visible[8] == [8]
    additive = packed_attention_mask(segments, slots, torch.float32)
    assert torch.equal(additive == 0, mask)
    assert (additive[~mask] == torch.finfo(torch.float32).min).all()


def pair_rows(tmp_path, source: str, count: int) -> list[dict]:
    """The first `count` token rows of synthetic pairs (which share their steps up to the slip) or of
    GSM8K pairs (ground truth vs a model's incorrect solution: pairs that share only the question)."""
    if source == "synthetic":
        datamodule = StepwiseDataModule(
            path="synthetic", synthetic_train_size=8, synthetic_val_size=0, batch_size=count, max_length=256,
            cache_dir=str(tmp_path / "cache"),
        )
    else:
        datamodule = StepwiseDataModule(
            path=str(GSM8K), format="gsm8k", val_fraction=0.0, batch_size=count, max_length=512, require_scores=False,
            cache_dir=str(tmp_path / "cache"),
        )
    datamodule.setup("fit")
    return [datamodule.train_dataset[i] for i in range(count)]


def scored(*batches: dict) -> tuple[dict, ...]:
    """The batches with every row marked scored (scores are not what these tests are about)."""
    for batch in batches:
        batch["has_step_scores"][:] = True
    return batches


def batches(tmp_path, source: str) -> tuple[dict, dict]:
    """The same pairs collated unpacked and packed."""
    rows = pair_rows(tmp_path, source, 4)
    return scored(StepwiseCollator(0, pack_pairs=False)(rows), StepwiseCollator(0, pack_pairs=True)(rows))


def make_module(**settings) -> StepwiseDPOModule:
    torch.manual_seed(0)
    module = StepwiseDPOModule(tiny_model=TINY, **settings)
    module.configure_model()
    with torch.no_grad():  # a policy different from the reference, so log-ratios are not all 0
        for parameter in module.policy.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return module


def set_attention(module: StepwiseDPOModule, attention: str) -> None:
    """Policy and reference on the `attention` implementation."""
    for model in (module.policy, module.reference.model):
        model.set_attn_implementation(attention)


def assert_same_step_logps(module: StepwiseDPOModule, unpacked: dict, packed: dict) -> None:
    """The policy's per-step log-probs of the packed batch within atol = rtol = 1e-5 of the
    unpacked batch's, in pair order (none of the real steps' values is 0)."""
    num_steps = unpacked["step_mask"].shape[1]
    with torch.no_grad():
        expected = step_logps(module.policy, unpacked, num_steps, module.lean)
        actual = step_logps(module.policy, packed, num_steps, module.lean)
    assert (expected[unpacked["step_mask"]] != 0).all()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def assert_same_objective_and_gradients(module: StepwiseDPOModule, unpacked: dict, packed: dict) -> None:
    """The loss and the SFT loss within atol = rtol = 1e-5 and every policy gradient within atol 1e-5,
    rtol 1e-4; the step log-ratios, differences of two log-probs of ~100 in fp32, within 1e-4."""
    results = []
    for batch in (unpacked, packed):
        module.policy.zero_grad()
        out = module.objective(batch, batch["step_scores"])
        out.loss.backward()
        results.append((out, {k: p.grad.clone() for k, p in module.policy.named_parameters()}))
    (out_unpacked, grads_unpacked), (out_packed, grads_packed) = results
    assert out_unpacked.step_logratios.abs().max() > 0
    torch.testing.assert_close(out_packed.loss, out_unpacked.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_packed.sft_loss, out_unpacked.sft_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_packed.step_logratios, out_unpacked.step_logratios, atol=1e-4, rtol=1e-4)
    for name, grad in grads_unpacked.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(not GSM8K.exists(), reason="needs ../shared/data")
@pytest.mark.parametrize("source", ["synthetic", "gsm8k"])
@pytest.mark.parametrize("attention, lean", [("sdpa", False), ("sdpa", True), ("eager", False)])
def test_packed_batch_gives_the_unpacked_log_probs_loss_and_gradients(tmp_path, source, attention, lean):
    """Synthetic pairs share their steps up to the slip; GSM8K pairs share only the question.
    Packed or not, the per-step log-probs agree within 1e-5 (relative), and so do the loss and
    every policy gradient; the packed rows hold fewer tokens. The log-ratios, differences of
    two log-probs of ~100 in fp32, agree within 1e-4."""
    unpacked, packed = batches(tmp_path, source)
    assert packed["attention_mask"].sum() < unpacked["attention_mask"].sum()
    module = make_module(lean_logps=lean)
    set_attention(module, attention)
    assert (module.lean is not None) == lean
    assert_same_step_logps(module, unpacked, packed)
    assert_same_objective_and_gradients(module, unpacked, packed)


def test_sft_warmup_loss_is_the_same_packed(tmp_path):
    """The warm-up NLL uses the chosen side alone: the packed rows cut to the chosen width."""
    unpacked, packed = batches(tmp_path, "synthetic")
    module = make_module(sft_warmup_steps=1)
    num_steps = unpacked["step_mask"].shape[1]

    def warmup_loss(batch):
        chosen_logps = step_logps(module.policy, chosen_side(batch), num_steps).sum(-1)
        return sft_loss(chosen_logps, chosen_token_counts(batch), None)

    assert chosen_side(packed)["input_ids"].shape[1] < packed["input_ids"].shape[1]
    torch.testing.assert_close(warmup_loss(packed), warmup_loss(unpacked), atol=1e-6, rtol=1e-6)


def test_packing_fails_naming_the_setting_for_attention_without_4d_masks():
    segments = torch.zeros(1, 4, dtype=torch.long)
    batch = {"segment_ids": segments, "slot_ids": segments, "position_ids": torch.arange(4)[None]}
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(SettingError, match="data.pack_pairs.*flash_attention_2"):
        packed_mask_for(flash, batch)
    windowed = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa", sliding_window=3))
    with pytest.raises(SettingError, match="data.pack_pairs.*sliding window"):
        packed_mask_for(windowed, batch)
