"""Data sources: checking, reading and fingerprinting a local file, a data folder or a hub dataset
(``data.path``, ``data.val_path``, with ``data.name``/``revision``/``data_files`` and their
``val_`` twins for ``datasets.load_dataset``), and checking a model or tokenizer source before
loading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datasets import load_dataset
from huggingface_hub import try_to_load_from_cache

from stepwise_lit.data.readers import DATA_FILE_SUFFIXES, read_records
from stepwise_lit.errors import SettingError

SYNTHETIC = "synthetic"


# A hub dataset id: "owner/name" (letters, digits, "-", "_", "."), nothing that looks like a local path.
HUB_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


DataFiles = str | list[str] | dict[str, str | list[str]]
"""``datasets.load_dataset``'s ``data_files``: a file or glob, a list of them, or split -> files."""


@dataclass(frozen=True)
class DataSource:
    """One data source as the settings name it (``data.path`` with ``data.split`` ..., or the ``val_`` ones).

    Attributes:
        path: A local file, a data folder or a hub dataset id ``owner/name``.
        split: Split of a data folder or hub dataset.
        name: Configuration of a data folder or hub dataset (``openai/gsm8k``'s ``main``); None: its default.
        revision: Branch, tag or commit of a hub dataset; None: the default branch.
        data_files: Files of a data folder or hub dataset to read instead of its configured ones.
        setting: The path's setting as YAML names it (``data.path`` or ``data.val_path``), for errors.
    """

    path: str
    split: str = "train"
    name: str | None = None
    revision: str | None = None
    data_files: DataFiles | None = None
    setting: str = "data.path"

    @property
    def is_file(self) -> bool:
        """Whether the path is a local file (read by this package's readers, not ``datasets``)."""
        return Path(self.path).expanduser().is_file()


def data_sources(hparams: Mapping[str, Any]) -> tuple[DataSource | None, DataSource | None]:
    """The training and validation sources that data settings name (None: synthetic / no ``val_path``)."""
    sources = []
    for prefix in ("", "val_"):
        path = hparams[f"{prefix}path"]
        sources.append(None if path in (None, SYNTHETIC) else DataSource(
            path, hparams[f"{prefix}split"], hparams[f"{prefix}name"], hparams[f"{prefix}revision"],
            hparams[f"{prefix}data_files"], f"data.{prefix}path",
        ))
    return sources[0], sources[1]


def source_fingerprint(source: DataSource | None) -> str | None:
    """The contents hash of a local file; the id, split, name, revision and data files of a data folder
    or hub dataset; None for synthetic data."""
    if source is None:
        return None
    if source.is_file:
        digest = hashlib.sha256()
        with open(source.path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    return json.dumps({key: value for key, value in asdict(source).items() if key != "setting"}, sort_keys=True)


def read_source(source: DataSource) -> list[dict]:
    """The records of a local file (our readers, with line numbers) or of a data folder / hub dataset."""
    return read_records(Path(source.path).expanduser()) if source.is_file else read_hub_dataset(source)


def read_hub_dataset(source: DataSource) -> list[dict]:
    """The records of a data folder or hub dataset ``owner/name`` (``datasets.load_dataset`` with the
    source's split, name, revision and data files).

    Raises:
        SettingError: Naming the source's setting when ``datasets`` cannot load it (not found, offline,
            an unknown configuration name).
    """
    try:
        return load_dataset(
            source.path, source.name, split=source.split, revision=source.revision, data_files=source.data_files
        ).to_list()
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as error:
        details = ", ".join(f"{key} {value!r}" for key, value in asdict(source).items()
                            if key not in ("path", "setting") and value is not None)
        raise SettingError(
            f"{source.setting}: cannot load {source.path!r} ({details}) as a data folder or hub dataset: "
            f"{type(error).__name__}: {error}"
        ) from None


def check_hub_options(source: DataSource) -> None:
    """Fails when ``name``, ``revision`` or ``data_files`` is set for a local file, which they cannot apply to.

    Raises:
        SettingError: Naming the setting (``data.name``, ``data.val_revision`` ...).
    """
    if not source.is_file:
        return
    prefix = source.setting[: -len("path")]
    for key in ("name", "revision", "data_files"):
        if getattr(source, key) is not None:
            raise SettingError(
                f"{prefix}{key}: applies to a data folder or hub dataset, and {source.setting} {source.path!r} is a file"
            )


def check_data_source(name: str, path: str | None) -> None:
    """A data source exists: a file with a known extension, a folder, or a hub id ``owner/name``.

    Raises:
        SettingError: Naming ``data.<name>`` for a file or folder that does not exist (one
            that is not an ``owner/name`` hub id is never looked up on the hub).
    """
    if path is None or path == SYNTHETIC:
        return
    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix.lower() not in DATA_FILE_SUFFIXES:
            raise SettingError(
                f"data.{name}: {path!r} is a {local.suffix or 'extension-less'} file; "
                f"expected {', '.join(DATA_FILE_SUFFIXES)} (or a data folder)"
            )
        return
    if local.is_dir():
        return
    if local.suffix.lower() in DATA_FILE_SUFFIXES or not HUB_DATASET_ID.fullmatch(path):
        raise SettingError(
            f"data.{name}: no such file or folder: {path!r} (looked at {local.resolve()}); "
            "give a local .json/.jsonl/.parquet/.csv file, a data folder, or a hub dataset id owner/name"
        )


def check_pretrained_source(setting: str, name_or_path: str, filename: str) -> None:
    """Fails at once, naming `setting`, on a model or tokenizer source that cannot be found without
    the hub: with ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set, or when the name looks like
    a path (starts with ``/``, ``.`` or ``~``, or its parent folder exists), it must be a local
    folder (or, offline, a hub id in the local cache with its `filename`). Other names are left
    to `from_pretrained`, which tries the hub.

    Raises:
        SettingError: naming `setting`.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return
    offline = any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
                  for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    looks_like_path = name_or_path.startswith(("/", ".", "~")) or (path.parent != Path(".") and path.parent.is_dir())
    if looks_like_path:
        raise SettingError(f"{setting}: no folder {name_or_path!r} (a local path that does not exist)")
    if offline and not isinstance(try_to_load_from_cache(name_or_path, filename), str):
        raise SettingError(
            f"{setting}: {name_or_path!r} is neither a local folder nor in the Hugging Face cache, and the hub "
            "is off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
        )
