"""Fill the step scores of canonical pairs with a step scorer, as a resumable Lightning predict job.

    stepwise-lit score --config configs/score_tiny.yaml --input pairs.jsonl --output scored.jsonl

(``python -m stepwise_lit.score ...`` is the same command.) The config names the scorer
(``scorer: {class_path, init_args}``), the Trainer settings (``trainer: {accelerator, devices,
strategy, precision, ...}``; with DDP each process scores its share of the rows), ``batch_size``
(pairs per step), ``only_missing`` (score only responses whose step scores are null; otherwise
every response is scored and existing scores are replaced) and ``seed_everything`` (as train.py
spells it; seeds the sampled rationales of a GenRM verifier).

Progress and resume. Every process appends the rows it has scored to its own file
``<output>.parts/rank-<r>.jsonl`` after each batch (flushed and fsynced), so a kill
loses at most the batch in flight. When all rows are done, rank 0 writes
``<output>`` (``.jsonl`` or ``.parquet``) atomically, in input order, and removes
the parts. A new run first cuts a half-written last line off the part files (with
a warning; a half-written last line of a previous output is skipped the same way and
the output rewritten whole at the end), then skips every row, by ``id``, that the previous output or a part
file already holds scored; rows without an ``id`` get ``row-<index>``. To score
everything again, delete ``<output>`` and ``<output>.parts``. On several nodes the
output must be on a file system all nodes share (rank 0 merges every part file).

Bad settings or input (an unreadable input, repeated ids, an output folder that cannot be
written, an output that is the input) end with one paragraph and exit code 2 before any
model is loaded; ``--show_traceback`` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from jsonargparse import ActionConfigFile, ArgumentParser
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from stepwise_lit.data.formats import DataFormatError, to_canonical
from stepwise_lit.data.readers import read_records
from stepwise_lit.data.records import SIDES
from stepwise_lit.data.writers import check_output, parquet_table, write_rows
from stepwise_lit.errors import (
    TRACEBACK_FLAG,
    TRACEBACK_HELP,
    SettingError,
    UserError,
    check_not_input,
    check_writable_folder,
    exit_on_user_error,
    instantiate_naming_refusals,
)
from stepwise_lit.rewards.base import StepScorer

logger = logging.getLogger("stepwise_lit")



def is_scored(row: dict) -> bool:
    """Whether both responses of a row have step scores."""
    return all(row[f"{side}_step_scores"] is not None for side in SIDES)


def rows_with_ids(rows: list[dict], source: str | None = None) -> list[dict]:
    """The rows, each with an ``id`` (``row-<index>`` where missing).

    Args:
        rows: Canonical rows.
        source: The file they came from, for the error message.

    Raises:
        DataFormatError: If two rows share an id (resuming goes by id); the message names
            the first repeated ids with their rows (1-based).
    """
    with_ids = [row if row["id"] is not None else {**row, "id": f"row-{index}"} for index, row in enumerate(rows)]
    repeated = [row_id for row_id, count in Counter(row["id"] for row in with_ids).items() if count > 1]
    if repeated:
        where = "; ".join(
            f"{row_id!r} in rows {', '.join(str(i + 1) for i, row in enumerate(with_ids) if row['id'] == row_id)}"
            for row_id in repeated[:5]
        )
        raise DataFormatError(f"ids must be unique to resume by id; repeated: {where}", source=source, field="id")
    return with_ids


def score_rows(scorer: StepScorer, rows: Sequence[dict], only_missing: bool) -> list[dict]:
    """The rows with step scores filled, all responses of the batch in one `score_steps` call.

    Args:
        scorer: The step scorer.
        rows: Canonical rows.
        only_missing: Score only responses whose step scores are None.

    Returns:
        Copies of the rows with ``chosen_step_scores`` / ``rejected_step_scores`` set.
    """
    targets = [
        (index, side)
        for index, row in enumerate(rows)
        for side in SIDES
        if not only_missing or row[f"{side}_step_scores"] is None
    ]
    scores = scorer.score_steps(
        [rows[index]["prompt"] for index, _ in targets],
        [rows[index][f"{side}_steps"] for index, side in targets],
        [rows[index]["reference_solution"] for index, _ in targets],
    )
    scored = [dict(row) for row in rows]
    for (index, side), side_scores in zip(targets, scores):
        scored[index][f"{side}_step_scores"] = side_scores
    return scored


class ScoreStore:
    """The files of one scoring job: per-rank part files while it runs, the output at the end.

    Args:
        output: The final output file (``.jsonl`` or ``.parquet``).

    Raises:
        SettingError: For another output extension, or an output that is a folder.
    """

    def __init__(self, output: str | Path) -> None:
        self.output = Path(output)
        check_output(self.output)
        if self.output.is_dir():
            raise SettingError(f"output: {output} is a folder; name a .jsonl or .parquet file")
        self.parts = Path(f"{self.output}.parts")

    def part_files(self) -> list[Path]:
        """The part files present, by name."""
        return sorted(self.parts.glob("rank-*.jsonl")) if self.parts.is_dir() else []

    def recover(self) -> None:
        """Cuts a half-written last line (no trailing newline: a killed write) off each part file."""
        for part in self.part_files():
            data = part.read_bytes()
            complete = data.rfind(b"\n") + 1
            if complete < len(data):
                logger.warning(
                    "%s: dropping a half-written last line (%d bytes) left by an interrupted run",
                    part, len(data) - complete,
                )
                with part.open("r+b") as handle:
                    handle.truncate(complete)
                    os.fsync(handle.fileno())

    def previous_output(self) -> list[dict]:
        """The rows of a previous run's output; from a ``.jsonl`` whose last line was cut off
        mid-write, the complete lines only (with a warning; the output is rewritten at the end).

        Raises:
            DataFormatError: For a line other than the last that is not a JSON object.
        """
        if not self.output.exists():
            return []
        if self.output.suffix != ".jsonl":
            return read_records(self.output)
        data = self.output.read_bytes()
        complete = data.rfind(b"\n") + 1
        rows = []
        for number, line in enumerate(data[:complete].decode("utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataFormatError(f"not a JSON object ({error.msg})", source=str(self.output), line=number) from error
        tail = data[complete:]
        if tail.strip():
            try:
                rows.append(json.loads(tail))
            except json.JSONDecodeError:
                logger.warning(
                    "%s: skipping a half-written last line (%d bytes) left by an interrupted write; its row is scored again",
                    self.output, len(tail),
                )
        return rows

    def done_rows(self) -> dict[str, dict]:
        """Rows already scored, by id: those of a previous output, then the part files (later wins)."""
        rows = self.previous_output()
        for part in self.part_files():
            rows.extend(read_records(part))
        return {row["id"]: row for row in rows if row.get("id") is not None and is_scored(row)}

    def append(self, rank: int, rows: Sequence[dict]) -> None:
        """Appends scored rows to this rank's part file and forces them to disk."""
        self.parts.mkdir(parents=True, exist_ok=True)
        with (self.parts / f"rank-{rank}.jsonl").open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            handle.flush()
            os.fsync(handle.fileno())

    def check_writable(self, rows: Sequence[dict]) -> None:
        """Fails before any scoring where the output could not be written or could not hold the rows:
        creates the output's folder if needed and writes (then removes) a probe file in it.

        Raises:
            SettingError: For a folder that cannot be created or written, or a ``.parquet``
                output and rows that do not fit one schema.
        """
        check_writable_folder(str(self.output.parent), "output")
        if self.output.suffix == ".parquet":
            try:
                parquet_table(rows)
            except ValueError as error:
                raise SettingError(f"output: {self.output}: {error}") from error

    def finalize(self, rows: Sequence[dict]) -> list[dict]:
        """Writes the output: every input row in order, its scored version where one exists;
        then removes the part files. Logs how many rows each part file held.

        Returns:
            The rows written.
        """
        counts = {part.name: part.read_bytes().count(b"\n") for part in self.part_files()}
        if counts:
            logger.info("merging part files: %s", ", ".join(f"{name} {count} rows" for name, count in counts.items()))
        done = self.done_rows()
        final = [done.get(row["id"], row) for row in rows]
        write_rows(final, self.output)
        shutil.rmtree(self.parts, ignore_errors=True)
        return final


class ScoringModule(pl.LightningModule):
    """Lightning wrapper that scores a batch of rows in `predict_step`.

    Args:
        scorer: The step scorer (moved to the device by Lightning).
        only_missing: Score only responses whose step scores are None.
    """

    def __init__(self, scorer: StepScorer, only_missing: bool) -> None:
        super().__init__()
        self.scorer = scorer
        self.only_missing = only_missing

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        return score_rows(self.scorer, batch, self.only_missing)


class ScoringDataModule(pl.LightningDataModule):
    """Serves the rows that still need scoring, decided after the processes start.

    Args:
        rows: All input rows (with ids).
        store: The job's files (for recovery and what is already done).
        batch_size: Rows per batch.
        only_missing: Rows whose responses all have scores need no scoring.
    """

    def __init__(self, rows: list[dict], store: ScoreStore, batch_size: int, only_missing: bool) -> None:
        super().__init__()
        self.rows = rows
        self.store = store
        self.batch_size = batch_size
        self.only_missing = only_missing
        self.pending: list[dict] = []

    def setup(self, stage: str) -> None:
        """Rank 0 repairs the part files; then every rank lists the same pending rows."""
        if self.trainer.is_global_zero:
            self.store.recover()
        self.trainer.strategy.barrier("score-recover")
        done = self.store.done_rows()
        fresh = [row for row in self.rows if row["id"] not in done]
        self.pending = [row for row in fresh if not (self.only_missing and is_scored(row))]
        if self.trainer.is_global_zero:
            logger.info(
                "%d rows: %d already scored, %d need no scoring, %d to score",
                len(self.rows), len(self.rows) - len(fresh), len(fresh) - len(self.pending), len(self.pending),
            )

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.pending, batch_size=self.batch_size, shuffle=False, collate_fn=list)


class ScoreWriter(BasePredictionWriter):
    """Appends each scored batch to the rank's part file as soon as it is scored.

    Args:
        store: The job's files.
    """

    def __init__(self, store: ScoreStore) -> None:
        super().__init__(write_interval="batch")
        self.store = store

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        self.store.append(trainer.global_rank, prediction)


def load_rows(input: str | Path) -> list[dict]:
    """Reads and validates canonical pairs (scores may be null) and gives each an id.

    Raises:
        DataFormatError: On an unreadable file, an invalid row or repeated ids.
    """
    return rows_with_ids(to_canonical(read_records(input), "stepwise", str(input), require_scores=False), str(input))


def run(
    scorer: StepScorer,
    rows: list[dict],
    store: ScoreStore,
    batch_size: int = 8,
    only_missing: bool = False,
    trainer: dict | None = None,
) -> list[dict] | None:
    """Scores the rows into the store's output, resuming where a previous run stopped.

    Args:
        scorer: The step scorer.
        rows: Canonical rows with unique ids (see `load_rows`).
        store: The job's files.
        batch_size: Pairs per predict step.
        only_missing: Score only responses whose step scores are null.
        trainer: Keyword arguments of ``lightning.pytorch.Trainer`` (``logger`` and the
            model summary default to off).

    Returns:
        The rows written, on global rank 0; None on other ranks.
    """
    settings = {"logger": False, "enable_model_summary": False, **(trainer or {})}
    runner = pl.Trainer(**settings, callbacks=[ScoreWriter(store)])
    datamodule = ScoringDataModule(rows, store, batch_size, only_missing)
    runner.predict(ScoringModule(scorer, only_missing), datamodule=datamodule, return_predictions=False)
    runner.strategy.barrier("score-written")
    if not runner.is_global_zero:
        return None
    final = store.finalize(rows)
    logger.info("wrote %d rows to %s", len(final), store.output)
    return final


def build_parser() -> ArgumentParser:
    """The command-line and config options of `score`."""
    parser = ArgumentParser(prog="stepwise-lit score", description="Fill the step scores of canonical pairs.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (see configs/score_*.yaml)")
    parser.add_argument("--input", type=str, required=True, help="canonical pairs")
    parser.add_argument("--output", type=str, required=True, help="scored pairs, .jsonl or .parquet")
    parser.add_subclass_arguments(StepScorer, "scorer", required=True)
    parser.add_class_arguments(pl.Trainer, "trainer", skip={"callbacks"}, instantiate=False)
    parser.set_defaults({"trainer.logger": False, "trainer.enable_model_summary": False})
    parser.add_argument("--batch_size", type=PositiveInt, default=8, help="pairs per predict step")
    parser.add_argument("--only_missing", type=bool, default=False, help="score only responses without scores")
    parser.add_argument("--seed_everything", type=int, default=0,
                        help="seed of every random number generator, as train.py's (sampled GenRM rationales)")
    parser.add_argument(TRACEBACK_FLAG, action="store_true", help=TRACEBACK_HELP)
    return parser


def check_input_and_output(input: Path, output: Path) -> None:
    """Fails unless the input is a file and the output is another file.

    Raises:
        SettingError: Naming ``input`` or ``output``.
    """
    if not input.is_file():
        raise SettingError(f"input: {input} {'is a folder' if input.exists() else 'does not exist'}")
    check_not_input(str(output), str(input), "score")


def instantiate_scorer(parser: ArgumentParser, config):
    """The instantiated settings (the scorer) of a parsed config.

    Raises:
        SettingError: Naming ``scorer`` where its settings are rejected or its files cannot be read
            (``scorer.init_args.<setting>`` where the scorer names the setting it refuses; see
            `stepwise_lit.errors.RefusalNamer`).
    """
    try:
        return instantiate_naming_refusals(parser, config, StepScorer)
    except UserError:
        raise
    except (ValueError, OSError) as error:
        raise SettingError(f"scorer: {error}") from error


def main(args: Sequence[str] | None = None) -> None:
    """Runs `score` from the command line (`args`: without the program name; None reads
    `sys.argv`). Bad settings or input end with their one-paragraph message and exit code 2
    before any model is loaded (see `stepwise_lit.errors.exit_on_user_error`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    config = parser.parse_args(args)
    pl.seed_everything(config.seed_everything, verbose=False)

    def score() -> None:
        store = ScoreStore(config.output)
        check_input_and_output(Path(config.input), store.output)
        rows = load_rows(config.input)
        store.check_writable(rows)
        settings = instantiate_scorer(parser, config)
        run(settings.scorer, rows, store, config.batch_size, config.only_missing, settings.trainer.as_dict())

    exit_on_user_error(score, sys.argv[1:] if args is None else list(args))


if __name__ == "__main__":
    main()
