"""Pair packing: the packed layout by hand, and packed log-probs, losses and gradients equal to
the unpacked batch's (module level, plain and lean log-probs, sdpa and eager attention).

Several pairs per packed row (``data.pack_budget``): the bin packing and the row layout by hand,
and log-probs, losses and policy gradients equal to the unpacked batch's (sdpa, eager, lean;
FlexAttention's block mask: log-probs on CPU, gradients where CUDA is)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from stepwise_lit.data.collate import StepwiseCollator
from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.data.packing import balanced_rows, pack_pair, packed_attention_mask
from stepwise_lit.errors import SettingError
from stepwise_lit.logprobs.forward import (
    chosen_side,
    chosen_token_counts,
    packed_mask_for,
    step_logps,
)
from stepwise_lit.models.loading import TinyModelConfig
from stepwise_lit.module import StepwiseDPOModule
from stepwise_lit.objective.stepwise import sft_loss
from tests.helpers.paths import SHARED_DATA
from tests.helpers.rows import token_row

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
GSM8K = SHARED_DATA / "gsm8k" / "example_model_solutions.jsonl"


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


def test_balanced_rows_by_hand():
    """Lengths [5, 3, 4, 2, 6], budget 8: 20 tokens need at least 3 rows. Longest first, each to
    the emptiest row: 6 (item 4) row 0, 5 (item 0) row 1, 4 (item 2) row 2, 3 (item 1) row 2 (4 is
    the least), 2 (item 3) row 1 (5 < 6 < 7): rows of 6, 7, 7 tokens, within the budget.
    [5, 5, 5] in 9: 2 rows would put 10 in one, so 3 rows. A pair over the budget gets its own row."""
    assert balanced_rows([5, 3, 4, 2, 6], 8) == [[4], [0, 3], [1, 2]]
    assert balanced_rows([5, 5, 5], 9) == [[0], [1], [2]]
    assert balanced_rows([10, 1], 4) == [[0], [1]]
    assert balanced_rows([10, 1], 11) == [[0, 1]]


PAIR_A = ([5, 6, 10, 11, 9], [0, 0, 1, 1, 1], [5, 6, 12, 9], [0, 0, 1, 1])  # block [5 6 | 10 11 9 | 12 9], 7 tokens
PAIR_B = ([7, 20, 9], [0, 1, 1], [7, 21, 9], [0, 1, 1])  # block [7 | 20 9 | 21 9], 5 tokens
PAIR_C = ([8, 30, 31, 32, 33, 9], [0, 1, 1, 2, 2, 2], [8, 34, 9], [0, 1, 1])  # block [8 | 30 .. 9 | 34 9], 8 tokens


def test_collator_lays_several_pairs_in_a_row_by_hand():
    """Blocks of 7, 5 and 8 tokens, budget 12: 20 tokens, 2 rows; C (8) goes to row 0, A (7) to
    row 1, B (5) to row 1, the emptier (12). Row 1 is [A | B]: B's positions restart at 0, its slot is 1, and its chosen and
    rejected targets sit in columns 1 and 3 (P = 2). Row 0 is C and padding (slot -1).
    Responses: chosen A, B, C at (1, 0), (1, 1), (0, 0); rejected at columns 2, 3, 2."""
    batch = StepwiseCollator(0, pack_pairs=True, pack_budget=12)([token_row(*PAIR_A), token_row(*PAIR_B), token_row(*PAIR_C)])
    assert batch["input_ids"].tolist() == [
        [8, 30, 31, 32, 33, 9, 34, 9, 0, 0, 0, 0],
        [5, 6, 10, 11, 9, 12, 9, 7, 20, 9, 21, 9],
    ]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1, 2]
    assert batch["segment_ids"][1].tolist() == [0, 0, 1, 1, 1, 2, 2, 0, 1, 1, 2, 2]
    assert batch["slot_ids"].tolist() == [[0] * 8 + [-1] * 4, [0] * 7 + [1] * 5]
    assert batch["target_ids"].shape == (2, 12, 4)
    assert batch["target_ids"][1, 7].tolist() == [0, 20, 0, 21]  # B's prefix predicts both firsts
    assert batch["target_step_ids"][1, 8].tolist() == [0, 1, 0, 0]  # B's chosen 20 predicts 9 (step 1)
    assert batch["target_ids"][1, 8].tolist() == [0, 9, 0, 0]
    assert batch["target_ids"][1, 1].tolist() == [10, 0, 12, 0]  # A's last prefix position
    assert batch["response_targets"].tolist() == [[1, 0], [1, 1], [0, 0], [1, 2], [1, 3], [0, 2]]
    assert chosen_token_counts(batch).tolist() == [3, 2, 5]


def test_packed_mask_is_block_diagonal_over_pairs():
    """Row [A | B] of the test above: B's queries (7..11) see only B's keys; A's rejected rest
    (5, 6) sees A's prefix (0, 1) and itself."""
    batch = StepwiseCollator(0, pack_pairs=True, pack_budget=12)([token_row(*PAIR_A), token_row(*PAIR_B)])
    mask = packed_attention_mask(batch["segment_ids"], batch["slot_ids"])[0, 0]
    visible = {query: mask[query].nonzero().flatten().tolist() for query in range(12)}
    assert visible[6] == [0, 1, 5, 6]
    assert visible[7] == [7]
    assert visible[9] == [7, 8, 9]
    assert visible[11] == [7, 10, 11]


def budget_batches(tmp_path, source: str) -> tuple[dict, dict]:
    """The same 6 pairs collated unpacked and packed several to a row (budget: two of the longest)."""
    rows = pair_rows(tmp_path, source, 6)
    longest = StepwiseCollator(0, pack_pairs=True)(rows)["input_ids"].shape[1]
    unpacked, packed = StepwiseCollator(0)(rows), StepwiseCollator(0, pack_pairs=True, pack_budget=2 * longest)(rows)
    assert packed["input_ids"].shape[0] < 6 and packed["target_ids"].shape[-1] >= 4  # rows of 2 or more pairs
    return scored(unpacked, packed)


@pytest.mark.skipif(not GSM8K.exists(), reason="needs ../shared/data")
@pytest.mark.parametrize("source", ["synthetic", "gsm8k"])
@pytest.mark.parametrize("attention, lean", [("sdpa", False), ("sdpa", True), ("eager", False)])
def test_several_pairs_per_row_give_the_unpacked_log_probs_loss_and_gradients(tmp_path, source, attention, lean):
    """Per-step log-probs within atol = rtol = 1e-5 of the unpacked batch's, in pair order; loss and
    gradients as in `assert_same_objective_and_gradients`; fewer token slots than one pair per row."""
    unpacked, packed = budget_batches(tmp_path, source)
    module = make_module(lean_logps=lean)
    set_attention(module, attention)
    assert (module.lean is not None) == lean
    assert_same_step_logps(module, unpacked, packed)
    assert_same_objective_and_gradients(module, unpacked, packed)


def test_sft_warmup_loss_is_the_same_with_several_pairs_per_row(tmp_path):
    """The chosen side of multi-pair rows keeps the rows and the chosen target columns: the
    warm-up NLL equals the unpacked one within atol = rtol = 1e-6."""
    unpacked, packed = budget_batches(tmp_path, "synthetic")
    module = make_module(sft_warmup_steps=1)
    num_steps = unpacked["step_mask"].shape[1]

    def warmup_loss(batch):
        chosen_logps = step_logps(module.policy, chosen_side(batch), num_steps).sum(-1)
        return sft_loss(chosen_logps, chosen_token_counts(batch), None)

    torch.testing.assert_close(warmup_loss(packed), warmup_loss(unpacked), atol=1e-6, rtol=1e-6)


def test_flex_attention_block_mask_gives_the_unpacked_log_probs(tmp_path):
    """FlexAttention with the block mask of multi-pair rows (forward only: torch has no FlexAttention
    backward on CPU; the reference's and evaluation's passes run without gradients): per-step
    log-probs within atol = rtol = 1e-5 of the unpacked sdpa batch's."""
    unpacked, packed = budget_batches(tmp_path, "synthetic")
    module = make_module()
    num_steps = unpacked["step_mask"].shape[1]
    with torch.no_grad():
        expected = step_logps(module.policy, unpacked, num_steps)
        set_attention(module, "flex_attention")
        actual = step_logps(module.policy, packed, num_steps)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA")
def test_flex_attention_gradients_equal_the_unpacked_ones_on_cuda(tmp_path):
    """On CUDA (fp32): loss and gradients with the block mask as in `assert_same_objective_and_gradients`."""
    unpacked, packed = budget_batches(tmp_path, "synthetic")
    module = make_module().cuda()
    unpacked, packed = ({k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()} for b in (unpacked, packed))
    set_attention(module, "sdpa")
    results = []
    for batch, attention in ((unpacked, "sdpa"), (packed, "flex_attention")):
        set_attention(module, attention)
        module.policy.zero_grad()
        out = module.objective(batch, batch["step_scores"])
        out.loss.backward()
        results.append((out.loss.detach(), {k: p.grad.clone() for k, p in module.policy.named_parameters()}))
    (loss_unpacked, grads_unpacked), (loss_packed, grads_packed) = results
    torch.testing.assert_close(loss_packed, loss_unpacked, atol=1e-5, rtol=1e-5)
    for name, grad in grads_unpacked.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"pack_budget": 0}, "data.pack_budget: must be at least 1"),
        ({"pack_budget": 512, "pack_pairs": False}, "data.pack_budget: .*data.pack_pairs: true"),
    ],
)
def test_pack_budget_is_checked(tmp_path, settings, message):
    with pytest.raises(SettingError, match=message):
        StepwiseDataModule(path="synthetic", cache_dir=str(tmp_path), **settings)
