"""Token and per-step log-probabilities from one forward pass.

Rows are either unpacked (one response per row, each position predicting the
next token) or packed (one pair per row, see ``stepwise_lit.data.packing``):
both reduce to "position p predicts token ``target_ids[p, k]`` of response k",
which :func:`target_step_logps` sums per step.

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
    """Log-probs of ``labels`` under ``logits`` in fp32.

    Args:
        logits: ``[P, V]`` logits of any float dtype.
        labels: ``[P, K]`` target token ids, K per position.

    Returns:
        ``[P, K]`` float32 log-probs.
    """
    logits = logits.float()
    return logits.gather(-1, labels) - logits.logsumexp(-1, keepdim=True)


def _project_and_score(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Apply the LM head to ``hidden`` and score ``labels``.

    Args:
        hidden: ``[P, H]`` final hidden states.
        lm_head_weight: ``[V, H]`` LM-head weight.
        labels: ``[P, K]`` target token ids.

    Returns:
        ``[P, K]`` float32 log-probs.
    """
    return _gathered_minus_logsumexp(hidden @ lm_head_weight.T, labels)


def _chunked(score_fn, rows: torch.Tensor, labels: torch.Tensor, chunk_size: int, *params):
    """Run ``score_fn(rows_chunk, *params, labels_chunk)`` over chunks of positions.

    Each chunk runs under non-reentrant activation checkpointing when gradients
    are being recorded, so only one chunk's fp32 ``[chunk_size, V]`` tensor
    exists at a time in backward as well as in forward.

    Args:
        score_fn: maps ``([P, D], *params, [P, K])`` to ``[P, K]`` float32 log-probs.
        rows: ``[P, D]`` logits or hidden states, flattened over positions.
        labels: ``[P, K]`` target token ids.
        chunk_size: positions per chunk (> 0).
        *params: extra tensors passed to every chunk (the LM-head weight).

    Returns:
        ``[P, K]`` float32 log-probs.
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
        return rows.new_zeros(labels.shape, dtype=torch.float32)
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
        _gathered_minus_logsumexp, logits.reshape(-1, vocab_size), labels.reshape(-1, 1), chunk_size
    )
    return flat.view(labels.shape)


def target_step_logps(
    rows: torch.Tensor,
    target_ids: torch.Tensor,
    target_step_ids: torch.Tensor,
    num_steps: int,
    lm_head_weight: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-step sums of the log-probs of the tokens each position predicts.

    The logits at position ``p`` of row ``n`` predict, for each of K responses,
    the token ``target_ids[n, p, k]``, which belongs to step
    ``target_step_ids[n, p, k]`` of response k (0: ``p`` predicts nothing for it).
    An unpacked row predicts for one response (K = 1, the next token); a packed
    row for two (``stepwise_lit.data.packing``). Only positions that predict a
    step token are scored, ``chunk_size`` at a time in fp32.

    Args:
        rows: ``[N, L, V]`` logits, or, with ``lm_head_weight``, ``[N, L, H]``
            final hidden states (after the final norm): the LM head is then
            applied to scored positions only, a chunk at a time, and the full
            logits never exist (for an LM head without bias, softcapping or
            logit scaling: Llama, Mistral, Qwen2 and the like).
        target_ids: ``[N, L, K]`` predicted token ids (any valid id where the step is 0).
        target_step_ids: ``[N, L, K]`` step (1-based) of each predicted token, at
            most ``num_steps``; 0 where nothing is predicted.
        num_steps: S, the number of step columns of the batch.
        lm_head_weight: ``[V, H]`` when ``rows`` are hidden states; None for logits.
        chunk_size: positions per chunk.

    Returns:
        ``[N, K, S]`` float32; ``[n, k, t - 1]`` is the log-prob of step ``t`` of
        row n's response k (0 for steps it does not have).
    """
    is_scored = (target_step_ids > 0).any(-1)  # [N, L]
    params = () if lm_head_weight is None else (lm_head_weight,)
    score_fn = _gathered_minus_logsumexp if lm_head_weight is None else _project_and_score
    scored = _chunked(score_fn, rows[is_scored], target_ids[is_scored], chunk_size, *params)  # [P, K]
    token_logps = torch.zeros(target_ids.shape, dtype=torch.float32, device=rows.device).masked_scatter(
        is_scored.unsqueeze(-1).expand_as(target_ids), scored
    )  # [N, L, K]; zeros where nothing is predicted
    sums = token_logps.new_zeros(target_ids.shape[0], target_ids.shape[2], num_steps + 1)  # column 0: no step
    sums.scatter_add_(2, target_step_ids.transpose(1, 2), token_logps.transpose(1, 2))
    return sums[..., 1:]


def next_token_targets(input_ids: torch.Tensor, step_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets of unpacked rows: position ``j`` predicts token ``j + 1``.

    Args:
        input_ids: ``[N, L]`` token ids.
        step_ids: ``[N, L]`` 0 for prompt/pad, ``t`` for a token of step ``t``.

    Returns:
        ``target_ids`` and ``target_step_ids``, each ``[N, L, 1]`` (the last
        position predicts nothing).
    """
    target_ids = torch.nn.functional.pad(input_ids[:, 1:], (0, 1)).unsqueeze(-1)
    target_step_ids = torch.nn.functional.pad(step_ids[:, 1:], (0, 1)).unsqueeze(-1)
    return target_ids, target_step_ids


def step_logps(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    step_ids: torch.Tensor,
    num_steps: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-step sums of token log-probs of unpacked rows from one forward pass's logits.

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
    return target_step_logps(logits, *next_token_targets(input_ids, step_ids), num_steps, None, chunk_size)[:, 0]


def step_logps_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    step_ids: torch.Tensor,
    num_steps: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-step log-probs of unpacked rows from final hidden states, the LM head applied in chunks.

    Same result as ``step_logps(hidden @ lm_head_weight.T, ...)`` but the full
    ``[N, L, V]`` logits never exist: only completion positions are projected,
    ``chunk_size`` at a time, each chunk checkpointed so backward recomputes it.
    Gradients flow to ``hidden`` and ``lm_head_weight``.

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
    targets = next_token_targets(input_ids, step_ids)
    return target_step_logps(hidden, *targets, num_steps, lm_head_weight, chunk_size)[:, 0]
