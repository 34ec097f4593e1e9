"""The LM-head part of a forward pass: the model's own logits, or the lean path (the LM-head
weight applied to the final hidden states a chunk at a time, no ``[rows, L, V]`` logits), and
when the lean path may serve a model (the ``model.lean_logps`` setting).

The lean path applies nothing but the LM-head weight, so it engages only on the architectures
of `LEAN_ARCHITECTURES` (each shown equal to the model's own logits by
the lean-architecture tests), and `LeanLogps` checks it against the model's own
logits on the first batch each model serves (docs/loss.md, "Lean log-probs").
"""

from __future__ import annotations

import logging
import weakref

import torch

from stepwise_lit.errors import SettingError
from stepwise_lit.logprobs.logps import next_token_targets, target_step_logps
from stepwise_lit.models.loading import causal_lm_of

log = logging.getLogger("stepwise_lit")

LEAN_CHUNK_ELEMENTS = 2**25
"""`lean_logps`: LM-head outputs per chunk (positions x vocabulary): 128 MiB in fp32."""
LEAN_AUTO_MIN_ROWS = 32_000
"""``lean_logps: auto`` takes the lean path for LM heads with at least this many rows."""
LEAN_ARCHITECTURES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi3", "gpt2"}
)
"""``model_type`` values whose causal-LM forward computes its logits as the bias-free LM head of
the final hidden states and nothing more (no logit scaling, softcapping or bias: Granite, Cohere,
Gemma 2/3 and Phi are left out)."""
LEAN_CHECK_POSITIONS = 256
"""The start-time check runs the first row's first this many tokens."""
LEAN_CHECK_ATOL = 1e-4
LEAN_CHECK_ULPS = 4
"""The start-time check's tolerance on a token log-prob, in nats: `LEAN_CHECK_ATOL` plus
`LEAN_CHECK_ULPS` rounding units of the logits (`logit_rounding_unit`) at the largest logit,
what two orders of the same products can differ by (at logits of 30: 1.1e-4 nats in fp32,
0.94 in bf16), while a missed transformation of the logits moves them by whole nats."""


def target_logps(
    model: torch.nn.Module, inputs: dict, target_ids: torch.Tensor, target_step_ids: torch.Tensor,
    num_steps: int, lean: bool,
) -> torch.Tensor:
    """Per-step log-probs of one forward pass of `model` on `inputs`, float ``[R, K, S]``
    (`stepwise_lit.logprobs.logps.target_step_logps` of ``[R, L, K]`` targets).

    Args:
        lean: The decoder's hidden states, then the LM-head weight in chunks of
            `LEAN_CHUNK_ELEMENTS` outputs (`LeanLogps` says when it may); else the model's logits.
    """
    if lean:
        hidden = decoder_of(model)(**inputs, use_cache=False).last_hidden_state
        weight = model.get_output_embeddings().weight
        chunk_size = max(1, LEAN_CHUNK_ELEMENTS // weight.shape[0])
        return target_step_logps(hidden, target_ids, target_step_ids, num_steps, weight, chunk_size)
    logits = model(**inputs, use_cache=False).logits
    return target_step_logps(logits, target_ids, target_step_ids, num_steps)


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack under `model`'s LM head (`get_decoder`; where transformers 4.x's finds
    none, the causal LM's base model, under a PEFT wrapper too)."""
    decoder = model.get_decoder()
    if decoder is None:
        decoder = causal_lm_of(model).base_model
    return decoder


def lean_head_problem(model: torch.nn.Module, sharded: bool) -> str | None:
    """Why the lean path cannot serve `model` (None: it may, subject to the start-time check):
    an architecture off `LEAN_ARCHITECTURES`, or FSDP (the root's weights are gathered only
    inside the model's own forward)."""
    if sharded:
        return "not supported with FSDP strategies"
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LEAN_ARCHITECTURES:
        return (f"{type(model).__name__} (model_type {model_type!r}) is not among the architectures the lean "
                f"path is shown exact on ({', '.join(sorted(LEAN_ARCHITECTURES))})")
    return None


def logit_rounding_unit(dtype: torch.dtype) -> float:
    """The relative rounding of logits of `dtype`: its epsilon; for float32, that of the precision
    float32 matrix products may run at (`torch.get_float32_matmul_precision`: TF32's 2^-10 at
    "high", bfloat16's 2^-7 at "medium")."""
    if dtype == torch.float32:
        return {"highest": torch.finfo(dtype).eps, "high": 2**-10, "medium": 2**-7}[torch.get_float32_matmul_precision()]
    return torch.finfo(dtype).eps


@torch.no_grad()
def lean_logps_gap(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[float, float]:
    """The greatest difference, in nats, between the lean path's token log-probs of `input_ids`
    and the log-softmax of the model's own logits, and its tolerance (`LEAN_CHECK_ULPS`).

    Args:
        input_ids: ``[1, n]`` tokens, n >= 2, run as one causal sequence.
    """
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    step_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # each token its own step
    targets = next_token_targets(input_ids, step_ids)
    num_steps = input_ids.shape[1] - 1
    logits = model(**inputs, use_cache=False).logits  # [1, n, V]
    own = target_step_logps(logits, *targets, num_steps)
    lean = target_logps(model, inputs, *targets, num_steps, lean=True)
    tolerance = LEAN_CHECK_ATOL + LEAN_CHECK_ULPS * logit_rounding_unit(logits.dtype) * float(logits.abs().max())
    return float((lean - own).abs().max()), tolerance


class LeanLogps:
    """The lean path of one run, engaged by `use_lean_logps`: `serves` says, per model, whether
    it takes it; decided on the first batch the model sees (`lean_logps_gap` on that batch's
    first row) and kept. A model whose lean log-probs miss its own logits falls back to them
    with a warning under ``auto``, and stops the run under ``true``.

    Each rank decides on its own batch; a rank on the lean path has log-probs within the
    tolerance of the model's own, so ranks that decided differently still agree within it.

    Args:
        forced: ``lean_logps: true``.
    """

    def __init__(self, forced: bool) -> None:
        self.forced = forced
        self.decided: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()

    def serves(self, model: torch.nn.Module, input_ids: torch.Tensor) -> bool:
        """Whether `model` takes the lean path; checked on the first call with `input_ids` ``[R, L]``.

        Raises:
            SettingError: naming ``model.lean_logps``, when forced on a model it cannot serve.
        """
        if model not in self.decided:
            self.decided[model] = self.check(model, input_ids[:1, :LEAN_CHECK_POSITIONS])
        return self.decided[model]

    def check(self, model: torch.nn.Module, input_ids: torch.Tensor) -> bool:
        """`serves`' decision for a model not seen before (`input_ids` ``[1, n]``)."""
        problem = lean_head_problem(model, sharded=False)
        if problem is None:
            gap, tolerance = lean_logps_gap(model, input_ids)
            if gap <= tolerance:
                log.info("lean_logps: %s's lean log-probs are within %.3g nats of its own logits' (tolerance %.3g)",
                         type(model).__name__, gap, tolerance)
                return True
            problem = (f"{type(model).__name__}'s lean log-probs differ from its own logits' by {gap:.3g} nats on "
                       f"the first batch (tolerance {tolerance:.3g})")
        if self.forced:
            raise SettingError(f"model.lean_logps: {problem}; set it to auto or false")
        log.warning("model.lean_logps: auto: %s; this model uses its full logits", problem)
        return False


def use_lean_logps(setting: bool | str, model: torch.nn.Module, sharded: bool) -> LeanLogps | None:
    """The lean path for the ``model.lean_logps`` setting and the policy `model`: True (the
    architecture checked by `lean_head_problem`), False (None), or "auto": on when the LM head
    has at least `LEAN_AUTO_MIN_ROWS` rows and `lean_head_problem` finds nothing (None otherwise,
    said at info level). Every model is checked again on its first batch (`LeanLogps`).

    Raises:
        SettingError: naming ``model.lean_logps``, for True on a model the lean path cannot serve.
    """
    if not setting:
        return None
    problem = lean_head_problem(model, sharded)
    if setting == "auto":
        if model.get_output_embeddings().weight.shape[0] < LEAN_AUTO_MIN_ROWS:
            return None
        if problem is not None:
            log.info("model.lean_logps: auto: full logits, as the lean path cannot serve this model: %s", problem)
            return None
        return LeanLogps(forced=False)
    if problem is not None:
        raise SettingError(f"model.lean_logps: {problem}; set it to false")
    return LeanLogps(forced=True)
