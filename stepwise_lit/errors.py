"""The errors a user can fix: each is shown by the command line as one paragraph with exit code 2
(`--show_traceback` shows the traceback instead). Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or a bad setting; the message names what and where (file, row, field, setting)."""


class SettingError(UserError):
    """A setting that cannot be used; the message starts with the setting's name (``model.step_beta: ...``)."""


class DataFormatError(UserError):
    """A data record that cannot be used, in one paragraph.

    The message reads ``"<source> line <line>: field '<field>': <problem>"`` (JSON Lines,
    CSV: the line of the file) or ``"<source> row <row>: ..."`` (other sources), with the
    parts that are unknown left out. Both count from 1, as an editor shows them.

    Args:
        problem: What is wrong, in words.
        source: The file or dataset the record came from.
        row: 1-based position of the record in the source, for sources without lines.
        field: The offending field, as the user's file names it.
        line: 1-based line of the file.
    """

    def __init__(
        self,
        problem: str,
        source: str | None = None,
        row: int | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.problem = problem
        self.source = source
        self.row = row
        self.field = field
        self.line = line
        location = " ".join(
            part
            for part in (
                source,
                None if row is None else f"row {row}",
                None if line is None else f"line {line}",
            )
            if part
        )
        prefixes = [part for part in (location, None if field is None else f"field '{field}'") if part]
        super().__init__(": ".join([*prefixes, problem]))
