"""The errors a user can fix: each is shown by the command line as one paragraph with exit code 2
(`--show_traceback` shows the traceback instead). Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

TRACEBACK_FLAG = "--show_traceback"
TRACEBACK_HELP = "On a data or setting error, show the full traceback instead of the one-paragraph message."


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


def exit_on_user_error(run: Callable[[], T], argv: Sequence[str]) -> T:
    """Runs a command; a `UserError` ends it with one paragraph on stderr and exit code 2.

    Every command of ``stepwise-lit`` (the LightningCLI ones, ``prepare``, ``score``, ``evaluate``)
    calls its work through this, so bad input reads the same everywhere: ``error: <message>`` and
    a hint naming ``--show_traceback``. With that flag in `argv` the error keeps its traceback. Parse errors
    of the command line stay with the parser (also exit code 2).

    Args:
        run: The command's work, called without arguments.
        argv: The command-line arguments (looked at for ``--show_traceback`` only).

    Returns:
        What `run` returns.
    """
    try:
        return run()
    except UserError as error:
        if TRACEBACK_FLAG in argv:
            raise
        print(f"error: {error}\n(run again with {TRACEBACK_FLAG} for the full traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def check_writable_folder(folder: str, setting: str) -> None:
    """Creates `folder` if needed and writes (then removes) a probe file in it.

    Raises:
        SettingError: Naming `setting` and the folder, if it cannot be created or written.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise SettingError(f"{setting}: cannot write to {folder}: {error.strerror or error}") from error


def check_not_input(output: str, input: str | None, command: str) -> None:
    """Fails if `output` is the file `input` names, through any path that resolves to it (a
    symlink, ``./``, a hard link), or lies inside an `input` folder.

    Raises:
        SettingError: Naming ``output``, before anything is read or written.
    """
    if input is None or not os.path.exists(input):
        return
    out, source = os.path.realpath(output), os.path.realpath(input)
    if os.path.isdir(source):
        if os.path.commonpath([out, source]) == source:
            raise SettingError(f"output: {output} lies inside the input folder {input}; name a file elsewhere "
                               f"({command} never writes into its input)")
    elif out == source or (os.path.exists(output) and os.path.samefile(output, input)):
        raise SettingError(f"output: {output} is the input file {input}; name another file ({command} never "
                           "overwrites its input)")


class RefusalNamer:
    """Names the setting behind a class that refuses its settings while a jsonargparse parser builds it.

    Register it as the parser's instantiator of the classes a setting names (``parser.add_instantiator(namer,
    StepScorer)``): it builds them as jsonargparse's default instantiator does and keeps the class, keyword
    arguments and error of one whose build raises ValueError or OSError. jsonargparse wraps such an error
    ("Does not validate against any of the Union subtypes") without the setting's name; `instantiate`
    turns it into one `SettingError` naming it, as ``<setting>.init_args.<init argument>: ...`` for a
    `SettingError` of the class (its message starts with the init argument it refuses), else
    ``<setting>: <error>``.
    """

    def __init__(self) -> None:
        self.refused: tuple[type, dict, Exception] | None = None

    def __call__(self, class_type: type, *args: Any, **kwargs: Any) -> Any:
        try:
            return class_type(*args, **kwargs)
        except (ValueError, OSError) as error:
            self.refused = (class_type, kwargs, error)
            raise

    def instantiate(self, build: Callable[[], T], config: Any) -> T:
        """`build()`: the parser's instantiation of `config` (a jsonargparse Namespace). A refused build
        raises `SettingError` naming the section of `config` that holds the refused class and
        settings (the first, where several do); any other error goes on unchanged."""
        self.refused = None
        try:
            return build()
        except (ValueError, OSError) as error:
            setting = None if self.refused is None else setting_of(config.as_dict(), *self.refused[:2])
            if setting is None:
                raise
            refusal = self.refused[2]
            if isinstance(refusal, SettingError):
                raise SettingError(f"{setting}.init_args.{refusal}") from error
            raise SettingError(f"{setting}: {refusal}") from error


def instantiate_naming_refusals(parser: Any, config: Any, class_type: type) -> Any:
    """``parser.instantiate(config)`` (a jsonargparse parser and its parsed Namespace) with a
    `RefusalNamer` as the instantiator of `class_type` and its subclasses.

    Raises:
        SettingError: Naming the setting whose class refused its settings.
    """
    namer = RefusalNamer()
    parser.add_instantiator(namer, class_type)
    return namer.instantiate(lambda: parser.instantiate(config), config)


def setting_of(settings: Any, class_type: type, kwargs: dict, prefix: str = "") -> str | None:
    """The dotted key of the first section of `settings` (nested dicts and lists, as parsed) that is
    ``{class_path: <a path ending in class_type's name>, init_args: kwargs}``; None if none is."""
    if isinstance(settings, Mapping):
        class_path = settings.get("class_path")
        if isinstance(class_path, str) and class_path.rsplit(".", 1)[-1] == class_type.__name__ \
                and (settings.get("init_args") or {}) == kwargs:
            return prefix
        items = settings.items()
    elif isinstance(settings, list):
        items = ((str(index), value) for index, value in enumerate(settings))
    else:
        return None
    for key, value in items:
        found = setting_of(value, class_type, kwargs, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None
