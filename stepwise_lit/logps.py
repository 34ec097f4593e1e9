"""Token and per-step log-probabilities from one forward pass.

The same functions serve the policy (with gradients) and the reference (called
under ``torch.no_grad()``), so the label shift can never differ between them.

Memory: the log-softmax normaliser is computed in fp32 chunks of positions, so
no full fp32 ``[N, L, V]`` tensor is ever held. With gradients each chunk runs
under activation checkpointing, so the backward pass recomputes one chunk at a
time instead of keeping every fp32 chunk alive.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 1024
"""Positions per chunk: one chunk holds ``chunk_size x V`` fp32 logits."""


def _gathered_minus_logsumexp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-prob of ``labels`` under ``logits`` in fp32.

    Args:
        logits: ``[P, V]`` logits of any float dtype.
        labels: ``[P]`` target token ids.

    Returns:
        ``[P]`` float32 log-probs.
    """
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _project_and_score(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Apply the LM head to ``hidden`` and score ``labels``.

    Args:
        hidden: ``[P, H]`` final hidden states.
        lm_head_weight: ``[V, H]`` LM-head weight.
        labels: ``[P]`` target token ids.

    Returns:
        ``[P]`` float32 log-probs.
    """
    return _gathered_minus_logsumexp(hidden @ lm_head_weight.T, labels)


def _chunked(score_fn, rows: torch.Tensor, labels: torch.Tensor, chunk_size: int, *params):
    """Run ``score_fn(rows_chunk, *params, labels_chunk)`` over chunks of positions.

    Each chunk runs under non-reentrant activation checkpointing when gradients
    are being recorded, so only one chunk's fp32 ``[chunk_size, V]`` tensor
    exists at a time in backward as well as in forward.

    Args:
        score_fn: maps ``([P, D], *params, [P])`` to ``[P]`` float32 log-probs.
        rows: ``[P, D]`` logits or hidden states, flattened over positions.
        labels: ``[P]`` target token ids.
        chunk_size: positions per chunk (> 0).
        *params: extra tensors passed to every chunk (the LM-head weight).

    Returns:
        ``[P]`` float32 log-probs.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (rows, *params))
    chunks = []
    for start in range(0, rows.shape[0], chunk_size):
        args = (rows[start : start + chunk_size], *params, labels[start : start + chunk_size])
        if needs_grad:
            chunks.append(checkpoint(score_fn, *args, use_reentrant=False))
        else:
            chunks.append(score_fn(*args))
    if not chunks:
        return rows.new_zeros(0, dtype=torch.float32)
    return torch.cat(chunks)


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Per-token log-prob of ``labels``: gathered logit minus logsumexp, in fp32.

    ``logits`` and ``labels`` are already aligned (no shift here). The logits
    may be bf16/fp16; they are upcast one chunk of positions at a time.

    Args:
        logits: ``[..., V]`` logits.
        labels: ``[...]`` target token ids, the leading shape of ``logits``;
            every id must be a valid vocabulary index.
        chunk_size: positions per fp32 chunk.

    Returns:
        float32 tensor of ``labels``' shape.
    """
    vocab_size = logits.shape[-1]
    flat = _chunked(
        _gathered_minus_logsumexp, logits.reshape(-1, vocab_size), labels.reshape(-1), chunk_size
    )
    return flat.view(labels.shape)


def _sum_by_step(token_logps: torch.Tensor, step_ids: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Sum token log-probs per step with one ``scatter_add_``.

    Args:
        token_logps: ``[N, P]`` float32 log-probs of the predicted tokens.
        step_ids: ``[N, P]`` step of each predicted token, 0 for prompt/pad,
            ``1..num_steps`` for completion steps.
        num_steps: S, the number of step columns.

    Returns:
        ``[N, S]`` float32; column ``t - 1`` is step ``t``.
    """
    sums = token_logps.new_zeros(token_logps.shape[0], num_steps + 1)  # column 0 = prompt/pad
    sums.scatter_add_(1, step_ids, token_logps)
    return sums[:, 1:]


def step_logps(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    step_ids: torch.Tensor,
    num_steps: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-step sums of token log-probs from one forward pass's logits.

    The logits at position ``j - 1`` predict ``input_ids[:, j]``, which belongs
    to step ``step_ids[:, j]``. Step 0 (prompt and padding) is discarded, as is
    position 0, which nothing predicts (it must be prompt). Sequence log-probs
    are ``step_logps(...).sum(-1)``.

    Args:
        logits: ``[N, L, V]`` logits of the causal LM (any float dtype).
        input_ids: ``[N, L]`` token ids.
        step_ids: ``[N, L]`` 0 for prompt/pad, ``t`` (1-based) for a token of
            step ``t``; at most ``num_steps``.
        num_steps: S, the number of step columns of the batch.
        chunk_size: positions per fp32 chunk of the log-softmax.

    Returns:
        ``[N, S]`` float32; column ``t - 1`` is the log-prob of step ``t``
        (0 for steps a row does not have).
    """
    predicted_logps = token_logps(logits[:, :-1], input_ids[:, 1:], chunk_size)  # [N, L-1]
    return _sum_by_step(predicted_logps, step_ids[:, 1:], num_steps)


def step_logps_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    step_ids: torch.Tensor,
    num_steps: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-step log-probs from final hidden states, applying the LM head in chunks.

    Same result as ``step_logps(hidden @ lm_head_weight.T, ...)`` but the full
    ``[N, L, V]`` logits never exist: only completion positions (target step
    > 0) are projected, ``chunk_size`` at a time, each chunk checkpointed so
    backward recomputes it. Gradients flow to ``hidden`` and ``lm_head_weight``.
    For an LM head without bias, softcapping or logit scaling (Llama, Mistral,
    Qwen2 and the like).

    Args:
        hidden: ``[N, L, H]`` final hidden states (after the final norm).
        lm_head_weight: ``[V, H]`` LM-head weight.
        input_ids: ``[N, L]`` token ids.
        step_ids: ``[N, L]`` as in :func:`step_logps`.
        num_steps: S, the number of step columns of the batch.
        chunk_size: positions per chunk of the LM head.

    Returns:
        ``[N, S]`` float32; column ``t - 1`` is the log-prob of step ``t``.
    """
    target_step_ids = step_ids[:, 1:]  # [N, L-1]
    is_completion = target_step_ids > 0
    completion_logps = _chunked(
        _project_and_score,
        hidden[:, :-1][is_completion],  # [P, H], P = completion tokens in the batch
        input_ids[:, 1:][is_completion],
        chunk_size,
        lm_head_weight,
    )
    # Scatter back to [N, L-1] (zeros at prompt/pad, which land in column 0).
    predicted_logps = torch.zeros(
        target_step_ids.shape, dtype=torch.float32, device=hidden.device
    ).masked_scatter(is_completion, completion_logps)
    return _sum_by_step(predicted_logps, target_step_ids, num_steps)
