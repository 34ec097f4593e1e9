"""File readers: the records of a local .json, .jsonl, .parquet or .csv file, with where each one is.

Places in messages count as an editor shows them: ``line N`` (the 1-based line of the file) for
JSON Lines and CSV, ``row N`` (1-based) for any other source.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepwise_lit.errors import DataFormatError

DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


class Records(list):
    """Records read from a file, in file order, and where each one is in the file.

    A plain list of dicts to every reader; :func:`to_canonical` takes the line numbers
    for its messages.

    Args:
        records: The records.
        line_numbers: 1-based line of each record (JSON Lines; for CSV the record's last
            line), or None when records are counted as rows (a JSON list, parquet).
    """

    def __init__(self, records: Sequence[dict], line_numbers: Sequence[int] | None = None) -> None:
        super().__init__(records)
        self.line_numbers = None if line_numbers is None else list(line_numbers)


def read_records(path: str | Path) -> Records:
    """Read all records of a local ``.json``, ``.jsonl``, ``.parquet`` or ``.csv`` file.

    A ``.json`` file holds one list of objects (or is JSON Lines). Blank lines in
    JSON Lines are skipped. CSV cells are strings; a cell that holds a JSON list or
    object (``"[1, -1]"``) is decoded, and an empty cell reads as None.

    Args:
        path: The file.

    Returns:
        The records, in file order, with their line numbers for JSON Lines and CSV.

    Raises:
        DataFormatError: For a missing file, bytes that are not UTF-8 (with their line), an
            unparseable JSON line (with its line number), a JSON file that is not a list, a
            parquet file that cannot be read, or an unknown file extension.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DATA_FILE_SUFFIXES:
        raise DataFormatError(
            f"unknown file type '{suffix}'; expected .json, .jsonl, .parquet or .csv", source=path.name
        )
    if not path.is_file():
        raise DataFormatError(f"no such file (looked at {path.resolve()})", source=path.name)
    if suffix == ".parquet":
        return read_parquet(path)
    text = read_utf8(path)
    if suffix == ".jsonl":
        return read_json_lines(text, path.name)
    if suffix == ".json":
        return read_json(text, path.name)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records, line_numbers = [], []
    for row in reader:
        records.append({key: decode_csv_cell(value) for key, value in row.items()})
        line_numbers.append(reader.line_num)
    return Records(records, line_numbers)


def read_utf8(path: Path) -> str:
    """The file's text, naming the line and column of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        raise DataFormatError(
            f"not UTF-8 text: byte 0x{data[error.start]:02x} at column {error.start - line_start + 1}; "
            "save the file as UTF-8",
            source=path.name,
            line=data.count(b"\n", 0, error.start) + 1,
        ) from None


def read_parquet(path: Path) -> Records:
    """The rows of a parquet file; a file pyarrow cannot read is a data error."""
    import pyarrow
    import pyarrow.parquet

    try:
        return Records(pyarrow.parquet.read_table(path).to_pylist())
    except (pyarrow.ArrowException, OSError) as error:
        raise DataFormatError(f"not a readable parquet file ({error})", source=path.name) from None


def read_json_lines(text: str, source: str) -> Records:
    """Parse JSON Lines text, naming the first bad line."""
    records, line_numbers = [], []
    for line_number, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataFormatError(
                f"invalid JSON: {error.msg} (column {error.colno})", source=source, line=line_number
            ) from None
        line_numbers.append(line_number)
    return Records(records, line_numbers)


def read_json(text: str, source: str) -> Records:
    """Parse a JSON list of records, or JSON Lines saved as ``.json``; an empty file has no records."""
    if not text.strip():
        return Records([])
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":
            return read_json_lines(text, source)
        raise DataFormatError(
            f"invalid JSON: {error.msg} (column {error.colno})", source=source, line=error.lineno
        ) from None
    if not isinstance(records, list):
        raise DataFormatError(f"expected a JSON list of records, got {type(records).__name__}", source=source)
    return Records(records)


def decode_csv_cell(cell: str | None) -> Any:
    """Read a CSV cell: empty -> None, a JSON list or object -> decoded, else the string."""
    if cell is None or cell == "":
        return None
    if cell.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(cell)
        except json.JSONDecodeError:
            return cell
    return cell
