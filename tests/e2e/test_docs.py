"""The docs a user reads: the generated docs/configuration.md is fresh and lists exactly the settings
the commands take, and every command line in README.md and docs/*.md runs as written.

Command lines are the lines of ```bash blocks (a trailing `\\` joins the next line; a heredoc
`<<EOF ... EOF` belongs to its line). A comment line right above a command marks it not run here:
`# long: ~N min` (it takes longer than a minute) or `# needs: ...` (hardware this machine lacks,
e.g. `# needs: 8 GPUs`). Those are listed, and their settings are parsed without running (config
files must exist, flags must be the command's). The others run in document order, one docs file
per temporary copy of the repository (a sibling `shared/` links to the repository's, so
`../shared/data` resolves), and must exit 0. `pip install` steps (the start of an `&&` chain) are
not run: the tests run in the installed environment.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from stepwise_lit import cli, evaluate, prepare, score
from stepwise_lit.data.datamodule import StepwiseDataModule
from stepwise_lit.module import StepwiseDPOModule

ROOT = next(folder for folder in Path(__file__).resolve().parents if (folder / "pyproject.toml").is_file())
PAGE = ROOT / "docs" / "configuration.md"
GENERATOR = ROOT / "docs" / "configuration.py"
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
RUN_LIMIT_S = 120  # a command that is not marked long gets this long (a minute, and room for a busy machine)
NOT_RUN = re.compile(r"#\s*(long:\s*~?\s*[\d.]+(\s*[–-]\s*[\d.]+)?\s*(min|s)\b|needs:\s*\S)")
INSTALL = ("pip ", "pip3 ", "uv pip ", "python -m pip ")
TRAIN_SUBCOMMANDS = ("fit", "validate", "test", "predict")
COMMAND_PARSERS = {"prepare": prepare.build_parser, "score": score.build_parser, "evaluate": evaluate.build_parser}


# --- the configuration page -------------------------------------------------------------------


class PageRow(NamedTuple):
    """A row of the page's settings tables: key, type and default as written there."""

    key: str
    type: str
    default: str
    description: str


def page_rows(text: str) -> list[PageRow]:
    """The settings rows of docs/configuration.md (tables whose first column is a code key)."""
    found = []
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        key, *_, type_, default, description = cells
        found.append(PageRow(key.strip("`"), type_.strip("`"), default.strip("`"), description))
    return found


def page_section(text: str, title: str) -> str:
    """The part of the page under the `## title` heading, up to the next `## ` heading."""
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def train_rows() -> dict[str, PageRow]:
    """The page's rows for train.py's `model` and `data` sections, by key."""
    section = page_section(PAGE.read_text(encoding="utf-8"), "train.py")
    return {row.key: row for row in page_rows(section) if row.key.split(".")[0] in ("model", "data")}


def init_keys(cls: type, section: str) -> list[str]:
    """The settings a class's `__init__` takes, dotted under `section`, with the fields of its
    `Dataclass | None` arguments (`model.lora.r`)."""
    hints = typing.get_type_hints(cls.__init__)
    keys = []
    for name in inspect.signature(cls.__init__).parameters:
        if name == "self":
            continue
        keys.append(f"{section}.{name}")
        nested = [arg for arg in typing.get_args(hints.get(name)) if dataclasses.is_dataclass(arg)]
        keys += [f"{section}.{name}.{field.name}" for cls_ in nested for field in dataclasses.fields(cls_)]
    return keys


def test_configuration_page_is_fresh(monkeypatch) -> None:
    """`python docs/configuration.py --check` exits 0: the committed page is the generated one."""
    monkeypatch.setattr(sys, "argv", [str(GENERATOR), "--check"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(GENERATOR), run_name="__main__")
    assert exit_.value.code == 0, "docs/configuration.md is stale: run python docs/configuration.py"


def test_every_init_argument_is_on_the_page_with_a_description() -> None:
    rows = train_rows()
    expected = init_keys(StepwiseDPOModule, "model") + init_keys(StepwiseDataModule, "data")
    assert "model.lora.r" in expected and "data.pack_budget" in expected  # the walk sees nested fields
    missing = [key for key in expected if key not in rows]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"
    undescribed = [key for key in expected if "no description" in rows[key].description]
    assert not undescribed, f"settings whose docstring gives no description: {undescribed}"


def nested(rows: list[PageRow]) -> dict:
    """A YAML mapping of dotted keys to the page's defaults; a `null` key whose fields are rows of
    their own (`model.lora`) gives way to them."""
    config: dict = {}
    for row in rows:
        *parents, last = row.key.split(".")
        target = config
        for part in parents:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[last] = yaml.safe_load(row.default)
    return config


def test_page_keys_are_settings_of_fit(tmp_path: Path, monkeypatch, capsys) -> None:
    """Every model/data key the page lists is one `train.py fit` takes: a YAML config of all of them
    at the page's defaults passes `--print_config`, which prints each value back."""
    rows = [row for row in train_rows().values() if not row.default.startswith("linked from")]
    assert len(rows) > 60
    config = tmp_path / "page.yaml"
    config.write_text(yaml.safe_dump(nested(rows)), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", "--config", str(config), "--print_config"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err[-2000:]
    printed = yaml.safe_load(out)
    for row in rows:
        value = printed
        for part in row.key.split("."):
            value = value[part]
        expected = yaml.safe_load(row.default)
        if expected is None and isinstance(value, dict):  # `lora: null` with its fields set
            continue
        if isinstance(expected, dict):  # a class_path default comes back with its init_args
            expected = {**value, **expected}
        assert value == expected, (row.key, value, expected)


def test_page_lists_the_other_commands_and_scorers() -> None:
    text = PAGE.read_text(encoding="utf-8")
    for title in ("prepare", "score", "evaluate", "Step scorers"):
        assert f"\n## {title}" in text
    keys = {row.key for row in page_rows(page_section(text, "score"))}
    assert {"input", "output", "scorer", "batch_size"} <= keys
    assert "class_path: stepwise_lit.rewards.GenerativeStepScorer" in text
    assert not re.search(r"0x[0-9a-f]{6,}|/work/|/home/|/root/", text)  # no addresses, no machine paths


# --- the command lines of the docs ------------------------------------------------------------


class Command(NamedTuple):
    """A command line of a docs file: where it starts, its text, and why it is not run (None: run)."""

    file: str
    line: int
    text: str
    not_run: str | None


def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    """The ```bash blocks of a Markdown text: (line number of the block's first line, its lines)."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if current is None and re.fullmatch(r"```\s*(bash|sh|shell|console)\s*", stripped):
            current, start = [], number + 1
        elif current is not None and stripped.startswith("```"):
            blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def block_commands(file: str, start: int, lines: list[str]) -> list[Command]:
    """The commands of one block: `\\`-continued lines joined, heredocs kept with their line,
    comment lines dropped, a `# long:`/`# needs:` comment marking the command after it."""
    commands, marker, index = [], None, 0
    while index < len(lines):
        line, number = lines[index], start + index
        index += 1
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            found = NOT_RUN.search(stripped)
            marker = stripped.lstrip("# ").strip() if found else marker
            continue
        text = line.rstrip()
        while text.endswith("\\") and index < len(lines):
            text = text[:-1].rstrip() + " " + lines[index].strip()
            index += 1
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", text)
        if heredoc:
            body = []
            while index < len(lines) and lines[index].strip() != heredoc.group(1):
                body.append(lines[index])
                index += 1
            text = "\n".join([text, *body, heredoc.group(1)])
            index += 1
        commands.append(Command(file, number, text, marker))
        marker = None
    return commands


def doc_commands(path: Path) -> list[Command]:
    """Every command line of a docs file, in order."""
    name = str(path.relative_to(ROOT))
    return [command for start, lines in bash_blocks(path.read_text(encoding="utf-8"))
            for command in block_commands(name, start, lines)]


def without_install(text: str) -> str:
    """A command with its leading `pip install ... &&` steps removed ("" if nothing else is left)."""
    steps = [step.strip() for step in text.split("&&")]
    while steps and steps[0].startswith(INSTALL):
        steps.pop(0)
    return " && ".join(steps)


def entry_arguments(text: str) -> tuple[str, list[str]] | None:
    """Which command a line starts and its arguments: ("train", [subcommand, ...]) for train.py or
    `stepwise-lit fit`, ("prepare", [...]) for prepare/score/evaluate in any spelling; a launcher
    (torchrun, srun) is looked through; None for anything else."""
    words = shlex.split(text.split("\n")[0], comments=True)
    for index, word in enumerate(words):
        rest = words[index + 1:]
        if word.endswith("train.py"):
            return "train", rest
        if word == "-m" and rest and rest[0].startswith("stepwise_lit."):
            return rest[0].removeprefix("stepwise_lit."), rest[1:]
        if word.startswith("stepwise-lit-"):
            return word.removeprefix("stepwise-lit-"), rest
        if word == "stepwise-lit" and rest:
            return ("train", rest) if rest[0] in TRAIN_SUBCOMMANDS else (rest[0], rest[1:])
    return None


def config_files(arguments: list[str]) -> list[str]:
    """The files named by `--config`/`-c` in a command's arguments."""
    named = [value for flag, value in zip(arguments, arguments[1:]) if flag in ("--config", "-c")]
    return named + [arg.split("=", 1)[1] for arg in arguments if arg.startswith("--config=")]


def check_parses(command: Command, monkeypatch, capsys) -> None:
    """A command that is not run: its config files exist and its command's parser accepts its
    arguments (train.py: `--print_config`; the others: their `build_parser()`); another program
    must at least be installed."""
    text = without_install(command.text)
    entry = entry_arguments(text)
    if entry is None:
        program = shlex.split(text)[0]
        assert shutil.which(program) or Path(program).exists(), f"{command}: {program} not found"
        return
    name, arguments = entry
    for path in config_files(arguments):
        assert Path(path).is_file(), f"{command.file}:{command.line}: config {path} does not exist"
    with pytest.raises(SystemExit) as exit_:
        if name == "train":
            monkeypatch.setattr(sys, "argv", ["train.py"])
            cli.main([*arguments, "--print_config"])
        else:
            COMMAND_PARSERS[name]().parse_args(arguments)
            raise SystemExit(0)
    assert exit_.value.code == 0, f"{command.file}:{command.line}: {capsys.readouterr().err[-1500:]}"
    capsys.readouterr()


def repository_copy(folder: Path) -> Path:
    """A copy of the repository's files (tracked, and new ones git does not ignore) under `folder/repo`, with `folder/shared` linked to
    the repository's sibling `shared/` where there is one."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True)
    names = [name for name in listed.stdout.split("\0") if name] if listed.returncode == 0 else None
    copy = folder / "repo"
    if names is None:
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__"))
    for name in names or []:
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (folder / "shared").symlink_to(shared)
    return copy


def run_in_group(text: str, cwd: Path, env: dict) -> tuple[int | None, str]:
    """Runs a command line with bash in a process group of its own; past RUN_LIMIT_S the whole
    group is killed (not only bash). Returns the exit code (None past the limit) and stderr."""
    process = subprocess.Popen(["bash", "-c", text], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = process.communicate(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None, ""
    return process.returncode, err


def test_block_commands_reads_continuations_markers_and_heredocs() -> None:
    lines = [
        "# raw source -> pairs",
        "python -m stepwise_lit.prepare --data.format gsm8k \\",
        "    --output pairs.jsonl   # a trailing comment",
        "# long: ~12 min",
        "python train.py fit --config configs/zephyr_gsm8k.yaml",
        "# needs: 8 GPUs",
        "torchrun --nproc_per_node=8 train.py fit --config configs/tiny.yaml",
        "cat > x.yaml <<'EOF'",
        "data:",
        "  path: synthetic",
        "EOF",
        "pip install -e . && python train.py fit --config x.yaml",
    ]
    commands = block_commands("README.md", 10, lines)
    assert [command.line for command in commands] == [11, 14, 16, 17, 21]
    assert commands[0].text == "python -m stepwise_lit.prepare --data.format gsm8k --output pairs.jsonl   # a trailing comment"
    assert [command.not_run for command in commands] == [None, "long: ~12 min", "needs: 8 GPUs", None, None]
    assert commands[3].text.splitlines() == lines[7:11]
    assert without_install(commands[4].text) == "python train.py fit --config x.yaml"
    assert entry_arguments(commands[0].text) == ("prepare", ["--data.format", "gsm8k", "--output", "pairs.jsonl"])
    assert entry_arguments(commands[2].text) == ("train", ["fit", "--config", "configs/tiny.yaml"])
    assert entry_arguments("stepwise-lit score --input a") == ("score", ["--input", "a"])
    assert entry_arguments("stepwise-lit validate -c b.yaml") == ("train", ["validate", "-c", "b.yaml"])


def test_check_parses_rejects_a_wrong_flag_and_a_missing_config(monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    check_parses(Command("x.md", 1, "python train.py fit --config configs/tiny.yaml --trainer.devices=8", "long: ~1 min"),
                 monkeypatch, capsys)
    with pytest.raises(AssertionError, match="model.no_such_setting"):
        check_parses(Command("x.md", 2, "python train.py fit --model.no_such_setting=1", "long: ~1 min"), monkeypatch, capsys)
    with pytest.raises(AssertionError, match="no_such.yaml does not exist"):
        check_parses(Command("x.md", 3, "python -m stepwise_lit.score --config no_such.yaml", "long: ~1 min"), monkeypatch, capsys)
    with pytest.raises(AssertionError, match="output"):
        check_parses(Command("x.md", 4, "stepwise-lit prepare --data.format gsm8k", "needs: 8 GPUs"), monkeypatch, capsys)


NOT_RUN_COMMANDS = [command for doc in DOCS for command in doc_commands(doc) if command.not_run]


@pytest.mark.parametrize("command", NOT_RUN_COMMANDS, ids=lambda c: f"{c.file}:{c.line} ({c.not_run})")
def test_long_doc_commands_parse(command: Command, monkeypatch, capsys) -> None:
    """Each command marked long or needing hardware (one test each, so `pytest -v` lists them):
    parsed without running."""
    monkeypatch.chdir(ROOT)
    check_parses(command, monkeypatch, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_doc_commands_run(doc: Path, tmp_path: Path) -> None:
    """Every command that is not marked runs as written, in order, in a copy of the repository,
    and exits 0 within RUN_LIMIT_S (each one's time is printed: `pytest -s` shows them)."""
    commands = [command for command in doc_commands(doc) if not command.not_run and without_install(command.text)]
    if not commands:
        pytest.skip(f"{doc.name} has no command to run")
    copy = repository_copy(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")])}
    env["STEPWISE_LIT_CACHE"] = str(tmp_path / "cache")
    for command in commands:
        started = time.monotonic()
        code, err = run_in_group(without_install(command.text), copy, env)
        assert code is not None, f"{command.file}:{command.line} ran past {RUN_LIMIT_S} s: mark it '# long: ~N min'"
        print(f"{time.monotonic() - started:.0f} s: {command.file}:{command.line}: {command.text}")
        assert code == 0, f"{command.file}:{command.line} exited {code}:\n{command.text}\n{err[-3000:]}"
