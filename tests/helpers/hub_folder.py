"""A local dataset folder laid out as a hub dataset repository with two configurations (its README's
``configs:`` block), read by ``datasets.load_dataset`` offline."""

from __future__ import annotations

import json
from pathlib import Path

from stepwise_lit.data.synthetic import generate_pairs

README = """---
configs:
- config_name: easy
  default: true
  data_files:
  - split: train
    path: easy/train.jsonl
- config_name: hard
  data_files:
  - split: train
    path: hard/train.jsonl
  - split: test
    path: hard/test.jsonl
---
"""


def write_hub_folder(folder: Path) -> dict[str, list[dict]]:
    """Writes the folder: config ``easy`` (5 embedded pairs, seed 3; the default) and ``hard``
    (3 pairs, seed 4, and a 2-pair test split, seed 5). Returns the rows of each file by
    ``config/split``."""
    files = {"easy/train": generate_pairs(5, seed=3), "hard/train": generate_pairs(3, seed=4),
             "hard/test": generate_pairs(2, seed=5)}
    for name, rows in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "README.md").write_text(README)
    return files
