"""Writes docs/configuration.md: every setting of every command, read from the commands' own parsers.

    python docs/configuration.py           # rewrites docs/configuration.md
    python docs/configuration.py --check   # exit 1 when the committed page differs from a fresh one

The parsers are the ones the commands use (the LightningCLI parser of `train.py`, captured with
`jsonargparse.capture_parser` before it parses anything, and `build_parser()` of `prepare`, `score`
and `evaluate`), so every key, type and default is what the command accepts; jsonargparse reads the
descriptions from the docstrings (the `Args:` / `Attributes:` sections). A setting whose
docstring says nothing is written as "(no description)" and named on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from jsonargparse import ActionConfigFile, ActionSubCommands, ArgumentParser, Namespace, capture_parser, namespace_to_dict

import stepwise_lit.rewards
from stepwise_lit import evaluate, prepare, score
from stepwise_lit.cli import run_cli
from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.evaluation.generation import SolveRateEvaluation
from stepwise_lit.evaluation.report import StepRewardReport
from stepwise_lit.models.export import HuggingFaceExport
from stepwise_lit.module import StepwiseDPOModule
from stepwise_lit.online.training import OnlineRounds

PAGE = Path(__file__).with_name("configuration.md")
TRAINER_DOCS = "https://lightning.ai/docs/pytorch/stable/common/trainer.html#trainer-class-api"
NO_DESCRIPTION = "(no description)"
LINKED = "linked from"  # the default cell of a setting another setting fills
SECTION_CLASSES = {
    "model": StepwiseDPOModule,
    "data": StepwiseDataModule,
    "evaluation": SolveRateEvaluation,
    "report": StepRewardReport,
    "export": HuggingFaceExport,
    "online": OnlineRounds,
}
"""The classes behind train.py's YAML sections (`stepwise_lit.cli.StepwiseCLI`)."""
LINKED_SECTION = "trainer"  # Lightning's own settings: linked to, not listed
HEADER = """# Configuration

Every setting of every command, generated from the docstrings by `python docs/configuration.py`
(do not edit: `tests/e2e/test_docs.py` fails when this page differs from a fresh one). A key
`model.step_beta` is written in YAML as `model:` / `  step_beta: 0.1`, or on the command line as
`--model.step_beta=0.1`; defaults are in YAML (`null` is None). Types such as `StepScorer` take a
`class_path` (one of the [step scorers](#step-scorers)) and its `init_args`.
"""


class Row(NamedTuple):
    """One setting: its dotted key, type, default and description (all as page text)."""

    key: str
    type: str
    default: str
    description: str


def parser_actions(parser: ArgumentParser) -> list[argparse.Action]:
    """The parser's actions (argparse keeps them in `_actions` and has no public list)."""
    return list(parser._actions)


def action_type(action: argparse.Action):
    """The type hint jsonargparse checks a value against (`_typehint`; plain argparse's `type`)."""
    return getattr(action, "_typehint", action.type)


def action_type_text(action: argparse.Action) -> str:
    """The type column of an action: its type hint, `path` for a config file, `flag` for a switch."""
    if isinstance(action, ActionConfigFile):
        return "path"
    if action.nargs == 0:
        return "flag"
    return type_text(action_type(action))


def type_text(hint) -> str:
    """A type hint as users write values: `int | null`, `"copy" | "adapter"`, `list[str]`."""
    if hint is None:
        return ""
    if hint is type(None):
        return "null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(arg) for arg in args)
    if origin is typing.Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if name == "Callable" and args and isinstance(args[0], list):
            return f"Callable[[{', '.join(type_text(arg) for arg in args[0])}], {type_text(args[1])}]"
        return f"{name}[{', '.join(type_text(arg) for arg in args)}]" if args else name
    return getattr(hint, "__name__", str(hint))


def default_text(action: argparse.Action) -> str:
    """The default as YAML (JSON, which YAML reads), "required", or "" where argparse hides it."""
    if action.required:
        return "required"
    value = action.default
    if value is argparse.SUPPRESS:
        return ""
    return json.dumps(plain(value), ensure_ascii=False)


def plain(value):
    """A default as JSON-able data: namespaces and dataclasses as dicts, classes and functions as
    their import paths, paths as strings (no memory addresses)."""
    if isinstance(value, Namespace):
        value = namespace_to_dict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def description(action: argparse.Action) -> str:
    """The help text on one line."""
    return " ".join((action.help or "").split())


def optional_dataclass(hint) -> type | None:
    """The dataclass of a `Dataclass | None` setting, whose fields are settings of their own."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    classes = [arg for arg in args if arg is not type(None)]
    if len(classes) == 1 and dataclasses.is_dataclass(classes[0]) and isinstance(classes[0], type):
        return classes[0]
    return None


def is_setting(action: argparse.Action) -> bool:
    """Whether an action is a setting (not help, print_config, a section's config loader or a link)."""
    name = type(action).__name__
    return bool(action.option_strings) and not any(
        marker in name for marker in ("Help", "PrintConfig", "ConfigLoad", "Link")
    )


def dataclass_rows(cls: type, key: str) -> list[Row]:
    """The fields of a dataclass setting at `key`, as jsonargparse reads them (docstring `Attributes:`)."""
    parser = ArgumentParser()
    parser.add_class_arguments(cls, key)
    return rows(parser)


def linked_rows(parser: ArgumentParser) -> list[Row]:
    """Settings another setting fills (`link_arguments`): listed with their source, not settable."""
    found = []
    for action in parser_actions(parser):
        if "Link" not in type(action).__name__:
            continue
        section = action.dest.split(".")[0]
        sources = ", ".join(f"`{source[0]}`" for source in action.source)
        help_text = ""
        if section in SECTION_CLASSES:
            standalone = ArgumentParser()
            standalone.add_class_arguments(SECTION_CLASSES[section], section, fail_untyped=False, sub_configs=True)
            help_text = next((description(a) for a in parser_actions(standalone) if a.dest == action.dest), "")
        found.append(Row(action.dest, type_text(action.type), f"{LINKED} {sources}", help_text))
    return found


def rows(parser: ArgumentParser) -> list[Row]:
    """Every setting of `parser` in its own order, with the fields of `Dataclass | None` settings after them."""
    found = []
    for action in parser_actions(parser):
        if not is_setting(action):
            continue
        hint = action_type(action)
        found.append(Row(action.dest, action_type_text(action), default_text(action), description(action)))
        nested = optional_dataclass(hint)
        if nested is not None:
            found += dataclass_rows(nested, action.dest)
    return found + linked_rows(parser)


def section_of(key: str) -> str:
    """The YAML section of a key: its first part, or "" for a top-level option."""
    return key.split(".")[0] if "." in key else ""


def by_section(found: list[Row]) -> dict[str, list[Row]]:
    """Rows grouped by section, sections in order of first appearance (top-level options first)."""
    sections: dict[str, list[Row]] = {"": []}
    sections_keys = {section_of(row.key) for row in found}
    for row in found:
        # an option that takes a whole section at once (`--data '{...}'`) goes with the section
        section = row.key if row.key in sections_keys else section_of(row.key)
        sections.setdefault(section, []).append(row)
    return sections


def cell(text: str) -> str:
    """Table-cell text: pipes escaped, empty cells left empty."""
    return text.replace("|", "\\|")


def code(text: str) -> str:
    """Text in a code span, or nothing for empty text."""
    return f"`{cell(text)}`" if text else ""


def table(found: list[Row], extra_column: dict[str, str] | None = None, extra_name: str = "") -> list[str]:
    """A Markdown table of rows (an extra column, e.g. the subcommands a key belongs to, if given)."""
    head = ["key", *([extra_name] if extra_column else []), "type", "default", "description"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in found:
        extra = [extra_column[row.key]] if extra_column else []
        text = cell(row.description) if row.description else f"*{NO_DESCRIPTION}*"
        default = cell(row.default) if row.default.startswith(LINKED) else code(row.default)
        lines.append("| " + " | ".join([code(row.key), *extra, code(row.type), default, text]) + " |")
    return lines + [""]


def train_parsers() -> dict[str, ArgumentParser]:
    """The parser of each `train.py` subcommand (`fit`, `validate`, `test`, `predict`), built as
    `train.py` builds it and captured before it parses."""
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it is given args beside sys.argv's
    try:
        root = capture_parser(lambda: run_cli([], []))
    finally:
        sys.argv = argv
    commands = next(a for a in parser_actions(root) if isinstance(a, ActionSubCommands))
    return dict(commands.choices)


def train_section(parsers: dict[str, ArgumentParser]) -> tuple[list[str], dict[str, list[Row]]]:
    """The page's part for `train.py`, and fit's rows by section (other commands point at them)."""
    sections = {name: by_section(rows(parser)) for name, parser in parsers.items()}
    fit = sections["fit"]
    for name, found in sections.items():
        for section in found:
            if section and found[section] != fit.get(section):
                raise SystemExit(f"{name}'s {section} section differs from fit's: the page assumes they are equal")
    lines = [
        "## train.py: fit, validate, test, predict",
        "",
        "`python train.py SUBCOMMAND --config CONFIG.yaml [--key=value ...]` (LightningCLI). The four",
        "subcommands share every section below; `--print_config` prints the resolved YAML.",
        "",
        "### Command-line options and top-level keys",
        "",
    ]
    top: dict[str, Row] = {}
    where: dict[str, list[str]] = {}
    for name, found in sections.items():
        for row in found[""]:
            top.setdefault(row.key, row)
            where.setdefault(row.key, []).append(name)
    listed = list(top.values())
    commands = {key: ", ".join(names) for key, names in where.items()}
    commands = {key: "all" if value == ", ".join(sections) else value for key, value in commands.items()}
    lines += table(listed, commands, "subcommands")
    lines += [
        "### trainer",
        "",
        "Lightning's `Trainer` arguments (`trainer.max_steps`, `trainer.devices`, `trainer.precision`...):",
        f"see [Lightning's Trainer API]({TRAINER_DOCS}). `train.py` adds a `ModelCheckpoint` writing to",
        "`<trainer.default_root_dir>/checkpoints` (with `save_last: true`) unless the config names one, and",
        "CSV + TensorBoard loggers under `trainer.default_root_dir` unless it names loggers.",
        "",
    ]
    for section, found in fit.items():
        if section in ("", LINKED_SECTION):
            continue
        cls = SECTION_CLASSES.get(section)
        summary = [f"`{cls.__module__}.{cls.__qualname__}`: {first_paragraph(cls)}", ""] if cls else []
        lines += [f"### {section}", "", *summary, *table(found)]
    return lines, fit


def first_paragraph(cls: type) -> str:
    """The first paragraph of a class's docstring, on one line."""
    return " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())


def command_section(name: str, parser: ArgumentParser, shared: dict[str, list[Row]]) -> list[str]:
    """The page's part for one command: its own options, and per section either its table or, for a
    section equal to train.py's but for some defaults, those defaults."""
    lines = [f"## {name}", "", parser.description or "", "", f"`{parser.prog} [--config CONFIG.yaml] --key=value ...`", ""]
    for section, found in by_section(rows(parser)).items():
        if section == LINKED_SECTION:
            lines += [f"### {section}", "", f"Lightning's `Trainer` arguments: see [Lightning's Trainer API]({TRAINER_DOCS}).", ""]
            continue
        if section and section in shared:
            lines += shared_section(name, section, found, shared[section])
            continue
        lines += [f"### {section or 'options'}", "", *table(found)]
    return lines


def shared_section(name: str, section: str, found: list[Row], fit: list[Row]) -> list[str]:
    """A command's section that train.py has too: a pointer to train.py's table, and the rows that
    differ from it (another default, a setting the command takes where train.py links it)."""
    missing = {row.key for row in fit} - {row.key for row in found}
    if missing:
        raise SystemExit(f"{name}'s {section} section lacks {sorted(missing)}: list it in full")
    changed = [row for row in found if row not in fit]
    pointer = f"The settings of train.py's [`{section}`](#{section}) section"
    return [f"### {section}", "", *([pointer + ", with these differences:", "", *table(changed)] if changed else [pointer + ".", ""])]


def scorer_section() -> list[str]:
    """The step scorers users name as `class_path` (`model.reward_model`, `evaluation.verifier`,
    `online.verifier`, score's and evaluate's `scorer`), with their `init_args`."""
    lines = ["## Step scorers", "", first_paragraph(stepwise_lit.rewards.StepScorer), ""]
    for name in sorted(stepwise_lit.rewards.__all__):
        cls = getattr(stepwise_lit.rewards, name)
        if cls is stepwise_lit.rewards.StepScorer:
            continue
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "init_args", fail_untyped=False, sub_configs=True)
        found = rows(parser)
        lines += [f"### class_path: stepwise_lit.rewards.{name}", "", first_paragraph(cls), ""]
        lines += table(found) if found else ["No `init_args`.", ""]
    return lines


def page() -> str:
    """The whole page."""
    lines = [HEADER]
    train_lines, shared = train_section(train_parsers())
    lines += train_lines
    for name, module in (("prepare", prepare), ("score", score), ("evaluate", evaluate)):
        lines += command_section(name, module.build_parser(), shared)
    lines += scorer_section()
    return "\n".join(lines).rstrip() + "\n"


def gaps(text: str) -> Iterator[str]:
    """The keys of the page's rows that have no description."""
    for line in text.splitlines():
        if line.startswith("| `") and NO_DESCRIPTION in line:
            yield line.split("`")[1]


def main(argv: list[str]) -> int:
    """Writes the page, or with `--check` compares it; returns the exit code."""
    text = page()
    for key in gaps(text):
        print(f"no description: {key}", file=sys.stderr)
    if "--check" in argv:
        if (PAGE.read_text(encoding="utf-8") if PAGE.exists() else None) != text:
            print(f"{PAGE.name} is stale: run python docs/configuration.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
