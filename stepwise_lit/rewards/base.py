"""The step-scorer interface and what the model-based scorers share.

Every scorer is a `StepScorer`: a frozen `torch.nn.Module` (so Lightning moves it to
the right device) that gives one score in [-1, 1] per step of each response.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Sequence

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from stepwise_lit.data.batch import PairBatch
from stepwise_lit.data.records import Prompt
from stepwise_lit.errors import SettingError
from stepwise_lit.models.loading import DTYPES

logger = logging.getLogger("stepwise_lit")

SCORER_DTYPES = {"auto": "auto", **DTYPES}
"""`dtype` names a scorer takes: the model dtypes, and "auto" (the checkpoint's own)."""


class StepScorer(torch.nn.Module, abc.ABC):
    """Scores every step of step-by-step responses; inference only.

    Subclasses implement `_score_steps`. The scorer always stays in eval mode (a
    training loop's `model.train()` does not switch its dropout on) and never
    records gradients.
    """

    def score_steps(
        self,
        prompts: Sequence[Prompt],
        steps: Sequence[Sequence[str]],
        reference_solutions: Sequence[str | None] | None = None,
    ) -> list[list[float]]:
        """Scores each step of each response.

        Args:
            prompts: One problem per response: a string or chat messages.
            steps: One list of step texts per response; ``"".join(steps[i])`` is
                response ``i``.
            reference_solutions: Optional ground-truth solution text per response
                (used by rule verifiers, ignored by model scorers).

        Returns:
            One list per response with one score in [-1, 1] per step.

        Raises:
            ValueError: If the argument lengths differ or a response has no steps.
            RuntimeError: If the scorer's output has a wrong count or a value
                outside [-1, 1] (a bug in the scorer, caught before it is saved).
        """
        if len(prompts) != len(steps):
            raise ValueError(f"score_steps got {len(prompts)} prompts but {len(steps)} step lists")
        if reference_solutions is not None and len(reference_solutions) != len(steps):
            raise ValueError(
                f"score_steps got {len(steps)} step lists but {len(reference_solutions)} reference solutions"
            )
        for index, row_steps in enumerate(steps):
            if len(row_steps) == 0:
                raise ValueError(f"score_steps: response {index} has no steps")
        if not steps:
            return []
        references = list(reference_solutions) if reference_solutions is not None else [None] * len(steps)
        with torch.no_grad():
            scores = self._score_steps(list(prompts), [list(s) for s in steps], references)
        check_scores(type(self).__name__, steps, scores)
        return scores

    @abc.abstractmethod
    def _score_steps(
        self, prompts: list[Prompt], steps: list[list[str]], reference_solutions: list[str | None]
    ) -> list[list[float]]:
        """Scores the (validated, non-empty) batch; see `score_steps`."""

    def train(self, mode: bool = True) -> StepScorer:
        """Keeps the scorer in eval mode whatever `mode` says (it is never trained)."""
        return super().train(False)


class MissingStepScores:
    """Scores, with a step scorer, the responses of a batch whose step scores are missing.

    A plain object, not a `torch.nn.Module`: the scorer it holds is never registered with the
    LightningModule, so it is never in `parameters()`, the optimizer or a checkpoint; the
    LightningModule moves it with its own device and dtype changes through `models()`.

    Args:
        scorer: The step scorer, or None (then a batch with missing scores is an error).
    """

    def __init__(self, scorer: StepScorer | None) -> None:
        self.scorer = scorer
        if scorer is not None:
            scorer.eval().requires_grad_(False)

    def models(self) -> list[torch.nn.Module]:
        """The scorer, when there is one."""
        return [self.scorer] if self.scorer is not None else []

    def __call__(self, batch: PairBatch) -> torch.Tensor:
        """The batch's step scores with every missing response scored: a new float ``[2B, S]``
        tensor (the batch's own when none is missing; the batch is not changed).

        Raises:
            RuntimeError: If a response has no scores and there is no scorer.
        """
        missing = (~batch["has_step_scores"]).nonzero().flatten().tolist()
        if not missing:
            return batch["step_scores"]
        if self.scorer is None:
            raise RuntimeError(
                f"{len(missing)} rows in this batch have no step scores and no reward_model is set: "
                "score the data first (python -m stepwise_lit.score) or set model.reward_model."
            )
        num_pairs = len(batch["prompts"])
        scores = self.scorer.score_steps(
            [batch["prompts"][row % num_pairs] for row in missing],
            [batch["steps"][row] for row in missing],
            [batch["reference_solutions"][row % num_pairs] for row in missing],
        )
        filled = batch["step_scores"].clone()
        for row, row_scores in zip(missing, scores):
            filled[row, : len(row_scores)] = torch.tensor(row_scores, dtype=filled.dtype)
        return filled


def check_scores(scorer: str, steps: Sequence[Sequence[str]], scores: list[list[float]]) -> None:
    """Checks a scorer's output: one list per response, one value in [-1, 1] per step.

    Raises:
        RuntimeError: Naming the scorer and the first bad response.
    """
    if len(scores) != len(steps):
        raise RuntimeError(f"{scorer} returned {len(scores)} score lists for {len(steps)} responses")
    for index, (row_steps, row_scores) in enumerate(zip(steps, scores)):
        if len(row_scores) != len(row_steps):
            raise RuntimeError(f"{scorer}: response {index} has {len(row_steps)} steps but {len(row_scores)} scores")
        if not all(-1.0 <= score <= 1.0 for score in row_scores):
            raise RuntimeError(f"{scorer}: response {index} has scores outside [-1, 1]: {row_scores}")


def prompt_text(prompt: Prompt) -> str:
    """The problem text of a prompt: the string itself, or the contents of the chat
    messages other than system messages, joined by blank lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(message["content"] for message in prompt if message["role"] != "system")


def resolve_dtype(dtype: str) -> torch.dtype | str:
    """Maps a dtype name ("auto", "float32", "bfloat16", "float16") to what `from_pretrained` takes.

    Raises:
        ValueError: For any other name.
    """
    if dtype not in SCORER_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(SCORER_DTYPES)}, got {dtype!r}")
    return SCORER_DTYPES[dtype]


def load_pretrained(
    model_class: type,
    model_name_or_path: str,
    trust_remote_code: bool,
    dtype: str,
    scorer: str,
    refuse_unexpected: bool = False,
    **model_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a frozen Hugging Face model and its tokenizer, failing early with a clear message.

    The tokenizer gets the eos token as pad token when it has none, and the model's
    config the tokenizer's pad id when it has none. A checkpoint that lacks some of the
    model's weights (a base model loaded with a head it was never trained with) is
    refused, see `check_fully_loaded`.

    Args:
        model_class: An ``AutoModelFor...`` class, or a `PreTrainedModel` subclass.
        model_name_or_path: Local folder or Hub id (served from the local cache when offline).
        trust_remote_code: Run the repository's own modelling code; only for sources you trust.
        dtype: Weight dtype name, see `resolve_dtype`.
        scorer: The scorer's class name, for the error messages.
        refuse_unexpected: Also refuse checkpoint weights the model has no place for (for
            model classes that describe a checkpoint's layout exactly).
        **model_kwargs: Extra ``from_pretrained`` arguments (e.g. ``num_labels``).

    Returns:
        The model (eval mode, ``requires_grad`` off) and the tokenizer.

    Raises:
        FileNotFoundError: If a local-looking path does not exist.
        OSError: If the source cannot be loaded (not a model folder, not in the cache).
        SettingError: Naming ``model_name_or_path`` when weights would be freshly initialised.
        ValueError: If the tokenizer has neither a pad nor an eos token.
    """
    torch_dtype = resolve_dtype(dtype)
    looks_local = os.path.isabs(model_name_or_path) or model_name_or_path.startswith((".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(model_name_or_path)):
        raise FileNotFoundError(f"model_name_or_path {model_name_or_path!r}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        model, loading_info = model_class.from_pretrained(
            model_name_or_path,
            trust_remote_code=trust_remote_code,
            dtype=torch_dtype,
            output_loading_info=True,
            **model_kwargs,
        )
    except OSError as error:
        raise OSError(
            f"cannot load {model_name_or_path!r}: not a model folder and not in the local Hugging Face cache "
            f"(downloads need network access): {error}"
        ) from error
    check_fully_loaded(scorer, model_name_or_path, loading_info, refuse_unexpected)
    set_pad_token(tokenizer, model, model_name_or_path)
    model.eval().requires_grad_(False)
    return model, tokenizer


def check_fully_loaded(scorer: str, source: str, loading_info: dict, refuse_unexpected: bool = False) -> None:
    """Refuses a load that left weights freshly initialised (``from_pretrained``'s
    ``missing_keys``): such a model scores with a random head, silently.

    Args:
        scorer: The scorer's class name.
        source: The ``model_name_or_path`` that was loaded.
        loading_info: What ``from_pretrained(..., output_loading_info=True)`` returned.
        refuse_unexpected: Also refuse checkpoint weights the model did not use.

    Raises:
        SettingError: Naming ``model_name_or_path``, the scorer and the first missing (or unused) keys.
    """
    problems = [("has no weights for", sorted(loading_info.get("missing_keys") or []))]
    if refuse_unexpected:
        problems.append(("has weights this model has no place for:", sorted(loading_info.get("unexpected_keys") or [])))
    for problem, keys in problems:
        if keys:
            shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
            raise SettingError(
                f"model_name_or_path: {scorer} cannot score with {source!r}: the checkpoint {problem} {shown} "
                "(weights it lacks would be freshly initialised, so every score would be noise); name a checkpoint "
                f"saved with the head {scorer} reads (see docs/data.md, published process reward models)"
            )


def set_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, source: str) -> None:
    """Gives the tokenizer a pad token (its eos token) and the model config its id, where missing.

    Raises:
        ValueError: If the tokenizer has neither a pad nor an eos token.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {source!r} has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str, device: torch.device) -> dict:
    """Pads token id lists to one batch.

    Args:
        sequences: Token ids per sequence.
        pad_id: Id written into the padding.
        side: "left" (the last real token ends every row, for next-token reads
            and generation) or "right".
        device: Where the tensors go.

    Returns:
        ``input_ids``, ``attention_mask`` and ``position_ids`` (counting real tokens
        from 0, so left padding does not shift positions), each ``[N, L]`` long.
    """
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(length - len(sequence), length) if side == "left" else slice(0, len(sequence))
        input_ids[row, span] = torch.tensor(list(sequence), dtype=torch.long)
        attention_mask[row, span] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "position_ids": position_ids.to(device),
    }


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most `batch_size`, longest sequences first,
    so each batch pads little (and an out-of-memory error shows up on the first batch)."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def single_token_id(tokenizer: PreTrainedTokenizerBase, text: str, setting: str) -> int:
    """The id of `text` when it encodes (without special tokens) to exactly one token, as the
    published PRMs' reference code reads their tag and label tokens.

    Raises:
        ValueError: Naming `setting` when `text` is more or less than one token.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{setting}: {text!r} is {len(ids)} tokens {ids} for this tokenizer; it must be one token")
    return ids[0]
