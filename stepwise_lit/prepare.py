"""Raw sources -> canonical preference pairs on disk, read with the same settings as training.

    stepwise-lit prepare --data.format gsm8k \\
        --data.path ../shared/data/gsm8k/example_model_solutions.jsonl --output gsm8k_pairs.jsonl
    stepwise-lit prepare --data.path synthetic --num_pairs 1000 --data.seed 0 --output synthetic.parquet
    stepwise-lit prepare --config configs/tiny.yaml --output pairs.jsonl

(``python -m stepwise_lit.prepare ...`` is the same command.)

The data settings are the data module's, under the names ``train.py`` takes
(``--data.path``, ``--data.format``, ``--data.step_delimiter``, ``--data.seed``, ...), and
``--config`` reads the ``data:`` section of the same YAML file ``train.py`` reads, so a user
prepares exactly what training will read. ``data.path`` (a file, a data folder or a hub id
``owner/name``) is converted with ``data.format``; a null or ``synthetic`` path generates
synthetic pairs. Settings that only matter to training (lengths, batch sizes) are checked and
otherwise ignored: prepare writes canonical rows, not tokens. ``data.require_scores`` defaults
to false here (rows may lack step scores, e.g. GSM8K model solutions; ``stepwise_lit.score``
fills them).

The output is ``.jsonl`` or ``.parquet`` (by extension), one canonical row
(docs/data.md) per pair. Records that give no pair are counted by reason in
the log; bad input or a bad setting stops the run with one paragraph naming the file, line
or row, field or setting, and exit code 2.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser, Namespace

from stepwise_lit.data.datamodule import StepwiseDataModule, check_data_settings
from stepwise_lit.data.formats import to_canonical
from stepwise_lit.data.records import SIDES
from stepwise_lit.data.sources import SYNTHETIC, DataSource, data_sources, read_source
from stepwise_lit.data.synthetic import MAX_VALUE, generate_pairs
from stepwise_lit.data.writers import check_output, write_rows
from stepwise_lit.errors import (
    TRACEBACK_FLAG,
    TRACEBACK_HELP,
    SettingError,
    check_not_input,
    check_writable_folder,
    exit_on_user_error,
)

logger = logging.getLogger("stepwise_lit")

def prepare(
    format: str,
    output: str | Path,
    input: str | Path | DataSource | None = None,
    step_delimiter: str = "\n\nStep",
    num_pairs: int | None = None,
    seed: int = 0,
    require_scores: bool = False,
    synthetic_max_value: int = MAX_VALUE,
) -> list[dict]:
    """Converts a raw source to canonical rows and writes them.

    Args:
        format: An input format of ``stepwise_lit.data.formats`` (gsm8k, prm800k,
            step_dpo, synthetic, delimited, stepwise, preference); ignored when generating.
        output: Where the rows go (``.jsonl`` or ``.parquet``).
        input: The raw source: a file, a data folder or a hub id ``owner/name`` (its ``train``
            split), or a `DataSource` naming the split, configuration, revision or data files;
            None generates `num_pairs` synthetic pairs.
        step_delimiter: Splits text responses into steps (``delimited``, ``preference``, ``step_dpo``).
        num_pairs: Pairs to generate when there is no input.
        seed: Seed of the synthetic generator and of the GSM8K corruption.
        require_scores: Reject rows without step scores instead of leaving them to ``score``.
        synthetic_max_value: Largest number in a generated problem.

    Returns:
        The rows written.

    Raises:
        SettingError: Without input and `num_pairs`, or for a bad output path (one that is or lies
            in the input).
        DataFormatError: On an unreadable file or an invalid record.
    """
    data_source = DataSource(str(input)) if isinstance(input, (str, Path)) else input
    check_output(Path(output))
    check_not_input(str(output), None if data_source is None else data_source.path, "prepare")
    if data_source is None:
        if num_pairs is None:
            raise SettingError("num_pairs: how many synthetic pairs to generate (there is no data.path to read)")
        records = generate_pairs(num_pairs, seed, max_value=synthetic_max_value)
        format, source = SYNTHETIC, f"synthetic(num_pairs={num_pairs}, seed={seed})"
    else:
        records, source = read_source(data_source), data_source.path
    rows = to_canonical(records, format, source, step_delimiter, require_scores=require_scores, seed=seed)
    write_rows(rows, output)
    unscored = sum(row[f"{side}_step_scores"] is None for row in rows for side in SIDES)
    logger.info("%s: %d records -> %d pairs written to %s", source, len(records), len(rows), output)
    if unscored:
        logger.info("%d responses have no step scores yet; fill them with python -m stepwise_lit.score", unscored)
    return rows


def build_parser() -> ArgumentParser:
    """The command-line options of `prepare`: its own, and the data module's under ``--data.*``."""
    parser = ArgumentParser(
        prog="stepwise-lit prepare",
        description="Convert a raw source to canonical stepwise preference pairs, with train.py's data settings.",
    )
    parser.add_argument(
        "--config", type=str, help="a train.py YAML config; its data: section gives the --data.* defaults"
    )
    parser.add_argument("--output", type=str, required=True, help="output file, .jsonl or .parquet")
    parser.add_argument(
        "--num_pairs",
        type=int | None,
        default=None,
        help="synthetic data (data.path null or synthetic): pairs to generate; "
        "default data.synthetic_train_size + data.synthetic_val_size",
    )
    parser.add_class_arguments(StepwiseDataModule, "data")
    parser.set_defaults({"data.require_scores": False})
    parser.add_argument(TRACEBACK_FLAG, action="store_true", help=TRACEBACK_HELP)
    return parser


def parse_options(args: Sequence[str] | None) -> Namespace:
    """Parse the command line; with ``--config``, its ``data:`` section comes before the flags, which override it.

    Raises:
        SettingError: Naming ``config`` for a file that cannot be read or has no mapping under ``data:``.
    """
    parser = build_parser()
    args = list(sys.argv[1:] if args is None else args)
    options = parser.parse_args(args)
    if options.config is None:
        return options
    try:
        config = yaml.safe_load(Path(options.config).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SettingError(f"config: cannot read {options.config}: {error}") from None
    data = config.get("data", {}) if isinstance(config, dict) else None
    if not isinstance(data, dict):
        raise SettingError(f"config: {options.config} has no mapping of data settings under 'data:'")
    return parser.parse_args(["--data=" + json.dumps(data), *args])


def main(args: Sequence[str] | None = None) -> None:
    """Runs `prepare` from the command line; bad input or a bad setting ends with one paragraph and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if args is None else args)
    exit_on_user_error(lambda: run(parse_options(argv)), argv)


def run(options: Namespace) -> None:
    """Checks the settings and the output folder, then writes the pairs `options` ask for."""
    data = options.data
    check_data_settings(data)
    check_output(Path(options.output))
    check_writable_folder(str(Path(options.output).parent), "output")
    prepare(
        data.format,
        options.output,
        data_sources(data)[0],
        data.step_delimiter,
        data.synthetic_train_size + data.synthetic_val_size if options.num_pairs is None else options.num_pairs,
        data.seed,
        data.require_scores,
        data.synthetic_max_value,
    )


if __name__ == "__main__":
    main()
