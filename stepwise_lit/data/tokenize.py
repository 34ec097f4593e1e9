"""Step-aware tokenization: canonical rows -> token rows with ``step_ids``.

For each side (chosen, rejected): ``input_ids`` = prompt tokens + response
tokens + EOS, and ``step_ids[j]`` = 0 on the prompt, ``t`` (1-based) on the
tokens of step ``t``; EOS belongs to the last step (docs/loss.md, "Tokenization with step ids").

A fast tokenizer tokenizes the whole response once and maps tokens to steps by
their character offsets: a token belongs to the step its first character is in,
which is safe when a BPE token crosses a step boundary. A slow tokenizer
tokenizes step by step, which is exact for byte-level vocabularies.

Truncation keeps whole steps: the prompt is cut from the left to
``max_prompt_length`` (counted in the log; that is what the setting asks for, so no
policy applies to it); each response keeps the longest prefix of steps that fits
``max_length`` after the prompt and ``max_num_steps`` (EOS counts as part of the last
step, so a response that loses any step has no EOS). The ``truncation`` policy decides
what happens to a row that does not fit whole: ``truncate`` keeps the cut row (counted
in the log), ``drop`` drops it (counted), ``error`` raises naming it. A row that keeps
no step on a side, or whose kept chosen and rejected steps are identical, is dropped
(counted) under ``truncate`` too.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal, get_args

from datasets import Dataset, Features, Value
from datasets import Sequence as ListOf
from transformers import PreTrainedTokenizerBase

from stepwise_lit.data.chat import NoChatTemplate, PromptFormat, render_prompt
from stepwise_lit.data.formats import CanonicalRows
from stepwise_lit.data.records import SIDES, Prompt, RecordSkipped
from stepwise_lit.errors import DataFormatError

logger = logging.getLogger(__name__)

Truncation = Literal["truncate", "drop", "error"]
TOKEN_ROW_FEATURES = Features(
    {
        **{
            f"{side}_{key}": feature
            for side in SIDES
            for key, feature in (
                ("input_ids", ListOf(Value("int64"))),
                ("step_ids", ListOf(Value("int64"))),
                ("step_scores", ListOf(Value("float64"))),
                ("score", Value("float64")),
                ("steps", ListOf(Value("string"))),
            )
        },
        "first_divergence": Value("int64"),
        "prompt_json": Value("string"),
        "id": Value("string"),
        "reference_solution": Value("string"),
        "truncated": Value("bool"),
        "prompt_cut": Value("bool"),
        "drop_reason": Value("string"),
    }
)


class RowDoesNotFit(RecordSkipped):
    """A row that cannot be used after truncation; ``reason`` is a short phrase shared by all such rows."""


@dataclass(frozen=True)
class TokenizeSettings:
    """How canonical rows become token rows.

    Attributes:
        max_length: Most tokens of prompt + response per side; None for no limit.
        max_prompt_length: Most prompt tokens (cut from the left); None for no limit.
        max_num_steps: Most steps kept per response; None for no limit.
        prompt_format: How prompts are rendered (step-wise template, chat template, system
            prompt; `stepwise_lit.data.chat.PromptFormat`).
    """

    max_length: int | None = None
    max_prompt_length: int | None = None
    max_num_steps: int | None = None
    prompt_format: PromptFormat = PromptFormat()


def prompt_token_ids(prompt: Prompt, tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat) -> list[int]:
    """Tokenize a prompt rendered by `stepwise_lit.data.chat.render_prompt`.

    BOS is prepended when the tokenizer has one and the text does not already start
    with it (chat templates usually write it themselves).

    Args:
        prompt: A string or chat messages.
        tokenizer: The tokenizer.
        prompt_format: How the prompt is rendered.

    Returns:
        Prompt token ids.

    Raises:
        NoChatTemplate: When the prompt needs a chat template the tokenizer does not have.
    """
    text = render_prompt(prompt, tokenizer, prompt_format)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def response_token_ids(steps: list[str], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Tokenize a response (no special tokens) and give each token its 1-based step.

    Args:
        steps: Step texts; their concatenation is the response.
        tokenizer: Fast (offsets mapping) or slow (step by step) tokenizer.

    Returns:
        ``(input_ids, step_ids)``, equal lengths, ``step_ids`` non-decreasing in 1..len(steps).
    """
    if not tokenizer.is_fast:
        input_ids, step_ids = [], []
        for step_number, step in enumerate(steps, start=1):
            ids = tokenizer(step, add_special_tokens=False)["input_ids"]
            input_ids += ids
            step_ids += [step_number] * len(ids)
        return input_ids, step_ids
    encoding = tokenizer("".join(steps), add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in encoding["offset_mapping"]]
    return encoding["input_ids"], step_ids_from_offsets(starts, [len(step) for step in steps])


def tokenize_response(
    prompt: Prompt,
    steps: list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int | None = None,
    prompt_format: PromptFormat = PromptFormat(),
) -> tuple[list[int], list[int], bool]:
    """One whole response laid out as `tokenize_row` lays out a side, for scoring a single response.

    ``input_ids`` = prompt tokens (cut from the left to `max_prompt_length`) + response tokens
    + EOS; ``step_ids`` = 0 on the prompt, ``t`` on the tokens of step ``t`` and on EOS the last
    step. The response is never cut (no ``max_length`` / ``max_num_steps``).

    Args:
        prompt: A string or chat messages.
        steps: Step texts; their concatenation is the response.
        tokenizer: The tokenizer (needs an EOS token).
        max_prompt_length: Most prompt tokens; None for no limit.
        prompt_format: How the prompt is rendered, as in training.

    Returns:
        ``(input_ids, step_ids, prompt_cut)``; `prompt_cut` is True when the prompt was cut.
    """
    prompt_ids = prompt_token_ids(prompt, tokenizer, prompt_format)
    prompt_cut = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
    if prompt_cut:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
    response_ids, response_step_ids = response_token_ids(steps, tokenizer)
    input_ids = prompt_ids + response_ids + [tokenizer.eos_token_id]
    return input_ids, [0] * len(prompt_ids) + response_step_ids + [len(steps)], prompt_cut


def step_ids_from_offsets(token_starts: list[int], step_lengths: list[int]) -> list[int]:
    """1-based step of each token: the step holding the token's first character.

    Args:
        token_starts: Character offset where each token starts.
        step_lengths: Characters per step.

    Returns:
        Step ids, clamped to ``len(step_lengths)`` and made non-decreasing.
    """
    step_ends = list(accumulate(step_lengths))  # step t (0-based) covers [ends[t-1], ends[t])
    step_ids, current = [], 1
    for start in token_starts:
        current = max(current, min(bisect.bisect_right(step_ends, start) + 1, len(step_lengths)))
        step_ids.append(current)
    return step_ids


def kept_step_count(step_ids: list[int], num_steps: int, budget: int | None, max_num_steps: int | None) -> int:
    """How many leading steps fit ``budget`` tokens, EOS counted with the last step.

    Args:
        step_ids: Response step ids (non-decreasing, 1-based), EOS not included.
        num_steps: Steps in the response.
        budget: Tokens available for the response, or None for no limit.
        max_num_steps: Cap on the number of steps, or None.

    Returns:
        The number of whole steps kept (0 if not even the first fits).
    """
    kept = num_steps if max_num_steps is None else min(num_steps, max_num_steps)
    if budget is None:
        return kept
    while kept > 0 and bisect.bisect_right(step_ids, kept) + (kept == num_steps) > budget:
        kept -= 1
    return kept


def first_divergence(chosen_steps: list[str], rejected_steps: list[str]) -> int | None:
    """0-based index of the first step whose text differs.

    When one response is a prefix of the other, that is the shorter one's length.

    Returns:
        The index, or None when both step lists are identical.
    """
    for index, (chosen, rejected) in enumerate(zip(chosen_steps, rejected_steps)):
        if chosen != rejected:
            return index
    return None if len(chosen_steps) == len(rejected_steps) else min(len(chosen_steps), len(rejected_steps))


def tokenize_row(row: dict, tokenizer: PreTrainedTokenizerBase, settings: TokenizeSettings) -> dict:
    """Turn a canonical row into a token row (docs/data.md, "The canonical row").

    Besides the contract's keys, the token row carries what the collator passes on
    for online scoring: ``prompt_json`` (the prompt, JSON-encoded so string and
    message prompts share one column), the kept ``chosen_steps`` /
    ``rejected_steps``, ``id``, ``reference_solution``, ``truncated`` (True if a
    response lost steps) and ``prompt_cut`` (True if the prompt was cut to ``max_prompt_length``).

    Args:
        row: A validated canonical row.
        tokenizer: The tokenizer (needs an EOS token).
        settings: Lengths, step cap and prompt template.

    Returns:
        The token row.

    Raises:
        RowDoesNotFit: If a side keeps no step, or the kept chosen and rejected steps are identical.
    """
    prompt_ids = prompt_token_ids(row["prompt"], tokenizer, settings.prompt_format)
    prompt_truncated = settings.max_prompt_length is not None and len(prompt_ids) > settings.max_prompt_length
    if prompt_truncated:
        prompt_ids = prompt_ids[len(prompt_ids) - settings.max_prompt_length :]
    budget = None if settings.max_length is None else settings.max_length - len(prompt_ids)
    token_row = {}
    response_truncated = False
    for side in SIDES:
        steps = row[f"{side}_steps"]
        response_ids, response_step_ids = response_token_ids(steps, tokenizer)
        kept = kept_step_count(response_step_ids, len(steps), budget, settings.max_num_steps)
        if kept == 0:
            raise RowDoesNotFit(f"not even the first {side} step fits max_length after the prompt")
        kept_tokens = bisect.bisect_right(response_step_ids, kept)
        eos = [tokenizer.eos_token_id] if kept == len(steps) else []
        response_truncated |= kept < len(steps)
        scores = row[f"{side}_step_scores"]
        token_row[f"{side}_input_ids"] = prompt_ids + response_ids[:kept_tokens] + eos
        token_row[f"{side}_step_ids"] = [0] * len(prompt_ids) + response_step_ids[:kept_tokens] + [kept] * len(eos)
        token_row[f"{side}_step_scores"] = [math.nan] * kept if scores is None else scores[:kept]
        token_row[f"{side}_score"] = math.nan if row[f"{side}_score"] is None else row[f"{side}_score"]
        token_row[f"{side}_steps"] = steps[:kept]
    divergence = first_divergence(token_row["chosen_steps"], token_row["rejected_steps"])
    if divergence is None:
        raise RowDoesNotFit("chosen and rejected are identical" + (" after truncation" if response_truncated else ""))
    token_row["first_divergence"] = divergence
    token_row["prompt_json"] = json.dumps(row["prompt"])
    token_row["id"] = row["id"]
    token_row["reference_solution"] = row["reference_solution"]
    token_row["truncated"] = response_truncated
    token_row["prompt_cut"] = prompt_truncated
    return token_row


def canonical_dataset(rows: Sequence[dict]) -> Dataset:
    """A ``datasets.Dataset`` of canonical rows, the prompt JSON-encoded as ``prompt_json``.

    Arrow needs one type per column, and prompts can be strings or message lists. Each row
    also carries where its record is in the source (``source_line`` or ``source_row``,
    1-based, the other None) for messages: from :class:`CanonicalRows`' places, else the
    row's own 1-based position.

    Args:
        rows: Validated canonical rows, e.g. from ``to_canonical``.
    """
    places = rows.places if isinstance(rows, CanonicalRows) else [{"row": index + 1} for index in range(len(rows))]
    return Dataset.from_list(
        [
            {**row, "prompt": json.dumps(row["prompt"]), "source_line": place.get("line"), "source_row": place.get("row")}
            for row, place in zip(rows, places)
        ]
    ).rename_column("prompt", "prompt_json")


def tokenize_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    settings: TokenizeSettings,
    source: str,
    truncation: Truncation = "truncate",
    num_proc: int | None = None,
    new_fingerprint: str | None = None,
) -> Dataset:
    """Tokenize a :func:`canonical_dataset` with ``Dataset.map``, applying the truncation policy.

    A row that does not fit whole is kept cut (``truncation="truncate"``), dropped
    (``"drop"``) or raises (``"error"``); one that keeps no step on a side, or whose kept
    sides are identical, is dropped under ``truncate`` too. Cut and dropped rows are
    counted in the log (warnings, by reason).

    Args:
        dataset: Canonical rows from :func:`canonical_dataset`.
        tokenizer: The tokenizer.
        settings: Lengths, step cap and prompt template.
        source: File or dataset name for messages and logs.
        truncation: One of :data:`Truncation`.
        num_proc: Processes for ``Dataset.map``.
        new_fingerprint: Fingerprint of the result, for ``datasets``' cache.

    Returns:
        Token rows (see :func:`tokenize_row`, without ``truncated``).

    Raises:
        DataFormatError: With ``truncation="error"``, naming the first row that does not fit whole.
        ValueError: For an unknown policy or a tokenizer without EOS.
    """
    if truncation not in get_args(Truncation):
        raise ValueError(f"truncation must be one of {get_args(Truncation)}, got {truncation!r}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; every response ends with one")
    tokenized = dataset.map(
        tokenize_or_mark_dropped,
        fn_kwargs={"tokenizer": tokenizer, "settings": settings, "source": source, "truncation": truncation},
        remove_columns=dataset.column_names,
        features=TOKEN_ROW_FEATURES,
        num_proc=num_proc,
        new_fingerprint=new_fingerprint,
        desc=f"Tokenizing {source}",
    )
    drop_reasons = Counter(reason for reason in tokenized["drop_reason"] if reason)
    truncated = sum(tokenized["truncated"])
    prompts_cut = sum(tokenized["prompt_cut"])
    for reason, count in drop_reasons.items():
        logger.warning("%s: dropped %d of %d rows (%s)", source, count, len(dataset), reason)
    if truncated:
        logger.warning(
            "%s: cut the responses of %d of %d rows at step boundaries to fit max_length / max_num_steps",
            source,
            truncated,
            len(dataset),
        )
    if prompts_cut:
        logger.info("%s: cut %d of %d prompts from the left to max_prompt_length", source, prompts_cut, len(dataset))
    if drop_reasons:
        tokenized = tokenized.filter(lambda reason: not reason, input_columns="drop_reason", num_proc=num_proc)
    return tokenized.remove_columns(["drop_reason", "truncated", "prompt_cut"])


def tokenize_or_mark_dropped(
    record: dict, tokenizer: PreTrainedTokenizerBase, settings: TokenizeSettings, source: str, truncation: Truncation
) -> dict:
    """``Dataset.map`` function: a token row with ``drop_reason`` "" or, for a dropped row, an empty one."""
    row = {**record, "prompt": json.loads(record["prompt_json"])}
    place = {"line": record["source_line"], "row": record["source_row"]}
    try:
        token_row = tokenize_row(row, tokenizer, settings)
    except NoChatTemplate as error:
        raise DataFormatError(str(error), source=source, **place) from None
    except RowDoesNotFit as error:
        if truncation == "error":
            raise DataFormatError(
                f"{error.reason}; raise max_length or set data.truncation to 'drop'", source=source, **place
            ) from None
        return empty_token_row(error.reason)
    if token_row["truncated"] and truncation != "truncate":
        cut = what_was_cut(row, token_row, settings)
        if truncation == "error":
            raise DataFormatError(
                f"does not fit whole ({cut}); raise the limit or set data.truncation to 'truncate' or 'drop'",
                source=source,
                **place,
            )
        return empty_token_row("does not fit whole within max_length / max_prompt_length / max_num_steps")
    return {**token_row, "drop_reason": ""}


def what_was_cut(row: dict, token_row: dict, settings: TokenizeSettings) -> str:
    """Which parts of a row were cut and by which limit, e.g. ``"chosen keeps 5 of 9 steps (max_num_steps 5)"``."""
    parts = []
    for side in SIDES:
        kept, total = len(token_row[f"{side}_steps"]), len(row[f"{side}_steps"])
        if kept < total:
            limit = (
                f"max_num_steps {settings.max_num_steps}"
                if settings.max_num_steps is not None and kept == settings.max_num_steps
                else f"max_length {settings.max_length}"
            )
            parts.append(f"{side} keeps {kept} of {total} steps ({limit})")
    return "; ".join(parts)


def empty_token_row(drop_reason: str) -> dict:
    """A placeholder token row for a dropped row (same columns, filtered out afterwards)."""
    row = {f"{side}_{key}": [] for side in SIDES for key in ("input_ids", "step_ids", "step_scores", "steps")}
    row.update({f"{side}_score": math.nan for side in SIDES})
    row.update(
        first_divergence=0, prompt_json="", id=None, reference_solution=None, truncated=False, prompt_cut=False, drop_reason=drop_reason
    )
    return row
