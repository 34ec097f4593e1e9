"""The one row writer: rows to a ``.jsonl`` or ``.parquet`` file, atomically.

A temporary file in the same folder (``.<name>.<random>.tmp``) is written, fsynced and renamed over
the name, so a file that exists is whole; a failed write removes its temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from stepwise_lit.errors import SettingError

OUTPUT_SUFFIXES = (".jsonl", ".parquet")


def check_output(path: Path) -> None:
    """Raise :class:`SettingError` naming ``output`` unless it ends in ``.jsonl`` or ``.parquet``."""
    if path.suffix not in OUTPUT_SUFFIXES:
        raise SettingError(f"output: {path} must end in {' or '.join(OUTPUT_SUFFIXES)}")


def parquet_table(rows: Sequence[dict]):
    """The rows as a ``pyarrow.Table``, its schema inferred from them.

    Raises:
        SettingError: If the rows do not fit one schema (e.g. string prompts mixed
            with chat-message prompts).
    """
    import pyarrow

    try:
        return pyarrow.Table.from_pylist(list(rows))
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:
        raise SettingError(f"output: these rows do not fit one parquet schema ({error}); write .jsonl instead") from None


def write_rows(rows: Sequence[dict], path: str | Path, overwrite: bool = True) -> None:
    """Writes ``rows`` to ``path``: one parquet table for ``.parquet``, else JSON Lines (one row per line).

    Args:
        rows: The rows (JSON-serialisable dicts).
        path: The file; its folder is created.
        overwrite: False refuses a file that exists (an online round's files are written once).

    Raises:
        FileExistsError: If ``path`` exists and ``overwrite`` is False.
        SettingError: For rows parquet cannot hold in one schema.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; it is written once and never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            if path.suffix == ".parquet":
                import pyarrow.parquet

                pyarrow.parquet.write_table(parquet_table(rows), file)
            else:
                file.writelines((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8") for row in rows)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)  # written by this call
        raise
