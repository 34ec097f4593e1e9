"""The errors a user can fix: each is shown by the command line as one paragraph with exit code 2
(`--show_traceback` shows the traceback instead). Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or a bad setting; the message names what and where (file, row, field, setting)."""


class SettingError(UserError):
    """A setting that cannot be used; the message starts with the setting's name (``model.step_beta: ...``)."""


class DataFormatError(UserError):
    """A data record that cannot be used, in one paragraph.

    The message reads ``"<source> row <index>: field '<field>': <problem>"``, with
    the parts that are unknown left out.

    Args:
        problem: What is wrong, in words.
        source: The file or dataset the record came from.
        index: 0-based row index of the record in the source.
        field: The offending field.
        line: 1-based line number, for errors in a text file before rows exist.
    """

    def __init__(
        self,
        problem: str,
        source: str | None = None,
        index: int | None = None,
        field: str | None = None,
        line: int | None = None,
    ) -> None:
        self.problem = problem
        self.source = source
        self.index = index
        self.field = field
        self.line = line
        location = " ".join(
            part
            for part in (
                source,
                None if index is None else f"row {index}",
                None if line is None else f"line {line}",
            )
            if part
        )
        prefixes = [part for part in (location, None if field is None else f"field '{field}'") if part]
        super().__init__(": ".join([*prefixes, problem]))
