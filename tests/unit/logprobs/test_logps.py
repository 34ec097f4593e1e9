"""Token and per-step log-probabilities (stepwise_lit.logprobs.logps)."""

import math

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from stepwise_lit.logprobs.logps import step_logps, step_logps_from_hidden, token_logps

VOCAB_SIZE = 300


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def _padded_batch():
    """Three rows with 1, 2 and 3 steps and different lengths, right-padded with 0.

    Row segments (prompt tokens are step 0):
      row 0: prompt 3, step1 4              -> length 7
      row 1: prompt 2, step1 3, step2 2     -> length 7
      row 2: prompt 4, step1 2, step2 1, step3 3 -> length 10
    """
    segments = [[3, 4], [2, 3, 2], [4, 2, 1, 3]]
    length = max(sum(row) for row in segments)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.zeros(len(segments), length, dtype=torch.long)
    step_ids = torch.zeros_like(input_ids)
    attention_mask = torch.zeros_like(input_ids)
    for row, sizes in enumerate(segments):
        ids = [t for step, size in enumerate(sizes) for t in [step] * size]
        input_ids[row, : len(ids)] = torch.randint(1, VOCAB_SIZE, (len(ids),), generator=generator)
        step_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, step_ids, segments


def _prefix_logp(model, ids, prompt_length):
    """Sum of log p(ids[j] | ids[:j]) for j >= prompt_length, from a separate unpadded forward."""
    logits = model(ids.unsqueeze(0)).logits[0].float()
    logps = logits[:-1].log_softmax(-1).gather(-1, ids[1:, None]).squeeze(-1)
    return logps[prompt_length - 1 :].sum()


@torch.no_grad()
def test_one_pass_step_logps_match_separate_prefix_forwards(tiny_llama):
    """step_logps[r, t-1] = logp(prefix through step t) - logp(prefix through step t-1),
    each from its own forward on the unpadded prefix (which cannot see later tokens)."""
    input_ids, attention_mask, step_ids, segments = _padded_batch()
    logits = tiny_llama(input_ids, attention_mask=attention_mask).logits
    result = step_logps(logits, input_ids, step_ids, num_steps=3, chunk_size=5)
    assert result.shape == (3, 3) and result.dtype == torch.float32
    for row, sizes in enumerate(segments):
        prompt_length = sizes[0]
        previous = torch.tensor(0.0)
        for step in range(1, len(sizes)):
            end = sum(sizes[: step + 1])
            through_step = _prefix_logp(tiny_llama, input_ids[row, :end], prompt_length)
            assert_close(result[row, step - 1], through_step - previous, atol=1e-5, rtol=0)
            previous = through_step
        assert torch.all(result[row, len(sizes) - 1 :] == 0)  # steps the row does not have


@torch.no_grad()
def test_step_logps_from_hidden_matches_logits_path(tiny_llama):
    input_ids, attention_mask, step_ids, _ = _padded_batch()
    hidden = tiny_llama.model(input_ids, attention_mask=attention_mask).last_hidden_state
    logits = tiny_llama.lm_head(hidden)
    weight = tiny_llama.get_output_embeddings().weight
    expected = step_logps(logits, input_ids, step_ids, num_steps=3)
    assert_close(
        step_logps_from_hidden(hidden, weight, input_ids, step_ids, num_steps=3, chunk_size=4),
        expected,
        atol=1e-5,
        rtol=0,
    )


def _reference_token_logps(logits, labels):
    return logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def test_token_logps_hand_computed():
    """logits [0, ln 3] over 2 tokens: p = [1/4, 3/4] -> log p(1) = ln 0.75, log p(0) = ln 0.25."""
    log3 = torch.log(torch.tensor(3.0)).item()
    logits = torch.tensor([[[0.0, log3], [0.0, log3]]])
    labels = torch.tensor([[1, 0]])
    expected = torch.log(torch.tensor([[0.75, 0.25]]))
    assert_close(token_logps(logits, labels, chunk_size=1), expected)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_chunked_token_logps_values_and_grads_match_log_softmax(chunk_size):
    torch.manual_seed(2)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    upstream = torch.randn(3, 5)

    chunked = token_logps(logits, labels, chunk_size=chunk_size)
    (chunked_grad,) = torch.autograd.grad((chunked * upstream).sum(), logits)
    plain = _reference_token_logps(logits, labels)
    (plain_grad,) = torch.autograd.grad((plain * upstream).sum(), logits)

    assert chunked.dtype == torch.float32
    assert_close(chunked, plain, atol=1e-5, rtol=0)
    assert_close(chunked_grad, plain_grad, atol=1e-5, rtol=0)


def test_token_logps_upcasts_bf16_logits():
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 9).bfloat16()
    labels = torch.randint(0, 9, (2, 4))
    result = token_logps(logits, labels, chunk_size=3)
    assert result.dtype == torch.float32
    assert_close(result, _reference_token_logps(logits, labels), atol=1e-5, rtol=0)


def test_step_logps_hand_computed_shift_and_scatter():
    """Uniform logits over V=4 give every predicted token log(1/4).

    Row 0: step_ids [0, 1, 1, 2] -> positions 1..3 predicted; step 1 has 2 tokens,
    step 2 has 1: [2 log 1/4, log 1/4]. Row 1: [0, 0, 1, 0] (last is pad):
    [log 1/4, 0]. Position 0 is never predicted.
    """
    logits = torch.zeros(2, 4, 4)
    input_ids = torch.tensor([[1, 2, 3, 0], [3, 2, 1, 0]])
    step_ids = torch.tensor([[0, 1, 1, 2], [0, 0, 1, 0]])
    quarter = torch.log(torch.tensor(0.25))
    expected = torch.stack([torch.stack([2 * quarter, quarter]), torch.stack([quarter, torch.tensor(0.0)])])
    assert_close(step_logps(logits, input_ids, step_ids, num_steps=2), expected)


def test_step_logps_from_hidden_values_and_grads_match_full_logits():
    torch.manual_seed(4)
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    input_ids = torch.randint(0, 13, (3, 6))
    step_ids = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 2, 3, 0, 0], [0, 0, 0, 1, 1, 0]])
    upstream = torch.randn(3, 3)

    lean = step_logps_from_hidden(hidden, weight, input_ids, step_ids, num_steps=3, chunk_size=2)
    lean_grads = torch.autograd.grad((lean * upstream).sum(), (hidden, weight))

    logits = hidden @ weight.T
    plain_token_logps = _reference_token_logps(logits[:, :-1], input_ids[:, 1:])
    plain = torch.zeros(3, 4).scatter_add(1, step_ids[:, 1:], plain_token_logps)[:, 1:]
    plain_grads = torch.autograd.grad((plain * upstream).sum(), (hidden, weight))

    assert_close(lean, plain, atol=1e-5, rtol=0)
    for lean_grad, plain_grad in zip(lean_grads, plain_grads):
        assert_close(lean_grad, plain_grad, atol=1e-5, rtol=0)


def test_policy_and_reference_share_the_function():
    """Under no_grad (the reference) the values equal the with-grad (policy) values."""
    torch.manual_seed(5)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    input_ids = torch.randint(0, 7, (2, 5))
    step_ids = torch.tensor([[0, 1, 1, 2, 2], [0, 0, 1, 1, 0]])
    policy = step_logps(logits, input_ids, step_ids, num_steps=2, chunk_size=3)
    with torch.no_grad():
        reference = step_logps(logits, input_ids, step_ids, num_steps=2, chunk_size=3)
    assert policy.requires_grad and not reference.requires_grad
    assert_close(policy, reference, atol=0, rtol=0)


def _saved_for_backward(fn):
    """(dtype, shape) of every tensor autograd saves while running fn()."""
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return saved


def test_backward_keeps_no_fp32_vocabulary_tensor():
    """With gradients, only the (bf16) input chunks are saved, never an fp32 [chunk, V] tensor,
    and the lean path saves nothing of vocabulary size except the LM-head weight itself."""
    vocab_size = 100
    logits = torch.randn(4, 50, vocab_size).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab_size, (4, 50))
    saved = _saved_for_backward(lambda: token_logps(logits, labels, chunk_size=16))
    saved = [(dtype, shape) for dtype, shape in saved if math.prod(shape) > 0]  # torch 2.7's checkpoint saves an empty placeholder
    assert all(dtype != torch.float32 for dtype, _ in saved)
    assert max(shape[0] for dtype, shape in saved if dtype == torch.bfloat16) <= 16

    hidden = torch.randn(4, 50, 8, requires_grad=True)
    weight = torch.randn(vocab_size, 8, requires_grad=True)
    step_ids = torch.randint(0, 3, (4, 50))
    saved = _saved_for_backward(
        lambda: step_logps_from_hidden(hidden, weight, labels, step_ids, num_steps=2, chunk_size=16)
    )
    assert {shape for _, shape in saved if vocab_size in shape} == {(vocab_size, 8)}  # the weight itself
