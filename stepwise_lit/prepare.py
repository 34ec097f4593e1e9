"""Raw sources -> canonical preference pairs on disk.

    python -m stepwise_lit.prepare --format gsm8k \\
        --input ../shared/data/gsm8k/example_model_solutions.jsonl --output gsm8k_pairs.jsonl
    python -m stepwise_lit.prepare --format synthetic --num-pairs 1000 --seed 0 --output synthetic.parquet
    python -m stepwise_lit.prepare --format delimited --input raw.jsonl \\
        --step-delimiter '\\n\\nStep' --output pairs.jsonl

The output is ``.jsonl`` or ``.parquet`` (by extension), one canonical row
(docs/contract.md) per pair. Records that give no pair are counted by reason in
the log; an invalid record stops the run with a message naming its row and field.
Rows may lack step scores (e.g. GSM8K model solutions); ``stepwise_lit.score``
fills them.
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from stepwise_lit.data.formats import ADAPTERS, DataFormatError, read_records, to_canonical
from stepwise_lit.data.synthetic import generate_pairs

logger = logging.getLogger("stepwise_lit")

OUTPUT_SUFFIXES = (".jsonl", ".parquet")


def write_rows(rows: Sequence[dict], path: str | Path) -> None:
    """Writes rows to a ``.jsonl`` or ``.parquet`` file atomically (a temporary file
    next to it, fsynced, then renamed), so a reader never sees half a file.

    Raises:
        ValueError: For another extension, or rows parquet cannot hold in one
            schema (e.g. string prompts mixed with chat-message prompts).
    """
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {path} must end in {' or '.join(OUTPUT_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".jsonl":
        with temporary.open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            handle.flush()
            os.fsync(handle.fileno())
    else:
        write_parquet(rows, temporary)
    os.replace(temporary, path)


def write_parquet(rows: Sequence[dict], path: Path) -> None:
    """Writes rows as one parquet table (schema inferred from the rows)."""
    import pyarrow.parquet

    pyarrow.parquet.write_table(parquet_table(rows), path)


def parquet_table(rows: Sequence[dict]):
    """The rows as a ``pyarrow.Table``, its schema inferred from them.

    Raises:
        ValueError: If the rows do not fit one schema (e.g. string prompts mixed
            with chat-message prompts).
    """
    import pyarrow

    try:
        return pyarrow.Table.from_pylist(list(rows))
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:
        raise ValueError(f"these rows do not fit one parquet schema ({error}); write .jsonl instead") from error


def prepare(
    format: str,
    output: str | Path,
    input: str | Path | None = None,
    step_delimiter: str = "\n\nStep",
    num_pairs: int | None = None,
    seed: int = 0,
    require_scores: bool = False,
) -> list[dict]:
    """Converts a raw source to canonical rows and writes them.

    Args:
        format: An input format of ``stepwise_lit.data.formats`` (gsm8k, prm800k,
            synthetic, delimited, stepwise, preference).
        output: Where the rows go (``.jsonl`` or ``.parquet``).
        input: The raw file; for ``synthetic`` without one, `num_pairs` pairs are generated.
        step_delimiter: Splits text responses into steps (``delimited``, ``preference``).
        num_pairs: Pairs to generate for ``synthetic`` without an input file.
        seed: Seed of the synthetic generator and of the GSM8K corruption.
        require_scores: Reject rows without step scores instead of leaving them to ``score``.

    Returns:
        The rows written.

    Raises:
        DataFormatError: On an invalid record, or a missing input.
        ValueError: On a bad output path.
    """
    if input is None and not (format == "synthetic" and num_pairs is not None):
        raise DataFormatError(f"--input is required for format {format!r} (only synthetic generates: --num-pairs)")
    if input is None:
        records, source = generate_pairs(num_pairs, seed), f"synthetic(num_pairs={num_pairs}, seed={seed})"
    else:
        records, source = read_records(input), str(input)
    rows = to_canonical(records, format, source, step_delimiter, require_scores=require_scores, seed=seed)
    write_rows(rows, output)
    unscored = sum(row[f"{side}_step_scores"] is None for row in rows for side in ("chosen", "rejected"))
    logger.info("%s: %d records -> %d pairs written to %s", source, len(records), len(rows), output)
    if unscored:
        logger.info("%d responses have no step scores yet; fill them with python -m stepwise_lit.score", unscored)
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of `prepare`."""
    parser = argparse.ArgumentParser(
        prog="stepwise-lit-prepare", description="Convert a raw source to canonical stepwise preference pairs."
    )
    parser.add_argument("--format", required=True, choices=sorted(ADAPTERS), help="input format")
    parser.add_argument("--input", help="raw file (.json, .jsonl, .parquet, .csv); not needed for synthetic")
    parser.add_argument("--output", required=True, help="output file, .jsonl or .parquet")
    parser.add_argument(
        "--step-delimiter", default="\\n\\nStep", help="step delimiter for text responses; backslash escapes decoded"
    )
    parser.add_argument("--num-pairs", type=int, help="synthetic: how many pairs to generate")
    parser.add_argument("--seed", type=int, default=0, help="seed (synthetic generation, GSM8K corruption)")
    parser.add_argument("--require-scores", action="store_true", help="reject rows without step scores")
    return parser


def main(args: Sequence[str] | None = None) -> None:
    """Runs `prepare` from the command line; a data error ends with its message and exit code 2."""
    options = build_parser().parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        prepare(
            options.format,
            options.output,
            options.input,
            codecs.decode(options.step_delimiter, "unicode_escape"),
            options.num_pairs,
            options.seed,
            options.require_scores,
        )
    except (DataFormatError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
