"""Data sources: checking, reading and fingerprinting a local file, a data folder or a hub dataset
(``data.path``, ``data.val_path``), and checking a model or tokenizer source before loading it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from datasets import load_dataset
from huggingface_hub import try_to_load_from_cache

from stepwise_lit.data.readers import DATA_FILE_SUFFIXES, read_records
from stepwise_lit.errors import SettingError

SYNTHETIC = "synthetic"


# A hub dataset id: "owner/name" (letters, digits, "-", "_", "."), nothing that looks like a local path.
HUB_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def source_fingerprint(path: str | None, split: str) -> str | None:
    """The contents hash of a local file; the id and split of a hub dataset; None for synthetic data."""
    if path is None:
        return None
    if Path(path).is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    return f"{path}:{split}"


def read_source(path: str, split: str) -> list[dict]:
    """The records of a local file (our readers, with line numbers) or of a data folder / hub dataset."""
    local = Path(path).expanduser()
    return read_records(local) if local.is_file() else read_hub_dataset(path, split)


def read_hub_dataset(path: str, split: str) -> list[dict]:
    """The records of a data folder or hub dataset ``owner/name`` (``datasets.load_dataset``).

    Raises:
        SettingError: Naming ``data.path`` when ``datasets`` cannot load it (not found, offline).
    """
    try:
        return load_dataset(path, split=split).to_list()
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as error:
        raise SettingError(
            f"data.path: cannot load {path!r} (split {split!r}) as a data folder or hub dataset: "
            f"{type(error).__name__}: {error}"
        ) from None


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
