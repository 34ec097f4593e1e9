"""Online rounds on disk: each round's solutions and pairs as JSON Lines, written before training, and resuming.

Round ``r`` lives in ``<root>/online/round-<r>/``:

- ``solutions.jsonl``: one line per sampled solution, ``{prompt_id, sample, prompt,
  reference_solution, completion, steps, step_scores, answer, correct}`` (prompt order, then
  sample order);
- ``pairs.jsonl``: the training pairs as canonical rows, readable later with ``--data.path
  <pairs.jsonl> --data.format stepwise`` (empty when no prompt gave a pair).

Each file is written to a temporary file in the same folder (``.<name>.<random>.tmp``) and
renamed over its name, so a file that exists is whole. ``solutions.jsonl`` is written first,
``pairs.jsonl`` last: a round is complete when both exist (:func:`round_state`). A run killed
in a round resumes it with :func:`run_round`: a complete round is read back, a round with only
its solutions gets its pairs built again from them (no second generation), any other round is
generated. Nothing is overwritten or deleted: temporary files a killed run left are logged and
kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from stepwise_lit.data.formats import to_canonical
from stepwise_lit.data.readers import read_records
from stepwise_lit.data.records import Prompt
from stepwise_lit.data.writers import write_rows
from stepwise_lit.errors import DataFormatError, UserError
from stepwise_lit.models.generate import Generator
from stepwise_lit.online.pairs import PairSettings, ScoredPrompt, ScoredSolution, build_pairs
from stepwise_lit.online.solutions import RoundRecord, RoundSettings, checked_prompt_ids, generate_round
from stepwise_lit.rewards.base import StepScorer

log = logging.getLogger("stepwise_lit")

SOLUTIONS_FILE = "solutions.jsonl"
PAIRS_FILE = "pairs.jsonl"
SOLUTION_FIELDS = ("prompt_id", "sample", "prompt", "reference_solution", "completion", "steps", "step_scores",
                   "answer", "correct")
RoundState = Literal["missing", "generated", "complete"]


def round_folder(root: str | Path, index: int) -> Path:
    """``<root>/online/round-<index>``."""
    return Path(root) / "online" / f"round-{index}"


def solution_rows(prompts: Sequence[ScoredPrompt]) -> list[dict]:
    """The lines of ``solutions.jsonl``: one per solution."""
    return [
        {"prompt_id": prompt.id, "sample": sample, "prompt": prompt.prompt,
         "reference_solution": prompt.reference_solution, "completion": solution.completion,
         "steps": solution.steps, "step_scores": solution.step_scores, "answer": solution.answer,
         "correct": solution.correct}
        for prompt in prompts
        for sample, solution in enumerate(prompt.solutions)
    ]


def read_solutions(path: Path) -> list[ScoredPrompt]:
    """The scored prompts of a ``solutions.jsonl``, lines grouped by ``prompt_id`` in first-seen order.

    Raises:
        DataFormatError: For a line missing a field (naming the line), or samples out of order.
    """
    records = read_records(path)
    prompts: dict[str, ScoredPrompt] = {}
    for record, line in zip(records, records.line_numbers):
        missing = [name for name in SOLUTION_FIELDS if name not in record]
        if missing:
            raise DataFormatError(f"missing (written by an online round): {', '.join(missing)}", source=str(path),
                                  line=line, field=missing[0])
        prompt = prompts.setdefault(
            record["prompt_id"], ScoredPrompt(record["prompt_id"], record["prompt"], record["reference_solution"], [])
        )
        if record["sample"] != len(prompt.solutions):
            raise DataFormatError(f"sample {record['sample']} follows {len(prompt.solutions)} samples of its prompt",
                                  source=str(path), line=line, field="sample")
        prompt.solutions.append(ScoredSolution(record["completion"], record["steps"], record["step_scores"],
                                               record["answer"], record["correct"]))
    return list(prompts.values())


def read_pairs(path: Path) -> list[dict]:
    """The canonical rows of a ``pairs.jsonl`` (as ``--data.format stepwise`` reads them); none when it is empty."""
    records = read_records(path)
    return list(to_canonical(records, "stepwise", str(path))) if records else []


def round_state(root: str | Path, index: int) -> RoundState:
    """Whether round ``index`` is ``complete`` (solutions and pairs written), ``generated``
    (solutions only) or ``missing`` (nothing, or only temporary files).

    Raises:
        UserError: If ``pairs.jsonl`` exists without ``solutions.jsonl`` (not written by this package).
    """
    folder = round_folder(root, index)
    has_solutions, has_pairs = (folder / SOLUTIONS_FILE).is_file(), (folder / PAIRS_FILE).is_file()
    if has_pairs and not has_solutions:
        raise UserError(f"{folder}: {PAIRS_FILE} without {SOLUTIONS_FILE}; an online round writes solutions first. "
                        "Use a new run folder or move this round away")
    return "complete" if has_pairs else "generated" if has_solutions else "missing"


def last_complete_round(root: str | Path) -> int | None:
    """The last of the complete rounds 0, 1, ... (counting stops at the first incomplete one);
    None when round 0 is not complete."""
    index = 0
    while round_state(root, index) == "complete":
        index += 1
    return index - 1 if index else None


def check_same_prompts(folder: Path, prompts: Sequence[ScoredPrompt], prompt_ids: list[str]) -> None:
    """Raise a ``UserError`` unless a round on disk was sampled for exactly these prompt ids."""
    written = [prompt.id for prompt in prompts]
    if written != prompt_ids:
        raise UserError(f"{folder / SOLUTIONS_FILE}: written for prompts {written[:5]}..., this run asks for "
                        f"{prompt_ids[:5]}...; the prompts changed since the round was written: use a new run folder")


def run_round(
    root: str | Path,
    index: int,
    generator: Generator,
    scorer: StepScorer,
    prompts: Sequence[Prompt],
    references: Sequence[str | None],
    settings: RoundSettings,
    prompt_ids: Sequence[str] | None = None,
) -> RoundRecord:
    """Round ``index`` of a run in ``root``, on disk before it is returned: read back, finished or generated.

    - complete: its solutions and pairs are read; the pairs must be what ``settings.pairs``
      builds from the solutions;
    - generated (killed after writing solutions): pairs are built from the written solutions
      and written;
    - missing: :func:`~stepwise_lit.online.solutions.generate_round`, then solutions, then pairs are written.

    Args:
        root: The run folder.
        index: The round (0-based).
        generator, scorer, prompts, references, settings, prompt_ids: As ``generate_round`` takes them.

    Returns:
        The round (``seconds`` is empty unless it was generated now).

    Raises:
        UserError: If the round on disk was written for other prompt ids, or its pairs differ from
            what the settings build (the settings changed: use a new run folder).
    """
    ids = checked_prompt_ids(prompt_ids, len(prompts))
    if round_state(root, index) != "missing":
        return finish_round(root, index, ids, settings.pairs)
    record = generate_round(generator, scorer, prompts, references, settings, ids)
    write_rows(solution_rows(record.prompts), round_folder(root, index) / SOLUTIONS_FILE, overwrite=False)
    return finish_round(root, index, ids, settings.pairs, generated=record)


def finish_round(
    root: str | Path, index: int, prompt_ids: list[str], pairs: PairSettings, generated: RoundRecord | None = None
) -> RoundRecord:
    """Round ``index``, whose ``solutions.jsonl`` is on disk, with its pairs: built from the
    solutions and written, or, for a complete round, checked against ``pairs.jsonl``; logged.

    Args:
        root: The run folder.
        index: The round (0-based).
        prompt_ids: The ids the round's prompts must have.
        pairs: How pairs are built.
        generated: The round as it was just generated (and its solutions written); None reads
            the solutions back.

    Raises:
        UserError: If the round on disk was written for other prompt ids, or its pairs differ from
            what the settings build (the settings changed: use a new run folder).
    """
    folder = round_folder(root, index)
    leftovers = sorted(path.name for path in folder.glob(".*.tmp")) if folder.is_dir() else []
    if leftovers:
        log.warning("%s: temporary files of an interrupted write are kept: %s", folder, ", ".join(leftovers))
    if generated is None:
        written = read_solutions(folder / SOLUTIONS_FILE)
        check_same_prompts(folder, written, prompt_ids)
        record = RoundRecord(written, build_pairs(written, pairs))
    else:
        record = generated
    state = round_state(root, index)
    if state == "complete":
        if read_pairs(folder / PAIRS_FILE) != record.pairs.rows:
            raise UserError(f"{folder / PAIRS_FILE}: differs from the pairs the online.pairs settings build from "
                            f"{SOLUTIONS_FILE}; the settings changed since the round was written: use a new run folder")
    else:
        write_rows(record.pairs.rows, folder / PAIRS_FILE, overwrite=False)
    how = "generated" if generated is not None else "read back" if state == "complete" else (
        "pairs built from the written solutions")
    num_solutions = sum(len(prompt.solutions) for prompt in record.prompts)
    log.info("online round %d (%s): %d prompts, %d solutions, %d pairs (%d with the reference as the correct side), "
             "prompts skipped by reason: %s", index, how, len(record.prompts), num_solutions, len(record.pairs.rows),
             record.pairs.reference_pairs, record.pairs.skipped or "none")
    return record
